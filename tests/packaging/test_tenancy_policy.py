"""The tenancy policy has one set of rules: the chart's ValidatingAdmissionPolicy (CEL, run here
by cel-python on the rendered template) and the operator's `tenancy.violations` refuse the same
specs with the same messages, for the chart's defaults and for changed values."""

from __future__ import annotations

import copy

import celpy
import pytest

from finetune_api.tenancy import TenancyPolicy, image_repository, violations
from packaging_support import find, render

GOOD = {"dataset": {"uri": "s3://d/x/", "s3": {"credentialsSecret": "s3-credentials"}},
        "model": {"backbone": "efficientnet_lite0"}, "output": {"uri": "s3://m/x/"},
        "resources": {"gpus": 1, "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                      "nodeSelector": {"nvidia.com/gpu.product": "A100"}}}
TRAINER = "registry.example/trainer"


def _with(**changes) -> dict:
    spec = copy.deepcopy(GOOD)
    for path, value in changes.items():
        node, *keys = path.split("__")
        target = spec
        for key in [node, *keys][:-1]:
            target = target.setdefault(key, {})
        if value is None:
            target.pop([node, *keys][-1], None)
        else:
            target[[node, *keys][-1]] = value
    return spec


CASES = {
    "good": GOOD,
    "the trainer image, another tag": _with(image=f"{TRAINER}:2.0"),
    "the trainer image by digest": _with(image=f"{TRAINER}@sha256:" + "a" * 64),
    "another image": _with(image="registry.evil/x:1"),
    "a lookalike repository": _with(image=f"{TRAINER}-evil:1"),
    "a service account": _with(serviceAccountName="admin-sa"),
    "a priority class": _with(resources__priorityClassName="system-cluster-critical"),
    "a toleration of every taint": _with(resources__tolerations=[{"operator": "Exists"}]),
    "a control-plane toleration": _with(resources__tolerations=[
        {"key": "nvidia.com/gpu", "operator": "Exists"},
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]),
    "a node-selector key": _with(resources__nodeSelector={"kubernetes.io/hostname": "node-7"}),
    "affinity": _with(resources__affinity={"nodeAffinity": {}}),
    "no credentials Secret": _with(dataset__s3=None),
    "everything at once": _with(image="registry.evil/x", serviceAccountName="admin-sa",
                                resources__priorityClassName="high", dataset__s3={}),
}
VALUES = {
    "defaults": {},
    "permissive": {"allowedImages": ["registry.example/"], "allowServiceAccountName": True,
                   "allowedPriorityClasses": ["high", "system-cluster-critical"],
                   "allowedTolerationKeys": ["", "nvidia.com/gpu"],
                   "allowedNodeSelectorKeys": ["kubernetes.io/hostname", "nvidia.com/gpu.product"],
                   "allowAffinity": True, "requireCredentialsSecret": False},
}


def _admission(policy: dict, spec: dict) -> list[str]:
    """What the API server's ValidatingAdmissionPolicy says about a CREATE of `spec`: the
    message of every failed validation."""
    env = celpy.Environment()

    def evaluate(expression: str, activation: dict):
        return env.program(env.compile(expression)).evaluate(activation)

    activation = {"object": celpy.json_to_cel({"spec": spec}),
                  "request": celpy.json_to_cel({"operation": "CREATE"})}
    variables = {}
    for variable in policy["spec"]["variables"]:
        variables[variable["name"]] = evaluate(variable["expression"], {
            **activation, "variables": celpy.celtypes.MapType(variables)})
    activation["variables"] = celpy.celtypes.MapType(variables)
    messages = []
    for validation in policy["spec"]["validations"]:
        if not evaluate(validation["expression"], activation):
            messages.append(str(evaluate(validation["messageExpression"], activation))
                            if "messageExpression" in validation else validation["message"])
    return messages


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request, helm, tmp_path_factory):
    tenancy = VALUES[request.param]
    objects = render(helm, {"trainer": {"image": {"repository": TRAINER}}, "tenancy": tenancy},
                     tmp_path_factory.mktemp(request.param))
    policy = find(objects, "ValidatingAdmissionPolicy")[0]
    deployment = find(objects, "Deployment")[0]
    env = {e["name"]: e.get("value", "") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    operator_policy = TenancyPolicy.from_json(env["FINETUNE_TENANCY_POLICY"],
                                              default_image=env["FINETUNE_TRAINER_IMAGE"])
    return request.param, policy, operator_policy


@pytest.mark.parametrize("case", list(CASES))
def test_admission_and_operator_refuse_the_same_fields_with_the_same_words(rendered, case):
    values, policy, operator_policy = rendered
    spec = CASES[case]
    operator_says = violations(spec, operator_policy)
    assert _admission(policy, spec) == operator_says
    if values == "defaults":
        assert bool(operator_says) == (case not in ("good", "the trainer image, another tag",
                                                    "the trainer image by digest"))
    else:  # left to refuse: the image outside registry.example/, a control-plane toleration
        assert bool(operator_says) == (case in ("another image", "everything at once",
                                                "a control-plane toleration"))


def test_the_messages_name_the_field_and_the_rule():
    policy = TenancyPolicy.from_json("", default_image=f"{TRAINER}:0.1.0")
    assert violations(CASES["another image"], policy) == [
        f"spec.image: registry.evil/x:1 is not an allowed trainer image (allowed: {TRAINER})"]
    [everything] = [violations(CASES["everything at once"], policy)]
    assert [message.split(":")[0] for message in everything] == [
        "spec.image", "spec.serviceAccountName", "spec.resources.priorityClassName",
        "spec.dataset.s3.credentialsSecret"]
    assert "node's own credentials" in everything[-1]
    assert violations(CASES["a toleration of every taint"], policy)[0].startswith(
        "spec.resources.tolerations: key (empty: every taint) is not an allowed toleration key")
    assert violations(CASES["affinity"], TenancyPolicy(enabled=False)) == []


@pytest.mark.parametrize("image,repository", [
    ("ghcr.io/a/b:1.0", "ghcr.io/a/b"), ("localhost:5000/b:1", "localhost:5000/b"),
    ("localhost:5000/b", "localhost:5000/b"), ("b@sha256:" + "0" * 64, "b"),
    ("r/b:1@sha256:" + "0" * 64, "r/b")])
def test_image_repository(image, repository):
    assert image_repository(image) == repository


def test_the_binding_covers_the_watched_namespaces_only(helm, tmp_path):
    objects = render(helm, {"watchNamespaces": ["team-a", "team-b"]}, tmp_path)
    binding = find(objects, "ValidatingAdmissionPolicyBinding")[0]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"][0][
        "values"] == ["team-a", "team-b"]
    assert not find(render(helm, {"tenancy": {"admissionPolicy": False}}, tmp_path),
                    "ValidatingAdmissionPolicy")
