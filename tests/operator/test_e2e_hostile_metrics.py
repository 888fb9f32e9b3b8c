"""A trainer pod's /metrics is the tenant's: end to end, pods that serve a 100 MB body, a slow
drip or garbage run beside a normal job, and the normal job's progress keeps updating while the
operator stays leader, unrestarted, within its memory.

The pods run on a fake node of the test's own, played by a second kwok with the cluster's
stages less `pod-complete` (the cluster's kwok completes every Job pod at once), so they stay
Running and need no image. Their endpoints are served by metrics_standins.py inside the
cluster's network namespace, on the very pod IPs kwok gave them (from a part of kwok's pod CIDR,
routed nowhere else), so the operator (the chart's Deployment, on the real node) reads them as it
reads any trainer."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from e2e_support import apply, finetunejob, objects, status, wait_for, wait_phase
from test_e2e_leader import container_pid, lease_holder

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]

REPO = Path(__file__).resolve().parents[2]
STANDIN_TAINT_KEY = "finetune.dev/test-standin"
BEHAVIOURS = ("normal", "huge", "drip", "garbage")
RSS_LIMIT_BYTES = 200 * 2**20


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def network(cluster_env: dict):
    return load("realnode").Network(Path(cluster_env["FINETUNE_CLUSTER_DIR"]))


@pytest.fixture
def standin_node(kubectl, cluster_env, tmp_path):
    """A fake node whose pods stay Running; yields the placement (nodeSelector, tolerations)."""
    localcluster = load("localcluster")
    run_id = uuid.uuid4().hex[:6]
    name, product = f"standin-{run_id}", f"TEST-STANDIN-{run_id}"
    taints = [dict(localcluster.FAKE_NODE_TAINT),
              {"key": STANDIN_TAINT_KEY, "value": run_id, "effect": "NoSchedule"}]
    capacity = {"cpu": "100", "memory": "1Ti", "pods": "20", "ephemeral-storage": "1Pi"}
    kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
                                              "nvidia.com/gpu.product": product},
                     "annotations": {"kwok.x-k8s.io/node": name,
                                     "node.alpha.kubernetes.io/ttl": "0"}},
        "spec": {"taints": taints}, "status": {"capacity": capacity, "allocatable": capacity}}))
    documents = (REPO / "cluster" / "kwok-stages.yaml").read_text().split("\n---\n")
    stages = tmp_path / "kwok-stages.yaml"
    stages.write_text("\n---\n".join(d for d in documents
                                      if "\n  name: pod-complete\n" not in d))
    # The upper half of kwok's pod CIDR: the cluster's kwok counts up from the bottom. The real
    # node's pods route the range into the cluster network namespace (localcluster).
    cidr = str(list(ipaddress.ip_network(localcluster.KWOK_POD_CIDR).subnets(1))[1])
    kwok = subprocess.Popen(
        [str(Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
             / "bin" / "kwok"),
         f"--kubeconfig={cluster_env['KUBECONFIG']}", f"--config={stages}",
         f"--manage-single-node={name}", "--node-ip=127.0.0.1", f"--cidr={cidr}",
         "--node-lease-duration-seconds=40"],
        stdout=open(tmp_path / "kwok.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        yield {"nodeSelector": {"nvidia.com/gpu.product": product},
               "tolerations": [{"operator": "Equal", **taint} for taint in taints]}
    finally:
        kwok.terminate()
        kwok.wait(timeout=30)
        kubectl("delete", "node", name, "--wait=false", check=False)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_hostile_metrics_endpoints_cannot_stall_the_operator(kubectl, namespace, operator_factory,
                                                            cluster_env, standin_node):
    tenancy = {"allowedTolerationKeys": ["kwok.x-k8s.io/node", STANDIN_TAINT_KEY]}
    operator = operator_factory([namespace], chart_values={"tenancy": tenancy},
                                FINETUNE_PROGRESS_INTERVAL_SECONDS="2").wait_leader()
    leader = operator.leader()
    identity = lease_holder(kubectl, namespace, operator.fullname)
    for kind in BEHAVIOURS:
        apply(kubectl, finetunejob(kind, namespace, "s3://datasets/x/",
                                   resources={"gpus": 0, **standin_node}, epochs=10000))
    for kind in BEHAVIOURS:
        wait_phase(kubectl, namespace, kind, "Running", timeout=120)
    pod_ips = {}
    for pod in objects(kubectl, "pods", namespace):
        owner = pod["metadata"]["annotations"]["finetune.dev/finetunejob"]
        pod_ips[pod["status"]["podIP"]] = owner
    assert sorted(pod_ips.values()) == sorted(BEHAVIOURS)

    config = {"port": 9400, "pods": pod_ips}
    standins = subprocess.Popen(
        network(cluster_env).exec_prefix() + [sys.executable, str(Path(__file__).parent /
                                                             "metrics_standins.py"),
                                          json.dumps(config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert standins.stdout.readline().strip() == "ready"
        epochs_seen = []

        def normal_epoch_moved_three_times() -> bool:
            epoch = (status(kubectl, namespace, "normal").get("progress") or {}).get("epoch")
            if epoch is not None and (not epochs_seen or epoch != epochs_seen[-1]):
                epochs_seen.append(epoch)
            return len(epochs_seen) >= 4

        try:
            wait_for(normal_epoch_moved_three_times, timeout=120,
                     message="the normal job's progress to move while the others misbehave")
        except AssertionError as error:
            reads = {result: operator.metric("finetune_operator_progress_reads_total",
                                             result=result) for result in ("success", "error")}
            raise AssertionError(f"{error}; reads {reads}; pods {pod_ips}; normal: "
                                 f"{status(kubectl, namespace, 'normal')}") from None
        assert epochs_seen == sorted(epochs_seen)
        # The misbehaving jobs never got a progress from their endpoints, and are still running.
        for kind in ("huge", "drip", "garbage"):
            current = status(kubectl, namespace, kind)
            assert current["phase"] == "Running"
            assert "progress" not in current
        # The operator read them (and failed), stayed leader, was not restarted, kept its memory.
        assert operator.metric("finetune_operator_progress_reads_total", result="error") >= 6
        assert lease_holder(kubectl, namespace, operator.fullname) == identity
        current_pod, = operator.pods()
        assert current_pod["metadata"]["name"] == leader["metadata"]["name"]
        assert current_pod["status"]["containerStatuses"][0].get("restartCount", 0) == 0
        assert rss_bytes(container_pid(current_pod)) < RSS_LIMIT_BYTES
    finally:
        standins.stdin.close()
        standins.wait(timeout=30)
