"""Pure progress parsing: status.progress / metrics / lastCheckpoint from the trainer's /metrics.

The operator reads the endpoint itself (see docs/operator.md), so tenant pods need no permission
to write their FineTuneJob's status.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from finetune_api import contract

from finetune_operator.status import (checkpoint_status, newer_checkpoint,
                                      checkpoint_prefix, timestamp)


def parse_exposition(text: str) -> dict[str, Any]:
    """Sample name -> value for unlabelled samples; `finetune_info` -> its labels."""
    values: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == contract.METRIC_INFO:
                values[sample.name] = dict(sample.labels)
            elif not sample.labels and math.isfinite(sample.value):
                values[sample.name] = sample.value
    return values


def progress_patch(samples: dict[str, Any], spec: dict[str, Any], status: dict[str, Any],
                   now: datetime) -> dict[str, Any]:
    """The status merge patch for one reading of the trainer's metrics."""
    total = int(samples.get(contract.METRIC_PLANNED_EPOCHS) or spec.get("epochs") or 0)
    epoch = int(samples.get(contract.METRIC_EPOCH, 0))
    progress: dict[str, Any] = {"epoch": epoch, "totalEpochs": total,
                                "epochProgress": f"{epoch}/{total}",
                                "updateTime": timestamp(now)}
    steps = samples.get(contract.METRIC_STEPS)
    planned_steps = samples.get(contract.METRIC_PLANNED_STEPS)
    if steps is not None and planned_steps:
        progress["percent"] = round(min(100.0, 100.0 * steps / planned_steps), 1)
    elif total:
        progress["percent"] = round(100.0 * epoch / total, 1)
    eta = samples.get(contract.METRIC_ETA)
    if eta is not None and eta >= 0:
        progress["etaSeconds"] = int(round(eta))
    patch: dict[str, Any] = {"progress": progress}

    # A gauge reads 0 until it is first set: per-epoch figures mean something only after an
    # epoch, the baseline only once it was trained; until then `kubectl get` shows them empty.
    measured = [("baselineAccuracy", contract.METRIC_BASELINE_ACCURACY)]
    if epoch >= 1:
        measured += [("trainLoss", contract.METRIC_TRAIN_LOSS),
                     ("valAccuracy", contract.METRIC_VAL_ACCURACY),
                     ("bestValAccuracy", contract.METRIC_BEST_VAL_ACCURACY)]
    metrics = {key: samples[name] for key, name in measured
               if name in samples and (epoch >= 1 or samples[name] > 0)}
    if metrics:
        patch["metrics"] = metrics

    info = samples.get(contract.METRIC_INFO) or {}
    if info.get("strategy") and info["strategy"] != status.get("resolvedStrategy"):
        patch["resolvedStrategy"] = info["strategy"]
    if info.get("reason") and info["reason"] != status.get("strategyReason"):
        patch["strategyReason"] = info["reason"]

    checkpoint_time = samples.get(contract.METRIC_CHECKPOINT_TIME)
    if checkpoint_time:  # 0 until the first checkpoint of this run
        checkpoint = checkpoint_status(
            checkpoint_prefix(spec), samples.get(contract.METRIC_CHECKPOINT_EPOCH, 0),
            samples.get(contract.METRIC_CHECKPOINT_STEP, 0),
            timestamp(datetime.fromtimestamp(checkpoint_time, timezone.utc)))
        if newer_checkpoint(checkpoint, status.get("lastCheckpoint")):
            patch["lastCheckpoint"] = checkpoint
    return patch
