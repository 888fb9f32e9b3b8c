"""What the trainer checks before it downloads anything or trains.

Of the spec, with the model libraries but no data (also `finetune validate`): does the backbone
exist, does the freeze policy fit its stages, is there a weights file where a path is named.

Of the output (`check_output`): that this job may write spec.output.uri (it claims the prefix
with an owner object; another FineTuneJob's claim fails the run with OutputInUse) and can (an
AccessDenied or missing bucket fails here, not after hours of training).

Of the pod (`check_dataset_fits`): that the dataset and the model fit its ephemeral storage.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import torch

from finetune_api import contract
from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import WEIGHTS_FIELD, build_model, check_backbone
from finetune_trainer.policy import model_stages
from finetune_trainer.storage import ObjectNotFound, ObjectStore, join_uri

OUTPUT_FIELD = "spec.output.uri"
OWNER_FILE = ".finetune-owner.json"  # under spec.output.uri: the FineTuneJob that claimed it
EPHEMERAL_STORAGE_FIELD = "spec.resources.ephemeralStorage"
# Copies of the model's weights the pod's disk holds at once, besides the dataset: the
# downloaded pretrained weights, and a checkpoint with the optimizer's state (two more copies
# for AdamW's moments) before it is uploaded.
MODEL_COPIES_ON_DISK = 4


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


# ---- the output ----------------------------------------------------------------------------

def output_owner(metadata: Mapping) -> dict | None:
    """The FineTuneJob that claims the output (the operator mounts its manifest with its uid),
    or None for a manifest without a uid (`finetune run` of a local file)."""
    if not metadata.get("uid"):
        return None
    return {"namespace": metadata.get("namespace") or "default", "name": metadata.get("name"),
            "uid": metadata["uid"]}


def check_output(store: ObjectStore, output_uri: str, owner: Mapping | None, *,
                 log=print) -> None:
    """Claim spec.output.uri for `owner` and prove the trainer can write there. Resuming, or
    without an owner, a probe object is written and deleted instead."""
    try:
        if owner is None:
            log(f"no FineTuneJob uid in the manifest (a local run): {output_uri} not claimed")
        elif claim_output(store, output_uri, owner, log=log):
            return
        probe_uri = join_uri(output_uri, f".finetune-write-check-{uuid.uuid4().hex}")
        store.write_bytes(probe_uri, b"", field=OUTPUT_FIELD)
        store.delete(probe_uri, field=OUTPUT_FIELD)
    except TrainerError as error:
        if error.exit_code == ExitCode.OUTPUT_IN_USE:
            raise
        raise TrainerError(error.exit_code, f"pre-flight check of the output {output_uri} "
                           f"failed, nothing trained: {error.message}", error.field) from error


def claim_output(store: ObjectStore, output_uri: str, owner: Mapping, *, log=print) -> bool:
    """Write the owner object under `output_uri` unless this job holds it already: True when
    this call wrote it, False when `owner` held it (a retried or resumed job). Another job's
    claim raises OutputInUse.

    A new claim is a conditional write (If-None-Match: *), atomic where the server honours it.
    The owner object is read first and read back after: on a server that ignores the condition,
    the job that wrote last wins and the other fails, unless both read their own claim back
    before either overwrote it."""
    uri = join_uri(output_uri, OWNER_FILE)
    claim = json.dumps({**owner, "claimedAt": datetime.now(timezone.utc).isoformat()},
                       indent=1).encode()
    holder = _read_owner(store, uri)
    wrote = False
    if holder is None:
        wrote = store.create_bytes(uri, claim, field=OUTPUT_FIELD)
    elif holder.get("uid") != owner["uid"] and _same_name(holder, owner):
        # Deleted and applied again: its checkpoints, keyed by namespace/name, resume, so the
        # output is still this job's. Only the namespace's own tenant can re-create it.
        log(f"{output_uri} was claimed by an earlier FineTuneJob of the same name (uid "
            f"{holder.get('uid')}): taking it over")
        store.write_bytes(uri, claim, field=OUTPUT_FIELD)
        wrote = True
    if holder is None or wrote:
        holder = _read_owner(store, uri)
        if holder is None:  # deleted at once, or a concurrent claim not yet visible
            raise TrainerError(ExitCode.TRANSIENT, f"the claim {uri} vanished as it was written; "
                               "another job may be claiming the same output", OUTPUT_FIELD)
    if holder.get("uid") != owner["uid"]:
        raise TrainerError(
            ExitCode.OUTPUT_IN_USE,
            f"{output_uri} belongs to FineTuneJob {holder.get('namespace', '?')}/"
            f"{holder.get('name', '?')} (uid {holder.get('uid', '?')}, since "
            f"{holder.get('claimedAt', '?')}): choose another output prefix, or delete {uri} "
            "if that job and its outputs are gone", OUTPUT_FIELD)
    if wrote:
        log(f"claimed {output_uri} for {owner['namespace']}/{owner['name']}")
    else:
        log(f"{output_uri} is already claimed by this job (uid {owner['uid']}): resuming")
    return wrote


def _same_name(holder: Mapping, owner: Mapping) -> bool:
    return (holder.get("namespace"), holder.get("name")) == (owner["namespace"], owner["name"])


def _read_owner(store: ObjectStore, uri: str) -> dict | None:
    """The owner object's fields; {} for one that is not JSON (it still holds the prefix)."""
    try:
        text = store.read_bytes(uri, field=OUTPUT_FIELD)
    except ObjectNotFound:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


# ---- the pod's disk ------------------------------------------------------------------------

def ephemeral_storage_limit(environ: Mapping = os.environ) -> int | None:
    """The container's limits.ephemeral-storage in bytes, as the operator passes it; None when
    it does not."""
    value = (environ.get(contract.ENV_EPHEMERAL_STORAGE_LIMIT) or "").strip()
    return int(value) if value and int(value) > 0 else None


def model_bytes(model_spec: Mapping) -> int:
    """The size of the model's weights (fp32), from the architecture alone."""
    with torch.device("meta"):
        model = build_model(model_spec, 2, load_weights=False)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def dataset_size_check(model_spec: Mapping, environ: Mapping = os.environ):
    """`prepare_dataset`'s check_size for this pod, or None when its limit is not known."""
    limit_bytes = ephemeral_storage_limit(environ)
    if limit_bytes is None:
        return None
    weights_bytes = model_bytes(model_spec)
    return lambda dataset_bytes: check_dataset_fits(dataset_bytes, model_bytes=weights_bytes,
                                                    limit_bytes=limit_bytes)


def check_dataset_fits(dataset_bytes: int, *, model_bytes: int, limit_bytes: int) -> None:
    """InvalidData, naming the sizes, when the downloaded dataset and the model's copies on
    disk do not fit the pod's ephemeral storage."""
    model_room = MODEL_COPIES_ON_DISK * model_bytes
    if dataset_bytes + model_room <= limit_bytes:
        return
    raise TrainerError(
        ExitCode.INVALID_DATA,
        f"the dataset is {human_bytes(dataset_bytes)} and the model and a checkpoint need "
        f"about {human_bytes(model_room)} more, but the pod's ephemeral storage limit is "
        f"{human_bytes(limit_bytes)}: raise it, or train on a smaller dataset",
        EPHEMERAL_STORAGE_FIELD)


def human_bytes(count: int) -> str:
    """1536 -> "1.5 KiB"; 10 GiB exactly -> "10 GiB"."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
