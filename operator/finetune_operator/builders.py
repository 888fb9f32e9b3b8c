"""Pure builders: the trainer Job (with the spec it runs) and the other children a FineTuneJob
owns, as plain dicts.

No API calls here; `handlers` creates what these return. Names are deterministic so that creation
is idempotent (a second create answers 409 AlreadyExists and the existing object is adopted).
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import yaml
from kubernetes.utils import parse_quantity

from finetune_api import API_VERSION, KIND
from finetune_api import contract

from finetune_operator.config import OperatorConfig

# libyaml where PyYAML has it: the pure-Python parser costs ~8 ms per spec, read back on every
# reconcile of a running job.
YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
YamlDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

Manifest = dict[str, Any]

CONTAINER_NAME = "trainer"
# Job pods get "<job name>-<5 chars>" names and a batch.kubernetes.io/job-name label, so the Job's
# own name has to stay within a label value (63); the pods of an Indexed Job also get the hostname
# "<job name>-<index>", a DNS label, and the index goes up to 63 (spec.resources.workers <= 64).
MAX_JOB_NAME = 63 - len("-63")
MAX_LABEL_VALUE = 63
CACHE_DIR = "/var/cache/finetune"
SCRATCH_DIR = "/tmp"
TRAINER_UID = 1000
# Annotation on the Job and its pods with the full FineTuneJob name (labels are cut at 63).
ANNOTATION_FINETUNEJOB = "finetune.dev/finetunejob"
# Annotation on the trainer pods with the spec they run (YAML), mounted as the trainer's spec
# file through the downward API: one object to create instead of a Job and a ConfigMap, and the
# spec the trainer runs is on the Job the operator watches anyway.
ANNOTATION_SPEC = "finetune.dev/spec"
DEFAULT_PREEMPTION_GRACE_SECONDS = 60
# Spec fields the operator applies to a running Job; every other change is reported, not applied
# (the immutable ones are refused by the CRD's transition rules before they get here).
MUTABLE_SPEC_FIELDS = ("suspend", "activeDeadlineSeconds", "backoffLimit",
                       "ttlSecondsAfterFinished")
AWS_CREDENTIAL_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                       ("AWS_SESSION_TOKEN", True))


def _fit(name: str, limit: int, suffix: str = "") -> str:
    """`name + suffix` when it fits, else a cut name with a hash of the whole, so distinct long
    names never collide."""
    if len(name) + len(suffix) <= limit:
        return name + suffix
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{name[:keep].rstrip('-.')}-{digest}{suffix}"


def trainer_job_name(finetunejob_name: str) -> str:
    return _fit(finetunejob_name, MAX_JOB_NAME, "-trainer")


def rendezvous_service_name(finetunejob_name: str) -> str:
    # A Service name is a DNS label (63), and "<job>-<index>.<service>" must resolve.
    return _fit(finetunejob_name, MAX_LABEL_VALUE, "-workers")


RENDEZVOUS_PORT = 29500
DEFAULT_METRICS_PORT = 9400
METRICS_PORT_NAME = "metrics"


# One per namespace, shared by its jobs' trainer pods (build_trainer_network_policy).
TRAINER_NETWORK_POLICY_NAME = "finetune-trainers"


def peers_network_policy_name(finetunejob_name: str) -> str:
    return _fit(finetunejob_name, 253, "-peers")


def worker_count(spec: dict[str, Any]) -> int:
    return int((spec.get("resources") or {}).get("workers", 1))


def owned_child_metadata(finetunejob: Manifest, name: str) -> Manifest:
    """Metadata of a plain child (Service, NetworkPolicy): in the FineTuneJob's namespace, labelled
    for selection and owned by it, so garbage collection removes it with the FineTuneJob."""
    meta = finetunejob["metadata"]
    return {"name": name, "namespace": meta["namespace"], "labels": selector_labels(meta["name"]),
            "annotations": {ANNOTATION_FINETUNEJOB: meta["name"]},
            "ownerReferences": [owner_reference(finetunejob)]}


def build_rendezvous_service(finetunejob: Manifest) -> Manifest | None:
    """Headless Service giving the pods of a multi-worker Indexed Job stable DNS names
    (<job>-<index>.<service>); None with one worker."""
    meta = finetunejob["metadata"]
    if worker_count(finetunejob["spec"]) <= 1:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_child_metadata(finetunejob, rendezvous_service_name(meta["name"])),
        "spec": {"clusterIP": "None", "selector": selector_labels(meta["name"]),
                 # Peers must find each other before they are ready.
                 "publishNotReadyAddresses": True,
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT,
                            "targetPort": RENDEZVOUS_PORT, "protocol": "TCP"}]},
    }


def build_trainer_network_policy(namespace: str, config: OperatorConfig) -> Manifest | None:
    """The ingress rule of every trainer pod in a namespace (None when the operator's network
    policies are off). Once a policy selects them, a pod is closed to all ingress the policies
    do not admit: its metrics port (by name: each job chooses the number) is open only to the
    operator's namespace and the configured ones (Prometheus).

    One per namespace, owned by no FineTuneJob: a job's create costs no policy write (it cost a
    third of the API server's work per create in a burst), and it outlives the jobs, selecting
    only trainer pods. It goes with the namespace, or by its managed-by label."""
    if not config.network_policies:
        return None
    namespaces = sorted({config.pod_namespace, *config.metrics_from_namespaces})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": TRAINER_NETWORK_POLICY_NAME, "namespace": namespace,
                         "labels": {contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
                                    contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER}},
            "spec": {"podSelector": {"matchLabels": {
                         contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER,
                         contract.LABEL_MANAGED_BY: contract.MANAGED_BY}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                         {"key": "kubernetes.io/metadata.name", "operator": "In",
                          "values": namespaces}]}}],
                         "ports": [{"protocol": "TCP", "port": METRICS_PORT_NAME}]}]}}


def build_peers_network_policy(finetunejob: Manifest, config: OperatorConfig
                               ) -> Manifest | None:
    """With several workers, the job's pods open to each other on every port (gloo and NCCL
    connect the ranks on ephemeral ports that cannot be pinned); None with one, or when the
    operator's network policies are off. Owned by the FineTuneJob."""
    meta = finetunejob["metadata"]
    if not config.network_policies or worker_count(finetunejob["spec"]) <= 1:
        return None
    trainer_pods = {"matchLabels": selector_labels(meta["name"])}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": owned_child_metadata(finetunejob, peers_network_policy_name(meta["name"])),
            "spec": {"podSelector": trainer_pods, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": trainer_pods}]}]}}


def label_value(finetunejob_name: str) -> str:
    return _fit(finetunejob_name, MAX_LABEL_VALUE)


def selector_labels(finetunejob_name: str) -> dict[str, str]:
    return {contract.LABEL_JOB: label_value(finetunejob_name),
            contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER,
            contract.LABEL_MANAGED_BY: contract.MANAGED_BY}


def owner_reference(finetunejob: Manifest) -> dict[str, Any]:
    meta = finetunejob["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def is_owned_by(child: Manifest, finetunejob_uid: str) -> bool:
    return any(ref.get("uid") == finetunejob_uid and ref.get("controller")
               for ref in child.get("metadata", {}).get("ownerReferences") or [])


def trainer_manifest(finetunejob: Manifest) -> Manifest:
    """What the trainer reads from its spec file: the FineTuneJob as applied, without status."""
    meta = finetunejob["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                         "uid": meta["uid"]},
            "spec": copy.deepcopy(finetunejob["spec"])}


def spec_annotation(finetunejob: Manifest) -> str:
    return yaml.dump(trainer_manifest(finetunejob), Dumper=YamlDumper, sort_keys=False)


def spec_annotation_of(job: Manifest) -> str:
    template_meta = ((job.get("spec") or {}).get("template") or {}).get("metadata") or {}
    return (template_meta.get("annotations") or {}).get(ANNOTATION_SPEC) or ""


def parse_spec_annotation(text: str) -> dict[str, Any]:
    """The spec the trainer runs, from its Job's spec annotation (spec_annotation_of)."""
    manifest = yaml.load(text, Loader=YamlLoader) or {}
    return manifest.get("spec") or {}


def desired_job_suspend(spec: dict[str, Any]) -> bool | None:
    """True/False: what Job.spec.suspend must be. None: Kueue owns it (the Job is created
    suspended and Kueue unsuspends it on admission), unless the user suspends the job."""
    if spec.get("suspend"):
        return True
    if spec.get("queueName"):
        return None
    return False


def _env(spec: dict[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    s3 = spec.get("dataset", {}).get("s3") or {}
    env: list[dict[str, Any]] = [
        {"name": contract.ENV_SPEC,
         "value": f"{contract.SPEC_MOUNT_DIR}/{contract.SPEC_FILE_NAME}"},
        {"name": contract.ENV_CACHE_DIR, "value": CACHE_DIR},
        # The pod has its own network namespace: serve /metrics on its IP for the operator and
        # Prometheus to read.
        {"name": contract.ENV_METRICS_ADDR, "value": "0.0.0.0"},
        # The root filesystem is read-only: libraries that cache under $HOME write to scratch.
        {"name": "HOME", "value": SCRATCH_DIR},
        # In bytes, for the trainer to check that the dataset fits before it downloads it.
        {"name": contract.ENV_EPHEMERAL_STORAGE_LIMIT,
         "valueFrom": {"resourceFieldRef": {"resource": "limits.ephemeral-storage"}}},
        {"name": "AWS_REGION", "value": s3.get("region") or "us-east-1"},
    ]
    if config.pushgateway_url:
        env.append({"name": contract.ENV_PUSHGATEWAY_URL, "value": config.pushgateway_url})
    endpoint = s3.get("endpoint") or config.default_s3_endpoint
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": endpoint})
    secret = s3.get("credentialsSecret")
    if secret:
        # secretKeyRef only resolves in the pod's own namespace: a tenant cannot name another
        # namespace's Secret.
        for key, optional in AWS_CREDENTIAL_KEYS:
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def ephemeral_storage(spec: dict[str, Any], config: OperatorConfig) -> str:
    wanted = (spec.get("resources") or {}).get("ephemeralStorage")
    return str(wanted) if wanted not in (None, "") else config.default_ephemeral_storage


def scratch_size_limit(storage: str) -> str:
    """/tmp's share of the pod's ephemeral storage: a quarter (pretrained downloads, temporary
    files); the dataset cache may use all of it, the pod's limit caps the sum."""
    quarter = int(parse_quantity(storage)) // 4
    for suffix, unit in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if quarter and quarter % unit == 0:
            return f"{quarter // unit}{suffix}"
    return str(quarter)


def _resources(spec: dict[str, Any], config: OperatorConfig, storage: str) -> dict[str, Any]:
    wanted = spec.get("resources") or {}
    amounts: dict[str, Any] = {}
    for field in ("cpu", "memory"):
        if wanted.get(field) not in (None, ""):
            amounts[field] = str(wanted[field])
    amounts["ephemeral-storage"] = storage
    gpus = wanted.get("gpus", 1)
    if gpus:
        amounts[wanted.get("gpuResourceName") or config.default_gpu_resource] = str(gpus)
    # Requests equal limits: a trainer's footprint is known, and extended resources (GPUs) must
    # be equal anyway.
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pod_failure_policy() -> dict[str, Any]:
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                         "values": list(contract.NON_RETRYABLE_EXIT_CODES)}},
        # Preemption, eviction, node drain: retried without counting against backoffLimit; the
        # trainer resumes from its last checkpoint.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # The trainer stopped gracefully on SIGTERM (also a plain pod delete, a suspend, one
        # worker's peers stopping with it) and checkpointed the step it stopped at.
        {"action": "Ignore",
         "onExitCodes": {"containerName": CONTAINER_NAME, "operator": "In",
                         "values": [int(contract.ExitCode.PREEMPTED)]}},
    ]}


