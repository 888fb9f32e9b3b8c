"""What the operator and the trainer agree on besides the spec: exit codes, the termination
message, labels, environment variables and metric names. Both sides import this module; neither
imports the other.
"""

from __future__ import annotations

import enum
import json
from typing import Any


class ExitCode(enum.IntEnum):
    """Trainer exit codes. The operator's podFailurePolicy fails the Job at once on the
    "do not retry" codes and lets Kubernetes retry the others up to spec.backoffLimit."""

    SUCCEEDED = 0
    FAILED = 1  # an unexpected crash: retried
    INVALID_SPEC = 2  # the spec is wrong: do not retry
    INVALID_DATA = 3  # empty prefix, one class, too many corrupt images: do not retry
    ACCESS_DENIED = 4  # credentials refused, bucket missing: do not retry
    INVALID_MODEL = 5  # unknown backbone, weights that do not fit: do not retry
    OUT_OF_MEMORY = 6  # the same spec would run out of memory again: do not retry
    OUTPUT_IN_USE = 7  # another FineTuneJob owns spec.output.uri: do not retry
    TRANSIENT = 10  # endpoint unreachable, throttled, timed out: retried
    # SIGTERM (preemption, eviction, drain, suspend): stopped at a step and checkpointed it;
    # retried without counting against backoffLimit.
    PREEMPTED = 11

    @property
    def retryable(self) -> bool:
        return self in (ExitCode.FAILED, ExitCode.TRANSIENT, ExitCode.PREEMPTED)

    @property
    def reason(self) -> str:
        return {
            ExitCode.SUCCEEDED: "Succeeded", ExitCode.FAILED: "TrainerCrashed",
            ExitCode.INVALID_SPEC: "InvalidSpec", ExitCode.INVALID_DATA: "InvalidData",
            ExitCode.ACCESS_DENIED: "AccessDenied", ExitCode.INVALID_MODEL: "InvalidModel",
            ExitCode.OUT_OF_MEMORY: "OutOfMemory", ExitCode.OUTPUT_IN_USE: "OutputInUse",
            ExitCode.TRANSIENT: "TransientError",
            ExitCode.PREEMPTED: "Preempted",
        }[self]


NON_RETRYABLE_EXIT_CODES = sorted(int(c) for c in ExitCode if c and not c.retryable)

# Kubernetes keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def termination_message(**fields: Any) -> str:
    """One line of JSON the trainer writes to its termination log: on success the final
    accuracy and output URIs, on failure `reason` and `message` (and `field` when one is to
    blame). Values that do not fit the limit are dropped, longest first."""
    fields = {k: v for k, v in fields.items() if v is not None}
    text = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and fields:
        longest = max(fields, key=lambda k: len(json.dumps(fields[k])))
        if longest == "message":
            fields["message"] = str(fields["message"])[:1000]
            if len(json.dumps(fields).encode()) > TERMINATION_MESSAGE_LIMIT:
                fields.pop("message")
        else:
            fields.pop(longest)
        text = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return text


def parse_termination_message(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"message": text.strip()[:1000]}
    return value if isinstance(value, dict) else {"message": str(value)}


# Labels the operator puts on the trainer Job and its pods.
LABEL_JOB = "finetune.dev/job"  # the FineTuneJob's name
LABEL_COMPONENT = "finetune.dev/component"  # "trainer" on trainer pods
COMPONENT_TRAINER = "trainer"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "finetune-operator"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
# On the trainer Job: when its latest complete checkpoint was written (RFC 3339), kept current by
# the operator, so that whoever chooses a job to preempt can pick the one that loses least.
ANNOTATION_LAST_CHECKPOINT_TIME = "finetune.dev/last-checkpoint-time"

# Environment variables the trainer reads.
ENV_SPEC = "FINETUNE_SPEC"  # path of the mounted manifest
ENV_TERMINATION_LOG = "FINETUNE_TERMINATION_LOG"  # default /dev/termination-log
ENV_METRICS_ADDR = "FINETUNE_METRICS_ADDR"  # bind address of /metrics; default all interfaces
ENV_METRICS_PORT = "FINETUNE_METRICS_PORT"  # overrides spec.metrics.port
ENV_CACHE_DIR = "FINETUNE_CACHE_DIR"  # dataset/feature cache, survives pod restarts on a volume
ENV_PUSHGATEWAY_URL = "FINETUNE_PUSHGATEWAY_URL"  # optional end-of-job push
# The container's limits.ephemeral-storage in bytes (downward API resourceFieldRef): the dataset
# and the model must fit in it. Unset: no check.
ENV_EPHEMERAL_STORAGE_LIMIT = "FINETUNE_EPHEMERAL_STORAGE_LIMIT_BYTES"

# Where the operator mounts the manifest in the trainer pod.
SPEC_MOUNT_DIR = "/etc/finetune"
SPEC_FILE_NAME = "spec.yaml"

# Trainer metrics (Prometheus names: base units, `_total` for counters). The FineTuneJob's name
# and namespace are target labels added by the scrape, not labels the trainer sets.
METRIC_EPOCH = "finetune_epoch"  # epochs completed
METRIC_PLANNED_EPOCHS = "finetune_planned_epochs"
METRIC_STEPS = "finetune_steps_total"  # optimizer steps completed
METRIC_PLANNED_STEPS = "finetune_planned_steps"
METRIC_TRAIN_LOSS = "finetune_train_loss"
METRIC_VAL_ACCURACY = "finetune_validation_accuracy"  # ratio 0..1
METRIC_BEST_VAL_ACCURACY = "finetune_best_validation_accuracy"
METRIC_BASELINE_ACCURACY = "finetune_baseline_accuracy"
METRIC_LEARNING_RATE = "finetune_learning_rate"  # label: group
METRIC_IMAGES_PER_SECOND = "finetune_images_per_second"
METRIC_DATA_WAIT = "finetune_data_wait_seconds_total"
METRIC_ETA = "finetune_eta_seconds"
METRIC_CHECKPOINT_EPOCH = "finetune_checkpoint_epoch"
# Optimizer steps into the epoch after finetune_checkpoint_epoch the latest checkpoint holds (a
# graceful stop mid-epoch; 0 at an epoch's end).
METRIC_CHECKPOINT_STEP = "finetune_checkpoint_step"
METRIC_CHECKPOINT_TIME = "finetune_last_checkpoint_timestamp_seconds"  # when it was complete
METRIC_GPU_MEMORY = "finetune_gpu_memory_bytes"
METRIC_GPU_UTILIZATION = "finetune_gpu_utilization_ratio"
METRIC_INFO = "finetune_info"  # labels: backbone, strategy, reason
# Pushed once at exit (FINETUNE_PUSHGATEWAY_URL), next to the final values of those above.
METRIC_DURATION = "finetune_run_duration_seconds"
METRIC_EXIT_CODE = "finetune_exit_code"
