"""The chart against the real local cluster (tests/cluster's control plane, RBAC enabled): every
rendered object accepted by the API server, a real helm install / upgrade / uninstall, RBAC checked
with the API server's own authorizer, and the example job run by an operator that holds only the
chart's permissions."""

from __future__ import annotations

import shutil
import copy
import json
import os
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest
import yaml

from fixtures_cluster import wait_for
from packaging_support import CHART, FULL_VALUES, REPO, render

pytestmark = pytest.mark.cluster

MONITORING_GROUP = "monitoring.coreos.com/v1"
RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep",
                        "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"]},
    "sourceLabels": {"type": "array", "items": {"type": "string",
                                                 "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"},
    "regex": {"type": "string"}, "modulus": {"type": "integer"},
    "replacement": {"type": "string"}}}
ENDPOINT = {"type": "object", "required": ["port"], "properties": {
    "port": {"type": "string"}, "path": {"type": "string"},
    "interval": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    "scrapeTimeout": {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$"},
    "relabelings": {"type": "array", "items": RELABEL},
    "metricRelabelings": {"type": "array", "items": RELABEL}}}
SELECTOR = {"type": "object", "required": ["matchLabels"],
            "properties": {"matchLabels": {"type": "object",
                                           "additionalProperties": {"type": "string"}}}}
NAMESPACE_SELECTOR = {"type": "object", "properties": {
    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}}
# The fields of the Prometheus Operator's CRDs (v0.7x, monitoring.coreos.com/v1) the chart uses,
# transcribed from their OpenAPI schemas: those CRDs are not installed in the local cluster, so
# these three kinds are checked structurally here instead of by a server-side dry run.
MONITORING_SCHEMAS = {
    "ServiceMonitor": {"type": "object", "required": ["selector", "endpoints"], "properties": {
        "selector": SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
        "endpoints": {"type": "array", "minItems": 1, "items": ENDPOINT}}},
    "PodMonitor": {"type": "object", "required": ["selector", "podMetricsEndpoints"],
                   "properties": {"selector": SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
                                  "podMetricsEndpoints": {"type": "array", "minItems": 1,
                                                          "items": ENDPOINT}}},
    "PrometheusRule": {"type": "object", "required": ["groups"], "additionalProperties": False,
                       "properties": {"groups": {"type": "array", "items": {
                           "type": "object", "required": ["name", "rules"],
                           "properties": {"name": {"type": "string"}, "rules": {
                               "type": "array", "items": {
                                   "type": "object", "required": ["expr"],
                                   "additionalProperties": False,
                                   "properties": {
                                       "alert": {"type": "string"}, "record": {"type": "string"},
                                       "expr": {"type": "string"}, "for": {"type": "string"},
                                       "labels": {"type": "object"},
                                       "annotations": {"type": "object"}}}}}}}}},
}


class Kube:
    def __init__(self, cluster: dict[str, str], kubectl: str):
        self.env = {**os.environ, **cluster}
        self.kubectl_path = kubectl

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True,
                kubeconfig: str | None = None, timeout: float = 120
                ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env, **({"KUBECONFIG": kubeconfig} if kubeconfig else {}))
        result = subprocess.run([self.kubectl_path, *args], input=stdin, capture_output=True,
                                text=True, env=env, timeout=timeout)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def helm(self, helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([helm, *args], capture_output=True, text=True, env=self.env,
                                timeout=300)
        if check:
            assert result.returncode == 0, f"helm {' '.join(args)}: {result.stderr}"
        return result

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)


@pytest.fixture(scope="module")
def kube(cluster_env, kubectl_bin) -> Kube:
    kube = Kube(cluster_env, kubectl_bin)
    kube.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                 str(REPO / "crds" / "finetune.dev_finetunejobs.yaml"))
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                 "crd/finetunejobs.finetune.dev")
    return kube


