"""Multi-tenancy on the local cluster, with the chart installed: a tenant whose only right is the
example's RBAC (a RoleBinding of its group to the chart's edit role, here by impersonation) is
refused each forbidden field at `kubectl apply` by the chart's ValidatingAdmissionPolicy, with the
field and the rule named, and a good job goes through; where the chart's admission policy is off,
the operator refuses the same job before it creates anything (PolicyViolation)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from e2e_support import apply, finetunejob, objects, s3_secret, wait_for, wait_phase
from fixtures_cluster import load_localcluster

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]

REPO_EXAMPLE_RBAC = Path(__file__).resolve().parents[2] / "examples" / "tenant" / "tenant-rbac.yaml"
TENANT = ["--as=alice@example.com", "--as-group=team-vision"]


def forbidden_changes(trainer_image: str) -> dict[str, tuple[dict, str]]:
    """name -> (spec fields to set, the start of the refusal)."""
    return {
        "image": ({"image": "registry.evil/miner:1"},
                  "spec.image: registry.evil/miner:1 is not an allowed trainer image (allowed: "
                  f"{load_localcluster().split_image(trainer_image)['repository']})"),
        "serviceAccountName": ({"serviceAccountName": "default"},
                               "spec.serviceAccountName: default is not allowed"),
        "priorityClassName": ({"resources": {"gpus": 0, "priorityClassName": "system-node-critical"}},
                              "spec.resources.priorityClassName: system-node-critical is not an "
                              "allowed priority class (allowed: none)"),
        "toleration": ({"resources": {"gpus": 0, "tolerations": [{"operator": "Exists"}]}},
                       "spec.resources.tolerations: key (empty: every taint) is not an allowed "
                       "toleration key"),
        "nodeSelector": ({"resources": {"gpus": 0,
                                        "nodeSelector": {"kubernetes.io/hostname": "real-0"}}},
                         "spec.resources.nodeSelector: key kubernetes.io/hostname is not an "
                         "allowed node-selector key"),
        "affinity": ({"resources": {"gpus": 0, "affinity": {"nodeAffinity": {}}}},
                     "spec.resources.affinity: is not allowed"),
        "no credentials": ({"dataset": {"uri": "s3://datasets/x/"}},
                           "spec.dataset.s3.credentialsSecret: is required"),
    }


def _tenant_rbac(kubectl, namespace: str, operator) -> None:
    binding = yaml.safe_load(open(REPO_EXAMPLE_RBAC))
    binding["roleRef"]["name"] = f"{operator.fullname}-edit"
    apply(kubectl, binding, namespace=namespace)
    wait_for(lambda: kubectl("auth", "can-i", "create", "finetunejobs.finetune.dev", "-n",
                             namespace, *TENANT, check=False).strip() == "yes",
             timeout=30, message="the tenant's RBAC")


def _create_as_tenant(kubectl, manifest: dict) -> str:
    """'' when the API server accepts it (server-side dry run), else kubectl's error."""
    try:
        kubectl("create", "--dry-run=server", "-f", "-", *TENANT, input=yaml.safe_dump(manifest))
        return ""
    except AssertionError as refused:
        return str(refused)


def test_a_tenant_is_refused_each_forbidden_field_at_apply(kubectl, namespace, operator_factory,
                                                           cluster_env):
    operator = operator_factory([namespace])
    _tenant_rbac(kubectl, namespace, operator)
    good = finetunejob("good", namespace, "s3://datasets/x/")
    # The policy is in force once the API server has loaded it: the first refusal.
    first_name, (first_change, first_message) = next(iter(
        forbidden_changes(cluster_env["FINETUNE_TRAINER_IMAGE"]).items()))
    wait_for(lambda: first_message in _create_as_tenant(kubectl, {
        **good, "spec": {**good["spec"], **first_change}}), timeout=60,
        message="the ValidatingAdmissionPolicy in force")
    for name, (change, message) in forbidden_changes(
            cluster_env["FINETUNE_TRAINER_IMAGE"]).items():
        manifest = copy.deepcopy(good)
        manifest["spec"].update(copy.deepcopy(change))
        refusal = _create_as_tenant(kubectl, manifest)
        assert message in refusal, f"{name}: {refusal or 'accepted'}"
        assert "ValidatingAdmissionPolicy" in refusal and "denied request" in refusal
    assert _create_as_tenant(kubectl, good) == ""
    trainer_tag = copy.deepcopy(good)
    trainer_tag["spec"]["image"] = cluster_env["FINETUNE_TRAINER_IMAGE"]
    assert _create_as_tenant(kubectl, trainer_tag) == ""
    # The tenant has no rights beyond FineTuneJobs: no pods, no Secrets.
    for resource in ("pods", "secrets", "jobs.batch"):
        assert kubectl("auth", "can-i", "create", resource, "-n", namespace, *TENANT,
                       check=False).strip() == "no"


def test_without_the_admission_policy_the_operator_refuses_before_creating_anything(
        kubectl, namespace, operator_factory, cluster_env):
    operator_factory([namespace], chart_values={"tenancy": {"admissionPolicy": False}}) \
        .wait_leader()
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("miner", namespace, "s3://datasets/x/",
                               image="registry.evil/miner:1", serviceAccountName="default"))
    current = wait_phase(kubectl, namespace, "miner", "Failed", timeout=60)
    assert current["failure"]["reason"] == "PolicyViolation"
    assert current["failure"]["message"].startswith(
        "spec.image: registry.evil/miner:1 is not an allowed trainer image")
    assert "spec.serviceAccountName: default is not allowed" in current["failure"]["message"]
    assert not objects(kubectl, "jobs", namespace)
    assert not objects(kubectl, "networkpolicies", namespace)
    assert not objects(kubectl, "pods", namespace)
