"""Reading a FineTuneJob manifest from a file. No torch here: `finetune validate` runs where
only the API's libraries are installed (a CI job that lints manifests)."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_api import KIND
from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError


def read_manifest(path: str | Path) -> dict:
    """The FineTuneJob in a YAML file (other documents, a Secret say, are skipped), or the one
    mapping it holds (a bare spec)."""
    try:
        documents = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
        jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
        document = jobs[0] if jobs else (documents[0] if len(documents) == 1 else None)
    except FileNotFoundError as error:
        raise TrainerError(ExitCode.INVALID_SPEC, f"no manifest at {path}", "spec") from error
    except yaml.YAMLError as error:
        raise TrainerError(ExitCode.INVALID_SPEC, f"{path} is not valid YAML: "
                           f"{error}".replace("\n", " "), "spec") from error
    if not isinstance(document, dict):
        raise TrainerError(ExitCode.INVALID_SPEC, f"{path} holds no FineTuneJob mapping", "spec")
    return document
