"""The FineTuneJob schema: the one place where the API is defined.

Everything else is derived from `spec_schema()` and `status_schema()`: the CRD in `crds/` and in the
Helm chart (`python -m finetune_api.crd`), `kubectl explain`, the local validator used by
`finetune validate` and the trainer, and the defaults the trainer applies when it runs a bare spec.

Cross-field rules are CEL (`x-kubernetes-validations`), enforced by the API server at
`kubectl apply`; the local validator evaluates the very same expressions with cel-python.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

# S3 URIs, file:// URIs or absolute paths. Bucket names follow S3's naming rules.
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.*|/.*)$"
URI_DESCRIPTION = "s3://bucket/prefix/, file:///path or an absolute path"
IMMUTABLE_RULE = {
    "rule": "self == oldSelf",
    "message": "is immutable: delete and re-create the FineTuneJob to change it",
}


def _string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def _integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "format": "int32", "description": description, **extra}


def _number(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def _boolean(description: str, **extra: Any) -> Schema:
    return {"type": "boolean", "description": description, **extra}


def _enum(description: str, values: list[str], default: str | None = None) -> Schema:
    schema = _string(description, enum=values)
    if default is not None:
        schema["default"] = default
    return schema


def _object(description: str, properties: dict[str, Schema], required: list[str] | None = None,
            **extra: Any) -> Schema:
    """An object. Pass `default={}` where the API server should create it empty, so that the
    defaults of its fields apply even when the user leaves the whole object out."""
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


def _rgb(description: str, **item_bounds: Any) -> Schema:
    return {"type": "array", "description": description, "minItems": 3, "maxItems": 3,
            "items": {"type": "number", "description": "Red, green, blue in that order.",
                      "minimum": 0, "maximum": 1, **item_bounds}}


# A Kubernetes resource quantity as spec.resources accepts it: 4, 3500m, 16Gi, 1.5G.
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?([mkMGTPE]i?)?$"


def _quantity(description: str) -> Schema:
    return {"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN,
            "description": description}


def _free_form(description: str) -> Schema:
    """A Kubernetes core type passed through to the pod unchanged (affinity, a toleration)."""
    return {"type": "object", "description": description,
            "x-kubernetes-preserve-unknown-fields": True}


def _immutable(schema: Schema) -> Schema:
    schema.setdefault("x-kubernetes-validations", []).append(dict(IMMUTABLE_RULE))
    return schema


def dataset_schema() -> Schema:
    s3 = _object(
        "How to reach the S3 service that holds the dataset (and, by default, the weights, "
        "checkpoints and outputs).",
        {
            "endpoint": _string("S3-compatible endpoint URL, e.g. http://s3.local:7070. Empty: AWS.",
                                pattern=r"^https?://[^\s/]+(/.*)?$", maxLength=2048),
            "region": _string("Region name passed to the S3 client.", default="us-east-1",
                              maxLength=64),
            "credentialsSecret": _string(
                "Name of a Secret in the FineTuneJob's namespace with keys AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (optionally AWS_SESSION_TOKEN). Empty: the pod's standard "
                "AWS credential chain (IRSA / web identity, instance profile).",
                pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", maxLength=253),
            "addressingStyle": _enum("S3 addressing style; most S3-compatible servers need Path.",
                                     ["Auto", "Path", "Virtual"], "Auto"),
        },
        default={},
    )
    return _immutable(_object(
        "Where the training images are and how they are laid out.",
        {
            "uri": _string(f"Dataset location: {URI_DESCRIPTION}.", pattern=URI_PATTERN,
                           maxLength=2048),
            "format": _enum(
                "ImageFolder: train/<class>/* (and optional val/<class>/*) under the URI. "
                "Manifest: a CSV of key,label rows (keys relative to the URI).",
                ["ImageFolder", "Manifest"], "ImageFolder"),
            "manifest": _string("Manifest format: the CSV's key relative to the URI.",
                                default="manifest.csv", maxLength=1024),
            "validationSplit": _number(
                "Fraction of training images held out, stratified and seeded, when the dataset "
                "has no val/ split. Must be in (0, 1).", default=0.1,
                **{"x-kubernetes-validations": [{
                    "rule": "self > 0.0 && self < 1.0",
                    "message": "must be greater than 0 and less than 1"}]}),
            "maxCorruptFraction": _number(
                "Unreadable images are skipped and counted; above this fraction of all images the "
                "job fails before training.", default=0.01, minimum=0, maximum=1),
            "minImagesPerClass": _integer("Fail before training when a class has fewer images.",
                                          default=2, minimum=1),
            "s3": s3,
        },
        required=["uri"],
    ))


def model_schema() -> Schema:
    return _immutable(_object(
        "The pretrained backbone whose classifier head is replaced by one sized to the "
        "dataset's classes.",
        {
            "backbone": _string("Architecture name, e.g. efficientnet_lite0 or resnet50.",
                                minLength=1, maxLength=128, pattern=r"^[A-Za-z0-9_.\-]+$"),
            "library": _enum("Which library builds the architecture.", ["Timm", "Torchvision"],
                             "Timm"),
            "weights": _string(
                "Pretrained weights: an s3:// URI or a path to a state dict or checkpoint, "
                "'Pretrained' for the library's own download (needs egress), or 'None' for random "
                "initialisation.", default="Pretrained", maxLength=2048,
                pattern=r"^(Pretrained|None|s3://.+|file:///.+|/.+)$"),
            "imageSize": _integer("Square input size in pixels. Default: the backbone's own "
                                  "pretrained input size (timm pretrained_cfg, torchvision "
                                  "weights).", minimum=16, maximum=1024),
            "preprocessing": _object(
                "Overrides of the input preprocessing, which otherwise comes from the backbone's "
                "own pretrained configuration (timm pretrained_cfg, torchvision weights "
                "transforms; ImageNet's values when it has none). report.json and the "
                "safetensors metadata record what was used.",
                {"mean": _rgb("Per-channel mean of RGB in [0, 1] subtracted before the network."),
                 "std": _rgb("Per-channel standard deviation of RGB in [0, 1] divided by.",
                             exclusiveMinimum=True),
                 "interpolation": _enum("Resampling used to resize.",
                                        ["Bilinear", "Bicubic", "Nearest"]),
                 "cropPct": _number("Evaluation resizes the short side to imageSize / cropPct and "
                                    "centre-crops imageSize; 1 keeps the whole image.",
                                    minimum=0.1, maximum=1)}),
        },
        required=["backbone"],
    ))


def freeze_schema() -> Schema:
    return _object(
        "Which pretrained layers train. Stages come from the model's own layer grouping "
        "(timm's group_matcher), counted from the input.",
        {
            "policy": _enum("None trains everything; AllButHead trains only the new classifier; "
                            "FirstStages freezes the first `stages` stages.",
                            ["None", "AllButHead", "FirstStages"], "None"),
            "stages": _integer("With FirstStages: how many stages, from the input, are frozen.",
                               minimum=1, maximum=64),
            "unfreezeAtEpoch": _integer(
                "Gradual unfreezing: from this epoch (0-based) every layer trains. Must be less "
                "than spec.epochs.", minimum=1),
            "batchNorm": _enum("Frozen keeps the pretrained running statistics of normalisation "
                               "layers in frozen stages; Trainable updates them.",
                               ["Frozen", "Trainable"], "Frozen"),
        },
        default={},
        **{"x-kubernetes-validations": [
            # has(self.policy): the API server also checks these rules against the default {}
            # itself, before the field defaults inside it apply.
            {"rule": "has(self.policy) && self.policy == 'FirstStages' ? has(self.stages) "
                     ": !has(self.stages)",
             "message": "freeze.stages is required with policy FirstStages and not allowed with "
                        "other policies", "fieldPath": ".stages"},
            {"rule": "!has(self.unfreezeAtEpoch) || (has(self.policy) && self.policy != 'None')",
             "message": "freeze.unfreezeAtEpoch needs a policy that freezes something",
             "fieldPath": ".unfreezeAtEpoch"},
        ]},
    )


def optimizer_schema() -> Schema:
    return _object(
        "Optimiser and per-group learning rates. Weight decay never applies to norms and biases.",
        {
            "name": _enum("Optimiser.", ["AdamW", "SGD"], "AdamW"),
            "learningRate": _number("Learning rate of the new classifier head.", default=0.001,
                                    minimum=0, exclusiveMinimum=True, maximum=10),
            "backboneLrMultiplier": _number(
                "Pretrained layers learn at learningRate times this (transfer-learning practice: "
                "about 10x slower than the head).", default=0.1, minimum=0, maximum=10),
            "layerDecay": _number(
                "Optional layer-wise decay in (0, 1]: each stage further from the head multiplies "
                "its learning rate by this.", minimum=0, exclusiveMinimum=True, maximum=1),
            "weightDecay": _number("Decoupled weight decay.", default=0.01, minimum=0, maximum=1),
            "momentum": _number("SGD momentum.", default=0.9, minimum=0, maximum=1),
            "lrScaling": _enum(
                "How learningRate scales with the global batch (batchSize per process times "
                "the number of processes): None keeps it, Linear multiplies it by the number of "
                "processes, Sqrt by its square root. The report records the rate used.",
                ["None", "Linear", "Sqrt"], "None"),
        },
        default={},
    )


def schedule_schema() -> Schema:
    return _object(
        "Learning-rate schedule, stepped per batch.",
        {
            "name": _enum("Schedule after warmup.", ["Cosine", "OneCycle", "Step", "Constant"],
                          "Cosine"),
            "warmupEpochs": _integer("Linear warmup epochs. Must be less than spec.epochs.",
                                     default=0, minimum=0),
            "stepEpochs": _integer("Step: epochs between decays.", default=10, minimum=1),
            "gamma": _number("Step: decay factor.", default=0.1, minimum=0, exclusiveMinimum=True,
                             maximum=1),
        },
        default={},
    )


def resources_schema() -> Schema:
    return _immutable(_object(
        "What the trainer pod asks the scheduler for.",
        {
            "gpus": _integer("GPUs per trainer pod; 0 runs on CPU. Several GPUs: one training "
                             "process per GPU (torchrun), data-parallel with DDP.", default=1,
                             minimum=0, maximum=64),
            "workers": _integer("Trainer pods (an Indexed Job, started together); each has "
                                "`gpus` GPUs. The global batch is batchSize times gpus (at "
                                "least 1) times workers.", default=1, minimum=1, maximum=64),
            "gpuResourceName": _string("Extended resource that counts GPUs, e.g. "
                                       "nvidia.com/gpu or amd.com/gpu. Empty: the operator's "
                                       "configured default (nvidia.com/gpu unless changed).",
                                       maxLength=253,
                                       pattern=r"^([a-z0-9.\-]+/)?[a-zA-Z0-9_.\-]+$"),
            "cpu": _quantity("CPU request and limit, e.g. 4 or 3500m."),
            "memory": _quantity("Memory request and limit, e.g. 16Gi."),
            "ephemeralStorage": _quantity(
                "Local disk (ephemeral-storage) request and limit of each trainer pod, e.g. "
                "50Gi: the dataset cache may use all of it, /tmp (downloads of pretrained "
                "weights) a quarter; a pod that writes more is evicted by the kubelet. Default: "
                "the operator's configured default (20Gi unless changed)."),
            "nodeSelector": {"type": "object", "description": "Node labels the pod requires.",
                             "additionalProperties": {"type": "string"}, "maxProperties": 32},
            "tolerations": {"type": "array", "description": "Tolerations for the pod "
                            "(core/v1 Toleration).", "maxItems": 32,
                            "items": _free_form("A core/v1 Toleration.")},
            "affinity": _free_form("core/v1 Affinity for the pod."),
            "priorityClassName": _string("PriorityClass of the trainer pod.", maxLength=253),
        },
        default={},
    ))


def spec_schema() -> Schema:
    return _object(
        "What to fine-tune, on which data, with which transfer-learning policy.",
        {
            "dataset": dataset_schema(),
            "model": model_schema(),
            "strategy": _immutable(_enum(
                "LinearProbe: frozen features + a linear classifier; FineTune: train with the "
                "freeze and learning-rate policy; FromScratch: random initialisation; Auto: "
                "chosen from the data (recorded in status.resolvedStrategy with the reason).",
                ["Auto", "LinearProbe", "FineTune", "FromScratch"], "Auto")),
            "linearProbe": _object(
                "LinearProbe settings.",
                {"classifier": _enum("Linear classifier on frozen features.",
                                     ["LogisticRegression", "LinearSVM"], "LogisticRegression"),
                 "cvFolds": _integer("k-fold cross-validation folds used to pick regularisation "
                                     "(from 5000 training images: one 20% hold-out instead).",
                                     default=5, minimum=2, maximum=20)},
                default={}),
            "freeze": freeze_schema(),
            "optimizer": optimizer_schema(),
            "schedule": schedule_schema(),
            "epochs": _immutable(_integer(
                "Training epochs. Default: sized by optimizer steps (enough steps for a small "
                "dataset to converge, at least a few epochs of a large one; see docs/trainer.md), "
                "with early stopping that keeps the best epoch.", minimum=1, maximum=10000)),
            "batchSize": _integer("Images per step.", default=32, minimum=1, maximum=65536),
            "augmentation": _enum("Training augmentation preset.",
                                  ["None", "Light", "Standard", "Strong"], "Standard"),
            "labelSmoothing": _number("Label smoothing of the cross-entropy loss.", default=0.0,
                                      minimum=0, maximum=0.5),
            "precision": _enum("Auto: bf16 autocast on GPUs that support it, fp32 elsewhere.",
                               ["Auto", "BF16", "FP32"], "Auto"),
            "channelsLast": _boolean("Use channels_last memory format on GPU.", default=True),
            "compile": _boolean("Use torch.compile.", default=False),
            "dataLoaderWorkers": _integer("Data-loading worker processes.", default=2, minimum=0,
                                          maximum=64),
            "seed": _integer("Seed for splits, initialisation and augmentation.", default=0,
                             minimum=0),
            "earlyStopping": _object(
                "Stop when the validation metric has not improved for `patience` epochs.",
                {"patience": _integer("Epochs without improvement before stopping.", minimum=1),
                 "metric": _enum("Validation metric watched.", ["ValAccuracy", "ValLoss"],
                                 "ValAccuracy"),
                 "minDelta": _number("Smallest change that counts as improvement.", default=0.0,
                                     minimum=0)},
                required=["patience"]),
            "baseline": _object(
                "A cheap non-deep baseline trained on the same split; the report flags when "
                "transfer learning did not beat it.",
                {"enabled": _boolean("Train the baseline.", default=True)}, default={}),
            "checkpoint": _object(
                "Full checkpoints (model, optimiser, scheduler, epoch, RNG) for resume.",
                {"uri": _string(f"Checkpoint location ({URI_DESCRIPTION}); default "
                                "<output.uri>/checkpoints/.", pattern=URI_PATTERN, maxLength=2048),
                 "everyEpochs": _integer("Write a checkpoint every this many epochs.", default=1,
                                         minimum=1),
                 "keep": _integer("Checkpoints kept besides the latest.", default=1, minimum=0,
                                  maximum=100),
                 "preemptionGraceSeconds": _integer(
                     "Seconds a trainer pod gets between SIGTERM (preemption, eviction, drain, "
                     "suspend) and SIGKILL to finish its optimizer step and checkpoint it (the "
                     "pod's terminationGracePeriodSeconds). Cover one step plus one checkpoint "
                     "upload; if they do not fit, the previous checkpoint stands.",
                     default=60, minimum=5, maximum=3600)},
                default={}),
            "output": _immutable(_object(
                "Where the model, labels and report are written.",
                {"uri": _string(f"Output location: {URI_DESCRIPTION}.", pattern=URI_PATTERN,
                                maxLength=2048)},
                required=["uri"])),
            "metrics": _object(
                "Prometheus metrics served by the trainer while it runs.",
                {"port": _integer("Port of the trainer's /metrics endpoint.", default=9400,
                                  minimum=1024, maximum=65535)},
                default={}),
            "resources": resources_schema(),
            "suspend": _boolean("Suspend the job: its pods are deleted and the last checkpoint "
                                "kept; false resumes from that checkpoint.", default=False),
            "activeDeadlineSeconds": _integer("Fail the job (reason DeadlineExceeded) after this "
                                              "many seconds of running.", minimum=1),
            "backoffLimit": _integer("Retries for transient failures (preemption and eviction "
                                     "are not counted).", default=3, minimum=0, maximum=100),
            "ttlSecondsAfterFinished": _integer("Delete the FineTuneJob this many seconds after "
                                                "it finished.", minimum=0),
            "queueName": _string("Kueue LocalQueue; set as the kueue.x-k8s.io/queue-name label "
                                 "of the trainer Job.", maxLength=63,
                                 pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
            "image": _string("Trainer image; default: the operator's configured trainer image.",
                             maxLength=1024),
            "serviceAccountName": _string("ServiceAccount of the trainer pod (e.g. for IRSA).",
                                          maxLength=253,
                                          pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        },
        required=["dataset", "model", "output"],
        **{"x-kubernetes-validations": [
            {"rule": "!has(self.freeze) || !has(self.freeze.unfreezeAtEpoch) || "
                     "!has(self.epochs) || self.freeze.unfreezeAtEpoch < self.epochs",
             "message": "freeze.unfreezeAtEpoch must be less than epochs",
             "fieldPath": ".freeze.unfreezeAtEpoch"},
            {"rule": "!has(self.schedule) || !has(self.schedule.warmupEpochs) || "
                     "!has(self.epochs) || self.schedule.warmupEpochs < self.epochs",
             "message": "schedule.warmupEpochs must be less than epochs",
             "fieldPath": ".schedule.warmupEpochs"},
            {"rule": "self.strategy != 'FromScratch' || !has(self.freeze) || "
                     "self.freeze.policy == 'None'",
             "message": "freeze.policy must be None with strategy FromScratch (nothing is "
                        "pretrained)", "fieldPath": ".freeze.policy"},
            {"rule": "self.strategy != 'FromScratch' || self.model.weights == 'None' || "
                     "self.model.weights == 'Pretrained'",
             "message": "model.weights cannot name weights with strategy FromScratch",
             "fieldPath": ".model.weights"},
        ]},
    )


def _condition_schema() -> Schema:
    return _object(
        "A standard condition (metav1.Condition shape).",
        {
            "type": _string("Valid, Running, Succeeded, Failed, Suspended or SpecApplied."),
            "status": _enum("Whether the condition holds.", ["True", "False", "Unknown"]),
            "reason": _string("CamelCase reason."),
            "message": _string("Human-readable detail."),
            "lastTransitionTime": _string("When status last changed.", format="date-time"),
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "metadata.generation the condition is for."},
        },
        required=["type", "status"],
    )


PHASES = ["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
CONDITION_TYPES = ["Valid", "Running", "Succeeded", "Failed", "Suspended", "SpecApplied"]


def status_schema() -> Schema:
    return _object(
        "Observed state, written by the operator only.",
        {
            "phase": _enum("Lifecycle phase.", PHASES),
            "conditions": {"type": "array", "description": "Standard conditions keyed by type.",
                           "items": _condition_schema(), "x-kubernetes-list-type": "map",
                           "x-kubernetes-list-map-keys": ["type"]},
            "observedGeneration": {"type": "integer", "format": "int64",
                                   "description": "metadata.generation last reconciled."},
            "jobName": _string("Name of the trainer batch/v1 Job."),
            "startTime": _string("When the trainer first ran.", format="date-time"),
            "completionTime": _string("When the job finished.", format="date-time"),
            "attempts": _integer("Times the trainer started so far, 1 + retries (with several "
                                 "workers: times the group of pods started)."),
            "resolvedStrategy": _string("The strategy that ran (Auto resolved)."),
            "strategyReason": _string("Why that strategy was chosen."),
            "leaderboard": {
                "type": "array", "maxItems": 8,
                "description": "Auto: the top of the race's leaderboard (report.json has all of "
                               "it), best first; the pixel baseline is in it but not deployable.",
                "items": _object("One candidate of the race.", {
                    "candidate": _string("The candidate's name, e.g. FineTune-lr0.003."),
                    "strategy": _string("LinearProbe, FineTune, FromScratch or Baseline."),
                    "valAccuracy": _number("Best validation accuracy it reached."),
                    "epochs": _integer("Epochs of training it got (0: no epochs)."),
                })},
            "progress": _object("Training progress, refreshed while running.", {
                "epoch": _integer("Epochs completed."),
                "totalEpochs": _integer("Epochs planned."),
                "epochProgress": _string("Epochs completed / planned, e.g. 3/10."),
                "percent": _number("Percent of planned steps done."),
                "etaSeconds": _integer("Estimated seconds remaining."),
                "updateTime": _string("When progress was last read.", format="date-time"),
            }),
            "metrics": _object("Latest training metrics.", {
                "trainLoss": _number("Training loss of the last epoch."),
                "valAccuracy": _number("Validation accuracy of the last epoch (or final)."),
                "bestValAccuracy": _number("Best validation accuracy so far."),
                "baselineAccuracy": _number("Accuracy of the non-deep baseline."),
            }),
            "lastCheckpoint": _object("Latest complete checkpoint (also the trainer Job's "
                                      "finetune.dev/last-checkpoint-time annotation).", {
                "uri": _string("Where the checkpoints are."),
                "epoch": _integer("Epochs it contains."),
                "step": _integer("Optimizer steps into the next epoch it contains (a graceful "
                                 "stop mid-epoch); 0 at an epoch's end."),
                "time": _string("When it was complete.", format="date-time"),
            }),
            "disruptions": _integer(
                "Times a trainer pod was disrupted (the DisruptionTarget condition: evicted by "
                "the kubelet or the Eviction API, preempted by the scheduler, its node lost); "
                "pods disrupted in the same second count once. Retried without counting against "
                "backoffLimit up to the operator's limit; past it the job fails with reason "
                "Evicted."),
            "lastDisruption": _object("The latest disruption counted.", {
                "time": _string("When the pod was marked for disruption.", format="date-time"),
                "pod": _string("The pod's name."),
                "reason": _string("The DisruptionTarget condition's reason, e.g. "
                                  "TerminationByKubelet, EvictionByEvictionAPI."),
                "message": _string("The kubelet's or the API server's message, e.g. The node "
                                   "was low on resource: ephemeral-storage."),
            }),
            "startError": _object(
                "The trainer container cannot start yet (ErrImagePull, ImagePullBackOff, "
                "CreateContainerConfigError, CreateContainerError): a registry hiccup or a Secret "
                "created a moment later clears it; the job fails if it lasts longer than the "
                "operator's grace.", {
                    "reason": _string("The container's waiting reason."),
                    "message": _string("The kubelet's message."),
                    "since": _string("When the operator first saw it.", format="date-time"),
                }),
            "preemptions": _integer("Times the trainer stopped gracefully on SIGTERM "
                                    "(preemption, eviction, drain, suspend) and checkpointed "
                                    "the step it stopped at; not counted against backoffLimit."),
            "output": _object("Where the results are.", {
                "modelUri": _string("Fine-tuned weights (safetensors)."),
                "reportUri": _string("report.json."),
            }),
            "failure": _object("Why the job failed.", {
                "reason": _string("CamelCase reason, e.g. InvalidSpec, DeadlineExceeded."),
                "message": _string("The cause in one line."),
                "exitCode": _integer("Trainer exit code, when it exited."),
            }),
            # kopf keeps its handler progress and last-handled spec here rather than in
            # annotations, which a GitOps tool would fight over.
            "kopf": {"type": "object", "description": "Operator bookkeeping (kopf handler "
                     "progress); not for users.", "x-kubernetes-preserve-unknown-fields": True},
        },
    )


def printer_columns() -> list[Schema]:
    return [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Backbone", "type": "string", "jsonPath": ".spec.model.backbone"},
        {"name": "Strategy", "type": "string", "jsonPath": ".status.resolvedStrategy"},
        {"name": "Epoch", "type": "string", "jsonPath": ".status.progress.epochProgress"},
        {"name": "Accuracy", "type": "number", "format": "float",
         "jsonPath": ".status.metrics.valAccuracy"},
        {"name": "ETA", "type": "integer", "jsonPath": ".status.progress.etaSeconds",
         "priority": 1, "description": "Estimated seconds remaining"},
        {"name": "Checkpointed", "type": "date", "jsonPath": ".status.lastCheckpoint.time",
         "description": "Age of the latest complete checkpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
