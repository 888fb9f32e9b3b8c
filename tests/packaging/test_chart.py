"""The Helm chart rendered by the real `helm`: lint, default and non-default values, the strict
values schema, and the contract between the chart and the operator/trainer code."""

from __future__ import annotations

import json
import re
import sys
import tomllib

import pytest
import yaml

from finetune_api import contract
from packaging_support import CHART, FULL_VALUES, MONITORING, REPO, find, helm_template, one, render, run

OPERATOR_ENV = {  # what the operator reads (issue 5)
    "FINETUNE_TRAINER_IMAGE", "FINETUNE_DEFAULT_S3_ENDPOINT", "FINETUNE_DEFAULT_GPU_RESOURCE",
    "FINETUNE_PUSHGATEWAY_URL", "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS",
    "FINETUNE_WATCH_NAMESPACES", "FINETUNE_OPERATOR_METRICS_PORT", "FINETUNE_OPERATOR_METRICS_ADDR",
    "FINETUNE_LOG_LEVEL", "POD_NAMESPACE", "POD_NAME", "FINETUNE_LEASE_NAME",
    "FINETUNE_DEFAULT_EPHEMERAL_STORAGE", "FINETUNE_MAX_DISRUPTIONS",
    "FINETUNE_START_ERROR_GRACE_SECONDS", "FINETUNE_NETWORK_POLICIES",
    "FINETUNE_METRICS_FROM_NAMESPACES",
}
OPTIONAL_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}


def env_of(deployment: dict) -> dict[str, dict]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