@pytest.fixture()
def namespaces(kube):
    """Fresh namespaces for one test, deleted afterwards: make(suffix) -> name."""
    made: list[str] = []
    run_id = uuid.uuid4().hex[:6]

    def make(suffix: str) -> str:
        name = f"pkg-{run_id}-{suffix}"
        kube.kubectl("create", "namespace", name)
        made.append(name)
        return name
    yield make
    for name in made:
        kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_every_rendered_object_is_accepted_by_the_api_server(kube, helm, namespaces, tmp_path):
    release_ns, team_a, team_b, monitoring = (namespaces(s) for s in ("sys", "a", "b", "mon"))
    values = copy.deepcopy(FULL_VALUES)
    values["watchNamespaces"] = [team_a, team_b]
    values["grafanaDashboard"]["namespace"] = monitoring
    values["priorityClassName"] = ""  # system-cluster-critical is refused outside kube-system
    for variant in (None, values):
        objects = render(helm, variant, tmp_path, release=f"dry-{uuid.uuid4().hex[:4]}",
                         namespace=release_ns)
        core = [o for o in objects if o["apiVersion"] != MONITORING_GROUP]
        result = kube.kubectl("apply", "--dry-run=server", "-f", "-",
                              stdin=yaml.safe_dump_all(core))
        accepted = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
        assert len(accepted) == len(core), result.stdout
        for obj in objects:
            if obj["apiVersion"] == MONITORING_GROUP:
                jsonschema.validate(obj["spec"], MONITORING_SCHEMAS[obj["kind"]])
    assert {o["kind"] for o in objects if o["apiVersion"] == MONITORING_GROUP} == \
        set(MONITORING_SCHEMAS)


def test_values_typo_fails_helm_install(kube, helm, namespaces):
    ns = namespaces("typo")
    result = kube.helm(helm, "install", "typo", str(CHART), "-n", ns, "--set",
                       "podMonitor.enabeld=true", check=False)
    assert result.returncode != 0
    assert "additional properties 'enabeld' not allowed" in result.stderr
    assert kube.helm(helm, "list", "-n", ns, "-q").stdout.strip() == ""