def build_trainer_job(finetunejob: Manifest, config: OperatorConfig) -> Manifest:
    meta = finetunejob["metadata"]
    spec = finetunejob["spec"]
    name = meta["name"]
    labels = selector_labels(name)
    if spec.get("queueName"):
        labels = {**labels, contract.LABEL_QUEUE: spec["queueName"]}
    annotations = {ANNOTATION_FINETUNEJOB: name}
    resources = spec.get("resources") or {}
    metrics_port = (spec.get("metrics") or {}).get("port", DEFAULT_METRICS_PORT)
    storage = ephemeral_storage(spec, config)

    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": spec.get("image") or config.trainer_image,
        "command": ["python", "-m", "finetune_trainer", "--spec",
                    f"{contract.SPEC_MOUNT_DIR}/{contract.SPEC_FILE_NAME}"],
        "env": _env(spec, config),
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": metrics_port, "protocol": "TCP"}],
        "volumeMounts": [
            {"name": "spec", "mountPath": contract.SPEC_MOUNT_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "cache", "mountPath": CACHE_DIR},
        ],
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    container["resources"] = _resources(spec, config, storage)

    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # SIGTERM to SIGKILL: the time the trainer has to finish its step and checkpoint it.
        "terminationGracePeriodSeconds": (spec.get("checkpoint") or {}).get(
            "preemptionGraceSeconds", DEFAULT_PREEMPTION_GRACE_SECONDS),
        # The trainer talks to S3, not to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "spec", "downwardAPI": {"items": [{
                "path": contract.SPEC_FILE_NAME,
                "fieldRef": {"fieldPath": f"metadata.annotations['{ANNOTATION_SPEC}']"}}]}},
            {"name": "scratch", "emptyDir": {"sizeLimit": scratch_size_limit(storage)}},
            {"name": "cache", "emptyDir": {"sizeLimit": storage}},
        ],
    }
    if spec.get("serviceAccountName"):
        pod_spec["serviceAccountName"] = spec["serviceAccountName"]
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if resources.get(field):
            pod_spec[field] = copy.deepcopy(resources[field])

    job_spec: dict[str, Any] = {
        "completions": 1,
        "parallelism": 1,
        "backoffLimit": spec.get("backoffLimit", 3),
        "suspend": desired_job_suspend(spec) is not False,
        "podFailurePolicy": pod_failure_policy(),
        # Never two trainers at once writing the same checkpoints: a replacement pod starts
        # only after the previous one has fully terminated.
        "podReplacementPolicy": "Failed",
        "template": {
            "metadata": {"labels": dict(labels),
                         "annotations": {**annotations,
                                         ANNOTATION_SPEC: spec_annotation(finetunejob)}},
            "spec": pod_spec,
        },
    }
    if spec.get("activeDeadlineSeconds"):
        job_spec["activeDeadlineSeconds"] = spec["activeDeadlineSeconds"]
    workers = worker_count(spec)
    if workers > 1:
        # One pod per worker, each knowing its rank from its completion index. Kueue admits the
        # Job as a whole (all pods or none); backoffLimit counts for the whole group, and when
        # one pod dies its peers fail at the next collective (bounded by the rendezvous timeout)
        # and are replaced together, resuming from the last checkpoint.
        job_name = trainer_job_name(name)
        service = rendezvous_service_name(name)
        job_spec.update({"completions": workers, "parallelism": workers,
                         "completionMode": "Indexed"})
        pod_spec["subdomain"] = service
        container["env"] += [
            {"name": "FINETUNE_WORKERS", "value": str(workers)},
            {"name": "MASTER_ADDR", "value": f"{job_name}-0.{service}"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)},
            {"name": "FINETUNE_RENDEZVOUS_TIMEOUT",
             "value": str(config.rendezvous_timeout_seconds)},
        ]
        container["ports"].append({"name": "rendezvous", "containerPort": RENDEZVOUS_PORT,
                                   "protocol": "TCP"})

    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": trainer_job_name(name),
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [owner_reference(finetunejob)],
        },
        "spec": job_spec,
    }