def walk(value, path=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    yield path, value


@pytest.mark.parametrize("values", [None, FULL_VALUES], ids=["default", "full"])
def test_helm_lint_strict(helm, tmp_path, values):
    cmd = [helm, "lint", "--strict", str(CHART)]
    if values:
        (tmp_path / "v.yaml").write_text(yaml.safe_dump(values))
        cmd += ["--values", str(tmp_path / "v.yaml")]
    result = run(cmd)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_default_render_is_the_operator_and_nothing_optional(helm, tmp_path):
    objects = render(helm, None, tmp_path)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    assert not OPTIONAL_KINDS & set(kinds)
    # Optional fields left empty must render nothing, not `null` or "".
    for obj in objects:
        for path, value in walk(obj):
            assert value is not None, f"{obj['kind']} {path} rendered as null"


def test_deployment_runs_the_operator_with_its_configuration(helm, tmp_path):
    objects = render(helm, None, tmp_path)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["finetune-operator"]
    env = env_of(deployment)
    assert OPERATOR_ENV <= set(env)
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["FINETUNE_WATCH_NAMESPACES"]["value"] == ""
    assert env["FINETUNE_OPERATOR_METRICS_PORT"]["value"] == "8080"
    assert env["FINETUNE_DEFAULT_GPU_RESOURCE"]["value"] == "nvidia.com/gpu"
    assert env["FINETUNE_PUSHGATEWAY_URL"]["value"] == ""  # off unless set
    assert env["FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS"]["value"] == "600"
    assert env["FINETUNE_DEFAULT_EPHEMERAL_STORAGE"]["value"] == "20Gi"
    assert env["FINETUNE_MAX_DISRUPTIONS"]["value"] == "3"
    assert env["FINETUNE_START_ERROR_GRACE_SECONDS"]["value"] == "300"
    assert env["FINETUNE_NETWORK_POLICIES"]["value"] == "true"
    assert env["FINETUNE_METRICS_FROM_NAMESPACES"]["value"] == "monitoring"
    assert env["FINETUNE_LEASE_NAME"]["value"] == deployment["metadata"]["name"]
    # Pod selector labels are the Deployment's selector and the Service's.
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    service = one(objects, "Service")
    assert service["spec"]["selector"] == selector
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    # The ServiceAccount the pod runs as is the one the chart creates and binds.
    sa = one(objects, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    for binding in find(objects, "ClusterRoleBinding") + find(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa,
                                        "namespace": "finetune-system"}]


def test_every_setting_the_chart_passes_is_one_the_operator_reads(helm, tmp_path):
    """A FINETUNE_* variable the operator ignores would be a value that silently does nothing."""
    read = set(re.findall(r'"(FINETUNE_[A-Z0-9_]+|POD_[A-Z0-9_]+)"',
                          (REPO / "operator" / "finetune_operator" / "config.py").read_text()))
    assert read, "operator/finetune_operator/config.py reads no FINETUNE_* variables?"
    for values in (None, FULL_VALUES):
        env = env_of(one(render(helm, values, tmp_path), "Deployment"))
        ours = {name for name in env if name.startswith(("FINETUNE_", "POD_"))}
        assert ours <= read, f"the operator does not read {sorted(ours - read)}"


def test_trainer_guardrails_reach_the_operator(helm, tmp_path):
    env = env_of(one(render(helm, FULL_VALUES, tmp_path), "Deployment"))
    assert env["FINETUNE_DEFAULT_EPHEMERAL_STORAGE"]["value"] == "100Gi"
    assert env["FINETUNE_MAX_DISRUPTIONS"]["value"] == "0"
    assert env["FINETUNE_START_ERROR_GRACE_SECONDS"]["value"] == "60"
    assert env["FINETUNE_NETWORK_POLICIES"]["value"] == "false"
    assert env["FINETUNE_METRICS_FROM_NAMESPACES"]["value"] == "monitoring,prometheus"


def test_operator_pod_is_restricted_by_default(helm, tmp_path):
    pod = one(render(helm, None, tmp_path), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root needs somewhere writable: /tmp is an emptyDir and HOME points at it.
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert env_of({"spec": {"template": {"spec": pod}}})["HOME"]["value"] == "/tmp"


def test_images_default_to_app_version_and_digests_pin_them(helm, tmp_path):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == version, "Chart.yaml appVersion must follow pyproject's version"

    default = one(render(helm, None, tmp_path), "Deployment")
    assert default["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"ghcr.io/finetune-dev/finetune-operator:{version}"
    assert env_of(default)["FINETUNE_TRAINER_IMAGE"]["value"] == \
        f"ghcr.io/finetune-dev/finetune-trainer:{version}"

    full = one(render(helm, FULL_VALUES, tmp_path), "Deployment")
    pod = full["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == \
        "ghcr.io/finetune-dev/finetune-operator:1.2.3@sha256:" + "a" * 64
    assert env_of(full)["FINETUNE_TRAINER_IMAGE"]["value"] == \
        f"registry.example/trainer:{version}@sha256:" + "b" * 64
    assert env_of(full)["FINETUNE_PUSHGATEWAY_URL"]["value"] == "http://pushgateway.monitoring:9091"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "system-cluster-critical"
    env = env_of(full)
    assert env["FINETUNE_DEFAULT_S3_ENDPOINT"]["value"] == "http://s3.storage:7070"
    assert env["FINETUNE_LOG_LEVEL"]["value"] == "DEBUG"
    assert env["EXTRA"]["value"] == "1"


def rules_of(role: dict) -> set[tuple]:
    """A role's rules as (apiGroup, resource, verb) triples, so layouts compare by meaning."""
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


def operator_rbac():
    """The rules the operator declares it needs (operator/finetune_operator/rbac.py)."""
    sys.path.insert(0, str(REPO / "operator"))
    from finetune_operator import rbac  # noqa: PLC0415  (plain data, no kopf)
    return rbac


def test_rbac_all_namespaces_is_exactly_the_operators_rules(helm, tmp_path):
    rbac = operator_rbac()
    objects = render(helm, None, tmp_path)
    cluster_role = one(objects, "ClusterRole", name="finetune-operator")
    assert rules_of(cluster_role) == rules_of({"rules": rbac.CLUSTER_RULES})
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "finetune-operator"
    leader = one(objects, "Role", namespace="finetune-system")
    assert rules_of(leader) == rules_of({"rules": rbac.LEADER_ELECTION_RULES})
    # Least privilege: no wildcards, no Secrets (the kubelet resolves the trainer's secretKeyRef).
    granted = rules_of(cluster_role) | rules_of(leader)
    assert not any("*" in t for t in granted)
    assert not any(r == "secrets" for _, r, _ in granted)


def test_rbac_watch_namespaces_is_a_role_per_namespace(helm, tmp_path):
    rbac = operator_rbac()
    objects = render(helm, FULL_VALUES, tmp_path)
    env = env_of(one(objects, "Deployment"))
    assert env["FINETUNE_WATCH_NAMESPACES"]["value"] == "team-a,team-b"
    # Nothing cluster-wide is granted to the operator (the user-facing roles bind to no one).
    assert not find(objects, "ClusterRole", name="finetune-operator")
    assert not find(objects, "ClusterRoleBinding")
    for ns in ("team-a", "team-b"):
        role = one(objects, "Role", namespace=ns)
        binding = one(objects, "RoleBinding", namespace=ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert rules_of(role) == rules_of({"rules": rbac.CLUSTER_RULES})
    namespaces = {o["metadata"].get("namespace") for o in find(objects, "Role")}
    assert namespaces == {"team-a", "team-b", "finetune-system"}


def test_user_roles_aggregate_into_the_builtin_roles(helm, tmp_path):
    objects = render(helm, None, tmp_path)
    edit = one(objects, "ClusterRole", name="finetune-operator-edit")
    view = one(objects, "ClusterRole", name="finetune-operator-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("finetune.dev", "finetunejobs", "create") in rules_of(edit)
    assert ("finetune.dev", "finetunejobs/status", "update") not in rules_of(edit)
    assert {v for _, _, v in rules_of(view)} == {"get", "list", "watch"}
    off = render(helm, {"rbac": {"create": True, "userRoles": False}}, tmp_path)
    assert not find(off, "ClusterRole", name="finetune-operator-edit")


def test_chart_embedded_files_are_in_sync():
    result = run([sys.executable, str(REPO / "helm" / "sync_chart_files.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_monitors_select_the_right_pods_and_label_them(helm, tmp_path):
    objects = render(helm, FULL_VALUES, tmp_path)
    service = one(objects, "Service")
    sm = one(objects, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert sm["spec"]["endpoints"][0]["interval"] == "30s"
    assert {"targetLabel": "job", "replacement": "finetune-operator", "action": "replace"} in \
        sm["spec"]["endpoints"][0]["relabelings"]

    pm = one(objects, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {contract.LABEL_COMPONENT: contract.COMPONENT_TRAINER}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics"
    # Prometheus' Kubernetes discovery sanitises label names: every non [a-zA-Z0-9_] becomes _.
    job_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", contract.LABEL_JOB)
    targets = {r["targetLabel"]: r.get("sourceLabels") for r in endpoint["relabelings"]}
    assert targets["finetunejob"] == [job_label]
    assert targets["namespace"] == ["__meta_kubernetes_namespace"]

    all_ns = one(render(helm, {"podMonitor": {"enabled": True}}, tmp_path), "PodMonitor")
    assert all_ns["spec"]["namespaceSelector"] == {"any": True}


def test_rules_and_dashboard_are_the_monitoring_files(helm, tmp_path):
    objects = render(helm, FULL_VALUES, tmp_path)
    rule = one(objects, "PrometheusRule")
    plain = yaml.safe_load((MONITORING / "finetune-rules.yaml").read_text())
    assert rule["spec"] == plain
    # The checkpoint age threshold is a value; everything else is the file as it is.
    stale = one(render(helm, {**FULL_VALUES, "prometheusRule": {
        **FULL_VALUES["prometheusRule"], "checkpointMaxAgeSeconds": 900}}, tmp_path),
        "PrometheusRule")
    expressions = {r["alert"]: r["expr"] for g in stale["spec"]["groups"] for r in g["rules"]}
    assert "finetune_last_checkpoint_timestamp_seconds) > 900" in \
        expressions["FineTuneJobCheckpointStale"]
    assert "> 3600" in {r["alert"]: r["expr"] for g in plain["groups"]
                        for r in g["rules"]}["FineTuneJobCheckpointStale"]
    dashboard = one(objects, "ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Training"}
    (content,) = dashboard["data"].values()
    assert json.loads(content) == json.loads((MONITORING / "dashboard.json").read_text())


@pytest.mark.parametrize("values, message", [
    ({"serviceMonitr": {"enabled": True}}, "serviceMonitr"),
    ({"image": {"respository": "x"}}, "respository"),
    ({"podMonitor": {"enabeld": True}}, "enabeld"),
    ({"replicaCount": "two"}, "replicaCount"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"watchNamespaces": "team-a"}, "watchNamespaces"),
    ({"logLevel": "verbose"}, "logLevel"),
    ({"trainer": {"ephemeralStorage": "lots"}}, "ephemeralStorage"),
    ({"networkPolicy": {"enabled": True, "metricsFromNamespaces": ["Monitoring"]}},
     "metricsFromNamespaces"),
], ids=["top-level-typo", "nested-typo", "monitor-typo", "wrong-type", "bad-digest",
        "namespaces-not-a-list", "unknown-log-level", "bad-quantity", "bad-namespace"])
def test_values_schema_rejects_mistakes(helm, tmp_path, values, message):
    result = helm_template(helm, values, tmp_path)
    assert result.returncode != 0, f"{values} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert message in result.stderr


def test_every_value_has_a_comment_above_it():
    """helm-create style: each key of values.yaml the chart defines is documented in place."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    undocumented = []
    for i, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        node = schema
        for _, parent in stack:
            node = node.get("properties", {}).get(parent, {})
        stack.append((indent, key))
        if key not in node.get("properties", {}):
            continue  # inside a pass-through Kubernetes object (securityContext, probes)
        previous = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        if not previous.strip().startswith("#"):
            undocumented.append(".".join(k for _, k in stack))
    assert not undocumented, f"values without a comment above them: {undocumented}"


def test_schema_is_strict_everywhere_the_chart_defines_keys():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def check(node: dict, path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} is not strict"
            for key, child in node["properties"].items():
                check(child, f"{path}.{key}")
    check(schema, "")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


def test_chart_crd_is_the_generated_one():
    generated = (REPO / "crds" / "finetune.dev_finetunejobs.yaml").read_text()
    assert (CHART / "crds" / "finetune.dev_finetunejobs.yaml").read_text() == generated