def can_i(kube: Kube, sa: str, verb: str, resource: str, namespace: str) -> bool:
    """The API server's own authorizer (SubjectAccessReview) on resource[/subresource]."""
    resource, _, subresource = resource.partition("/")
    result = kube.kubectl("auth", "can-i", verb, resource, f"--as={sa}", "-n", namespace,
                          *([f"--subresource={subresource}"] if subresource else []), check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stderr
    return result.stdout.strip() == "yes"


def local_values(cluster_env: dict, watch: list[str], tmp_path: Path) -> str:
    """Values that run the chart's Deployment on the local cluster (its images, S3, API address)."""
    from fixtures_cluster import load_localcluster

    path = tmp_path / "local-values.json"
    path.write_text(json.dumps(load_localcluster().operator_chart_values(cluster_env, watch)))
    return str(path)


def test_install_grants_least_privilege_upgrades_and_uninstalls_cleanly(kube, helm, namespaces,
                                                                       cluster_env, tmp_path):
    ns, team = namespaces("op"), namespaces("team")
    other = namespaces("other")
    release = f"ftop-{uuid.uuid4().hex[:4]}"
    # --wait: until the operator's pod passes its readiness probe on the real node.
    kube.helm(helm, "install", release, str(CHART), "-n", ns, "-f",
              local_values(cluster_env, [team], tmp_path), "--set", f"watchNamespaces={{{team}}}",
              "--wait", "--timeout", "180s")
    fullname = f"{release}-finetune-operator"
    deployment = kube.get("deployment", fullname, "-n", ns)
    assert deployment["status"].get("readyReplicas") == 1
    sa = f"system:serviceaccount:{ns}:{fullname}"
    # What the operator must do, in the watched namespace...
    for verb, resource in [("watch", "finetunejobs.finetune.dev"),
                           ("patch", "finetunejobs.finetune.dev/status"),
                           ("create", "jobs.batch"), ("list", "pods"),
                           ("create", "networkpolicies.networking.k8s.io"),
                           ("patch", "networkpolicies.networking.k8s.io"),
                           ("update", "finetunejobs.finetune.dev/finalizers"),
                           ("create", "events"), ("list", "events")]:
        assert can_i(kube, sa, verb, resource, team), f"cannot {verb} {resource}"
    assert can_i(kube, sa, "update", "leases.coordination.k8s.io", ns)
    # ...and nothing more: no Secrets, no spec writes, nothing outside the watched namespace.
    assert not can_i(kube, sa, "get", "secrets", team)
    assert not can_i(kube, sa, "update", "finetunejobs.finetune.dev", team)
    assert not can_i(kube, sa, "create", "jobs.batch", other)
    assert not can_i(kube, sa, "update", "leases.coordination.k8s.io", team)

    kube.helm(helm, "upgrade", release, str(CHART), "-n", ns, "--reuse-values",
              "--set", "logLevel=DEBUG", "--set", f"watchNamespaces={{{team},{other}}}")
    deployment = kube.get("deployment", fullname, "-n", ns)
    env = {e["name"]: e.get("value") for e in
           deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FINETUNE_LOG_LEVEL"] == "DEBUG"
    assert env["FINETUNE_WATCH_NAMESPACES"] == f"{team},{other}"
    assert can_i(kube, sa, "create", "jobs.batch", other)

    kube.helm(helm, "uninstall", release, "-n", ns, "--wait", "--timeout", "120s")
    selector = f"app.kubernetes.io/instance={release}"
    for namespace in (ns, team, other):
        left = kube.get("deployments,services,serviceaccounts,roles,rolebindings,configmaps",
                        "-n", namespace, "-l", selector)["items"]
        assert left == [], [o["metadata"]["name"] for o in left]
    left = kube.get("clusterroles,clusterrolebindings", "-l", selector)["items"]
    assert left == [], [o["metadata"]["name"] for o in left]
    # The CRD stays (Helm never deletes crds/), and with it every FineTuneJob.
    kube.get("crd", "finetunejobs.finetune.dev")


def test_applying_the_tenant_example_twice_changes_nothing(kube, namespaces, tmp_path):
    ns = namespaces("tenant")
    work = tmp_path / "tenant"
    shutil.copytree(REPO / "examples" / "tenant", work)
    shutil.copy(work / "s3-credentials.env.example", work / "s3-credentials.env")
    built = [d for d in yaml.safe_load_all(kube.kubectl("kustomize", str(work)).stdout) if d]
    docs = []
    for obj in built:
        if obj["kind"] == "Namespace":
            continue  # use the test's own namespace
        obj["metadata"]["namespace"] = ns
        docs.append(obj)
    manifest = yaml.safe_dump_all(docs)
    first = kube.kubectl("apply", "-f", "-", stdin=manifest, check=False)
    if first.returncode != 0:
        # The new ResourceQuota is not counted yet: applied again, as the example says.
        assert "status unknown for quota" in first.stderr, first.stderr
        def counted():
            status = kube.get("resourcequota", "-n", ns)["items"][0].get("status") or {}
            return status.get("hard") and set(status["hard"]) <= set(status.get("used") or {})
        # A resource the quota controller found by discovery since its last pass (the CRD)
        # is counted at its next one.
        wait_for(counted, timeout=120, message="the quota counted")
        first = kube.kubectl("apply", "-f", "-", stdin=manifest)
    assert "created" in first.stdout
    time.sleep(2)  # let anything that would react (an operator watching all namespaces) react
    second = kube.kubectl("apply", "-f", "-", stdin=manifest).stdout.splitlines()
    assert second and all(line.endswith("unchanged") for line in second), second
    ftj = kube.get("finetunejob", "flowers-efficientnet", "-n", ns)
    assert ftj["metadata"]["generation"] == 1


# --- the example job, run by an operator holding only the chart's RBAC ----------------------


@pytest.fixture()
def fashion_mnist_in_s3(s3_client, tmp_path):
    """What examples/fashion-mnist.yaml reads: s3://datasets/fashion-mnist/ (10 classes x 10
    training + 3 validation images, 32 px) and the models bucket it writes to."""
    from finetune_trainer.samples import write_fashion_mnist

    existing = {b["Name"] for b in s3_client.list_buckets().get("Buckets", [])}
    for bucket in ("datasets", "models"):
        if bucket not in existing:
            s3_client.create_bucket(Bucket=bucket)
    root = write_fashion_mnist(tmp_path / "fashion-mnist", per_class=10, val_per_class=3,
                               image_size=32, seed=0)
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            s3_client.upload_file(str(path), "datasets",
                                  "fashion-mnist/" + path.relative_to(root).as_posix())
    # The example's output prefix is fixed: another namespace's run of it (a test, an earlier
    # session on the same cluster) holds it, and the trainer would refuse it as OutputInUse.
    s3_client.delete_object(Bucket="models", Key="fashion-mnist/.finetune-owner.json")


@pytest.mark.slow
def test_example_job_succeeds_with_the_installed_operators_rbac(kube, helm, namespaces, tmp_path,
                                                               cluster_env, fashion_mnist_in_s3):
    """helm install, and the chart's Deployment runs the operator from its image on the real
    node: in-cluster configuration, the chart's ServiceAccount token and RBAC (a permission the
    chart lacks fails the job), its probes, its pod security settings."""
    ns, team = namespaces("e2e-op"), namespaces("e2e")
    release = "e2e"
    kube.helm(helm, "install", release, str(CHART), "-n", ns, "--skip-crds", "-f",
              local_values(cluster_env, [team], tmp_path))
    fullname = f"{release}-finetune-operator"
    try:
        # Ready means the readiness probe (GET /metrics on the pod IP) passed.
        kube.kubectl("rollout", "status", f"deployment/{fullname}", "-n", ns, "--timeout=180s",
                     timeout=200)
        pod, = kube.get("pods", "-n", ns, "-l", f"app.kubernetes.io/instance={release}")["items"]
        assert pod["spec"]["nodeName"] == cluster_env["FINETUNE_NODE_NAME"]
        assert pod["spec"]["serviceAccountName"] == fullname
        operator_status, = pod["status"]["containerStatuses"]
        assert operator_status["ready"] and operator_status["restartCount"] == 0

        kube.kubectl("apply", "-n", team, "-f", str(REPO / "examples" / "fashion-mnist.yaml"))
        waited = kube.kubectl("wait", "--for=condition=Succeeded", "--timeout=600s",
                              "finetunejob/fashion-mnist", "-n", team, check=False, timeout=620)
        ftj = kube.get("finetunejob", "fashion-mnist", "-n", team)
        operator_log = kube.kubectl("logs", f"deployment/{fullname}", "-n", ns, check=False).stdout
        assert waited.returncode == 0, (
            f"status: {json.dumps(ftj.get('status'), indent=1)}\n"
            f"operator log tail:\n{operator_log[-4000:]}")
        assert ftj["status"]["phase"] == "Succeeded"
        assert "starting: watching" in operator_log  # the log is the pod's, through the kubelet
        assert "forbidden" not in operator_log.lower(), operator_log[-4000:]
    finally:
        kube.helm(helm, "uninstall", release, "-n", ns, check=False)


def test_real_prometheus_loads_the_alert_rules(cluster_env, prometheus_url):
    """The local cluster's Prometheus (Debian's) loads monitoring/finetune-rules.yaml as is."""
    rules_dir = Path(cluster_env["FINETUNE_PROMETHEUS_RULES_DIR"])
    rules_dir.mkdir(parents=True, exist_ok=True)
    target = rules_dir / f"packaging-{uuid.uuid4().hex[:6]}.yaml"
    shutil.copy(REPO / "monitoring" / "finetune-rules.yaml", target)
    expected = {g["name"]: {r["alert"] for r in g["rules"]} for g in
                yaml.safe_load(target.read_text())["groups"]}

    def reload() -> None:
        request = urllib.request.Request(f"{prometheus_url}/-/reload", method="POST")
        urllib.request.urlopen(request, timeout=10).close()

    def loaded() -> dict[str, dict]:
        with urllib.request.urlopen(f"{prometheus_url}/api/v1/rules?type=alert", timeout=10) as r:
            groups = json.load(r)["data"]["groups"]
        return {g["name"]: g for g in groups if g["file"] == str(target)}

    def evaluated() -> dict[str, dict] | None:
        """Our groups once every rule has been evaluated (health is "unknown" before)."""
        groups = loaded()
        rules = [r for g in groups.values() for r in g["rules"]]
        return groups if set(groups) == set(expected) and all(
            r["health"] != "unknown" for r in rules) else None
    try:
        reload()
        deadline = time.monotonic() + 30
        while not (groups := evaluated()) and time.monotonic() < deadline:
            time.sleep(1)
        assert groups, f"rules not loaded and evaluated: {loaded()}"
        for name, alerts in expected.items():
            assert {r["name"] for r in groups[name]["rules"]} == alerts
            for rule in groups[name]["rules"]:
                assert rule["health"] == "ok", rule
    finally:
        target.unlink()
        reload()
