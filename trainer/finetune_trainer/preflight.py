"""Checks of a valid spec that need the model libraries but no data: does the backbone exist,
does the freeze policy fit its stages, is there a weights file where a path is named. Used by
`finetune validate` and by the trainer before it downloads anything."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import WEIGHTS_FIELD, build_model, check_backbone
from finetune_trainer.policy import model_stages


def preflight_problems(spec: Mapping) -> list[TrainerError]:
    model_spec = spec["model"]
    try:
        check_backbone(model_spec["library"], model_spec["backbone"])
    except TrainerError as error:
        return [error]
    problems = []
    weights = model_spec["weights"]
    if spec["strategy"] == "LinearProbe" and weights == "None":
        problems.append(TrainerError(ExitCode.INVALID_SPEC, "LinearProbe needs pretrained "
                                     "weights: name them or use Pretrained", WEIGHTS_FIELD))
    if weights.startswith(("/", "file://")) and not Path(weights.removeprefix("file://")).exists():
        problems.append(TrainerError(ExitCode.INVALID_MODEL, f"no weights file at {weights}",
                                     WEIGHTS_FIELD))
    freeze = spec["freeze"]
    if freeze["policy"] == "FirstStages":
        # The meta device builds the architecture without allocating or initialising weights.
        with torch.device("meta"):
            model = build_model(model_spec, 2, load_weights=False)
        stage_count = len(model_stages(model).stages)
        if freeze["stages"] > stage_count:
            problems.append(TrainerError(ExitCode.INVALID_SPEC, f"is {freeze['stages']} but "
                                         f"{model_spec['backbone']} has {stage_count} stages",
                                         "spec.freeze.stages"))
    return problems


def check_preflight(spec: Mapping) -> None:
    problems = preflight_problems(spec)
    if problems:
        raise problems[0]
