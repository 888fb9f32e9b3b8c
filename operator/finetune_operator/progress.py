"""Pure progress parsing: status.progress / metrics / lastCheckpoint from the trainer's /metrics.

The operator reads the endpoint itself (see docs/operator.md), so tenant pods need no permission
to write their FineTuneJob's status. What a tenant pod serves is untrusted: only the samples below
are kept, and status.progress never goes back.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from finetune_api import contract

from finetune_operator.status import (checkpoint_status, newer_checkpoint,
                                      checkpoint_prefix, timestamp)

# status.metrics key -> sample. The baseline is measured once; the others after every epoch.
BASELINE_METRICS = {"baselineAccuracy": contract.METRIC_BASELINE_ACCURACY}
EPOCH_METRICS = {"trainLoss": contract.METRIC_TRAIN_LOSS,
                 "valAccuracy": contract.METRIC_VAL_ACCURACY,
                 "bestValAccuracy": contract.METRIC_BEST_VAL_ACCURACY}

# The samples progress_patch reads; parse_exposition drops every other one.
KNOWN_METRICS = frozenset({
    contract.METRIC_EPOCH, contract.METRIC_PLANNED_EPOCHS, contract.METRIC_STEPS,
    contract.METRIC_PLANNED_STEPS, contract.METRIC_ETA, contract.METRIC_CHECKPOINT_EPOCH,
    contract.METRIC_CHECKPOINT_STEP, contract.METRIC_CHECKPOINT_TIME, contract.METRIC_INFO,
    *BASELINE_METRICS.values(), *EPOCH_METRICS.values()})

RANK_LABEL = "rank"
REPORTING_RANK = "0"
# The labels of finetune_info that status shows (with size caps: the body is a tenant's).
INFO_LABELS = ("backbone", "strategy", "reason")
MAX_INFO_LABEL_CHARS = 1024
# Checkpoint times past this (year 9999) are not times.
MAX_TIMESTAMP = 253402300799


def parse_exposition(text: str) -> dict[str, Any]:
    """Sample name -> value for the KNOWN_METRICS; `finetune_info` -> its labels (without rank).

    A sample counts when it has no labels or only rank="0": in a distributed run every process
    serves its own /metrics with a rank label and rank 0 is the one that reports, so its sample
    wins over an unlabelled one. Raises ValueError when `text` is not an exposition."""
    unlabelled: dict[str, Any] = {}
    reporting_rank: dict[str, Any] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name not in KNOWN_METRICS:
                    continue
                rank = sample.labels.get(RANK_LABEL)
                if rank not in (None, REPORTING_RANK):
                    continue
                labels = {k: v for k, v in sample.labels.items() if k != RANK_LABEL}
                if sample.name == contract.METRIC_INFO:
                    value: Any = {k: labels[k][:MAX_INFO_LABEL_CHARS] for k in INFO_LABELS
                                  if k in labels}
                elif labels or not math.isfinite(sample.value):
                    continue
                else:
                    value = sample.value
                (unlabelled if rank is None else reporting_rank)[sample.name] = value
    except Exception as error:
        # The parser raises more than ValueError on some garbage (IndexError, ...); its message
        # may quote the tenant's body, so keep it short.
        raise ValueError(f"not a Prometheus exposition: {type(error).__name__}: "
                         f"{str(error)[:80]}") from error
    return {**unlabelled, **reporting_rank}


def reading_progress(samples: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    """status.progress (without updateTime) from one reading; None when it has no epoch (no
    trainer's, or only another rank's)."""
    if contract.METRIC_EPOCH not in samples:
        return None
    total = int(samples.get(contract.METRIC_PLANNED_EPOCHS) or spec.get("epochs") or 0)
    epoch = int(samples[contract.METRIC_EPOCH])
    progress: dict[str, Any] = {"epoch": epoch, "totalEpochs": total,
                                "epochProgress": f"{epoch}/{total}"}
    steps = samples.get(contract.METRIC_STEPS)
    planned_steps = samples.get(contract.METRIC_PLANNED_STEPS)
    if steps is not None and planned_steps:
        progress["percent"] = round(min(100.0, 100.0 * steps / planned_steps), 1)
    elif total:
        progress["percent"] = round(100.0 * epoch / total, 1)
    eta = samples.get(contract.METRIC_ETA)
    if eta is not None and eta >= 0:
        progress["etaSeconds"] = int(round(eta))
    return progress


def behind(progress: dict[str, Any], known: dict[str, Any]) -> bool:
    """Whether a reading is behind status.progress: a restarted trainer serving zeroed gauges, or
    one resumed from an older checkpoint."""
    if progress["epoch"] < (known.get("epoch") or 0):
        return True
    percent, known_percent = progress.get("percent"), known.get("percent")
    return percent is not None and known_percent is not None and percent < known_percent


def changes(fields: dict[str, Any], known: dict[str, Any]) -> bool:
    """Whether merging `fields` into `known` changes it."""
    return any(known.get(key) != value for key, value in fields.items())


def measured_metrics(samples: dict[str, Any], epoch: int, known_epoch: int) -> dict[str, Any]:
    """status.metrics from one reading whose epoch is `epoch`; status.progress is at
    `known_epoch`."""
    # A gauge reads 0 until it is first set: the baseline until it was trained (or for good, when
    # it is disabled); the per-epoch figures before the first epoch, and in a trainer resumed from
    # a checkpoint until it finishes an epoch. So a 0 counts only for a per-epoch figure from a
    # reading past the epoch status has; until then `kubectl get` keeps what it showed, or shows
    # nothing.
    metrics = {key: samples[name] for key, name in BASELINE_METRICS.items()
               if samples.get(name, 0) > 0}
    if epoch >= max(1, known_epoch):
        metrics.update({key: samples[name] for key, name in EPOCH_METRICS.items()
                        if name in samples and (samples[name] > 0 or epoch > known_epoch)})
    return metrics


def progress_patch(samples: dict[str, Any], spec: dict[str, Any], status: dict[str, Any],
                   now: datetime) -> dict[str, Any]:
    """The status merge patch for one reading of the trainer's metrics: only the fields it
    changes, so a reading like the last one gives {}. status.progress never goes back."""
    known_progress = status.get("progress") or {}
    known_epoch = int(known_progress.get("epoch") or 0)
    patch: dict[str, Any] = {}

    progress = reading_progress(samples, spec)
    if progress is not None and not behind(progress, known_progress) and \
            changes(progress, known_progress):
        patch["progress"] = {**progress, "updateTime": timestamp(now)}

    epoch = int(samples.get(contract.METRIC_EPOCH, 0))
    metrics = measured_metrics(samples, epoch, known_epoch)
    if changes(metrics, status.get("metrics") or {}):
        patch["metrics"] = metrics

    info = samples.get(contract.METRIC_INFO) or {}
    if info.get("strategy") and info["strategy"] != status.get("resolvedStrategy"):
        patch["resolvedStrategy"] = info["strategy"]
    if info.get("reason") and info["reason"] != status.get("strategyReason"):
        patch["strategyReason"] = info["reason"]

    checkpoint_time = samples.get(contract.METRIC_CHECKPOINT_TIME)
    if checkpoint_time and 0 < checkpoint_time <= MAX_TIMESTAMP:  # 0 until the first one
        checkpoint = checkpoint_status(
            checkpoint_prefix(spec), samples.get(contract.METRIC_CHECKPOINT_EPOCH, 0),
            samples.get(contract.METRIC_CHECKPOINT_STEP, 0),
            timestamp(datetime.fromtimestamp(checkpoint_time, timezone.utc)))
        if newer_checkpoint(checkpoint, status.get("lastCheckpoint")):
            patch["lastCheckpoint"] = checkpoint
    return patch