def job_spec_patch(spec: dict[str, Any], job: Manifest) -> dict[str, Any]:
    """The merge patch that brings a live Job in line with the mutable spec fields (empty when it
    already is). Kueue-owned suspension is left alone."""
    current = job.get("spec") or {}
    patch: dict[str, Any] = {}
    suspend = desired_job_suspend(spec)
    if suspend is not None and bool(current.get("suspend")) != suspend:
        patch["suspend"] = suspend
    deadline = spec.get("activeDeadlineSeconds")
    if deadline != current.get("activeDeadlineSeconds"):
        patch["activeDeadlineSeconds"] = deadline
    backoff = spec.get("backoffLimit", 3)
    if backoff != current.get("backoffLimit"):
        patch["backoffLimit"] = backoff
    return {"spec": patch} if patch else {}


def unapplied_spec_changes(spec: dict[str, Any], applied: dict[str, Any]) -> list[str]:
    """Paths (spec.x.y) whose value differs from the spec the trainer runs, other than the fields
    the operator applies to a live Job."""
    def leaves(value: Any, path: str) -> dict[str, Any]:
        if isinstance(value, dict) and value:
            out: dict[str, Any] = {}
            for key, sub in value.items():
                out.update(leaves(sub, f"{path}.{key}"))
            return out
        return {path: value}

    ignore = {f"spec.{field}" for field in MUTABLE_SPEC_FIELDS}
    now = {k: v for k, v in leaves(spec, "spec").items() if k not in ignore}
    before = {k: v for k, v in leaves(applied, "spec").items() if k not in ignore}
    return sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
