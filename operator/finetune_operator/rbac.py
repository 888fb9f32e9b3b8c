"""The permissions the operator needs, as data: the Helm chart's ClusterRole and Role must grant
exactly these (a test compares them). Nothing here lets the operator read Secrets: the trainer pod
gets credentials through secretKeyRef, which the kubelet resolves in the pod's own namespace."""

from __future__ import annotations

from typing import Any

PolicyRule = dict[str, Any]

# ClusterRole (or a Role per namespace in FINETUNE_WATCH_NAMESPACES).
CLUSTER_RULES: list[PolicyRule] = [
    # Watch FineTuneJobs, write their status and delete them when ttlSecondsAfterFinished has
    # passed. No update/patch of the main resource: the
    # operator never writes spec, labels or annotations.
    {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs"],
     "verbs": ["get", "list", "watch", "delete"]},
    {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/status"],
     "verbs": ["get", "patch"]},
    # Children's ownerReferences set blockOwnerDeletion (foreground deletion waits for them);
    # with the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) that needs
    # update on the owner's finalizers.
    {"apiGroups": ["finetune.dev"], "resources": ["finetunejobs/finalizers"],
     "verbs": ["update"]},
    # The trainer Job: create, track, suspend/resume and patch its mutable fields.
    {"apiGroups": ["batch"], "resources": ["jobs"],
     "verbs": ["get", "list", "watch", "create", "patch"]},
    # Pods are only observed (scheduling messages, waiting reasons, termination messages, podIP).
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # Headless Service for the rendezvous of multi-worker jobs (spec.resources.workers > 1).
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    # The ingress rules of trainer pods (FINETUNE_NETWORK_POLICIES): one per namespace, kept
    # as built (patch), and one per multi-worker job.
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
     "verbs": ["get", "create", "patch"]},
    # Phase transitions as Events on the FineTuneJob; the Job controller's FailedCreate Events
    # read to say why a Job has no pods.
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]

# Role in the operator's own namespace (POD_NAMESPACE): leader election.
LEADER_ELECTION_RULES: list[PolicyRule] = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
     "verbs": ["get", "create", "update"]},
]


def cluster_role(name: str = "finetune-operator") -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": name}, "rules": CLUSTER_RULES}


def leader_election_role(namespace: str, name: str = "finetune-operator-leader-election"
                         ) -> dict[str, Any]:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": name, "namespace": namespace}, "rules": LEADER_ELECTION_RULES}
