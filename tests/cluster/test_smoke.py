"""Smoke tests of the local cluster itself: API server, controllers, scheduler, kwok nodes, the pod
agent, S3 and Prometheus, each exercised for real."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import urllib.request
from pathlib import Path

import pytest
from fixtures_cluster import read_env_file, wait_for

pytestmark = pytest.mark.cluster

TRAINER_LABELS = {"finetune.dev/component": "trainer"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def apply(kubectl, namespace: str | None, *manifests: dict) -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    kubectl(*args, input="\n---\n".join(json.dumps(m) for m in manifests))


def get(kubectl, namespace: str, kind: str, name: str) -> dict:
    return json.loads(kubectl("get", kind, name, "-n", namespace, "-o", "json"))


def job(name: str, containers: list[dict], labels: dict | None = None, **pod_spec) -> dict:
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": 0, "template": {
            "metadata": {"labels": labels or {}},
            "spec": {"restartPolicy": "Never", "containers": containers, **pod_spec}}},
    }


def trainer_pod(name: str, script: str, **container) -> dict:
    """A pod the pod agent runs: `python -c script` on this machine."""
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": dict(TRAINER_LABELS)},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                 "containers": [{"name": "trainer", "image": "finetune-trainer:dev",
                                 "command": ["python", "-c", textwrap.dedent(script)], **container}]},
    }


def pod_finished(kubectl, namespace: str, name: str) -> dict | None:
    pod = get(kubectl, namespace, "pod", name)
    return pod if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") else None


def test_crd_and_custom_resource_round_trip(kubectl, namespace):
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.smoke.finetune.dev"},
        "spec": {"group": "smoke.finetune.dev", "scope": "Namespaced",
                 "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                     "openAPIV3Schema": {"type": "object", "properties": {"spec": {
                         "type": "object", "properties": {"size": {"type": "integer"}}}}}}}]},
    }
    apply(kubectl, None, crd)
    try:
        kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.finetune.dev", "--timeout=30s")
        widget = {"apiVersion": "smoke.finetune.dev/v1", "kind": "Widget",
                  "metadata": {"name": "w1"}, "spec": {"size": 3}}
        wait_for(lambda: apply(kubectl, namespace, widget) or True, timeout=20,
                 message="the Widget kind to be served")
        assert get(kubectl, namespace, "widget", "w1")["spec"] == {"size": 3}
    finally:
        kubectl("delete", "crd", "widgets.smoke.finetune.dev", "--wait=false", check=False)


def test_gpu_job_is_scheduled_on_a_node_with_enough_gpus_and_completes(kubectl, namespace):
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    apply(kubectl, namespace, job("two-gpus", [container], tolerations=[GPU_TOLERATION]))
    kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/two-gpus", "--timeout=60s")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=two-gpus",
                              "-o", "json"))["items"]
    assert [p["spec"]["nodeName"] for p in pods] == ["gpu-a100-0"]
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_job_asking_more_gpus_than_any_node_stays_pending(kubectl, namespace):
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
    apply(kubectl, namespace, job("eight-gpus", [container], tolerations=[GPU_TOLERATION]))

    def unschedulable():
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        for pod in pods:
            for condition in pod.get("status", {}).get("conditions", []):
                if condition["type"] == "PodScheduled" and condition["status"] == "False":
                    return pod, condition
        return None
    pod, condition = wait_for(unschedulable, timeout=60, message="PodScheduled=False")
    assert condition["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in condition["message"]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")


def test_taint_keeps_pods_without_toleration_off_the_a100_node(kubectl, namespace):
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "2"}}}
    apply(kubectl, namespace, job("no-toleration", [container]))
    pod = wait_for(lambda: next(iter(json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]), None),
                   timeout=30, message="the Job's pod")
    condition = wait_for(lambda: next((c for c in get(kubectl, namespace, "pod", pod["metadata"]["name"])
                                       .get("status", {}).get("conditions", [])
                                       if c["type"] == "PodScheduled" and c["status"] == "False"), None),
                         timeout=60, message="PodScheduled=False")
    assert "untolerated taint" in condition["message"] and "nvidia.com/gpu" in condition["message"]


def test_job_owned_by_a_deleted_parent_is_garbage_collected(kubectl, namespace):
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "parent"}})
    parent = get(kubectl, namespace, "configmap", "parent")
    child = job("child", [{"name": "c", "image": "busybox"}])
    child["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "parent",
                                             "uid": parent["metadata"]["uid"]}]
    apply(kubectl, namespace, child)
    kubectl("delete", "configmap", "parent", "-n", namespace)
    wait_for(lambda: kubectl("get", "job", "child", "-n", namespace, "--ignore-not-found", "-o", "name") == "",
             timeout=60, message="the garbage collector to delete the Job")


def test_agent_runs_trainer_pod_with_mounts_and_termination_message(kubectl, namespace):
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                               "data": {"greeting": "hello from a configmap"}})
    script = """
        import os, pathlib
        greeting = pathlib.Path("/etc/finetune/greeting").read_text()
        out = pathlib.Path(os.environ["OUTPUT_DIR"]) / "result.txt"
        out.write_text(greeting.upper())
        message = f"{out.read_text()} pod={os.environ['POD_NAME']} port={os.environ['FINETUNE_METRICS_PORT']}"
        pathlib.Path(os.environ["FINETUNE_TERMINATION_LOG"]).write_text(message)
    """
    pod = trainer_pod("ok", script,
                      env=[{"name": "OUTPUT_DIR", "value": "/workspace/out"},
                           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                      volumeMounts=[{"name": "cfg", "mountPath": "/etc/finetune"},
                                    {"name": "scratch", "mountPath": "/workspace/out"}])
    pod["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}},
                              {"name": "scratch", "emptyDir": {}}]
    apply(kubectl, namespace, pod)
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "ok"), timeout=60, message="the pod to finish")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded", terminated
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"
    assert terminated["message"].startswith("HELLO FROM A CONFIGMAP pod=ok port=")


def test_agent_reports_a_failing_trainer_and_the_job_fails(kubectl, namespace):
    script = """
        import os, sys
        open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write("bad hyperparameters")
        sys.exit(3)
    """
    container = trainer_pod("unused", script)["spec"]["containers"][0]
    apply(kubectl, namespace, job("fails", [container], labels=TRAINER_LABELS))
    kubectl("wait", "-n", namespace, "--for=condition=Failed", "job/fails", "--timeout=60s")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=fails",
                              "-o", "json"))["items"]
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pods[0]["status"]["phase"] == "Failed"
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (3, "Error", "bad hyperparameters")


def test_evicted_trainer_keeps_disruption_target_so_the_job_ignores_the_failure(kubectl, namespace, api_client):
    from kubernetes import client

    script = """
        import time
        time.sleep(600)
    """
    spec = job("evicted", [trainer_pod("unused", script)["spec"]["containers"][0]], labels=TRAINER_LABELS)
    spec["spec"]["podFailurePolicy"] = {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 5
    apply(kubectl, namespace, spec)

    def running_pods():
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        return [p["metadata"]["name"] for p in pods
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    first, = wait_for(running_pods, timeout=60, message="the first pod to run")
    client.CoreV1Api(api_client).create_namespaced_pod_eviction(
        first, namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=first, namespace=namespace)))
    # backoffLimit is 0: only the Ignore rule (DisruptionTarget kept in the pod's status) lets the
    # Job start a second pod instead of failing.
    second, = wait_for(lambda: [p for p in running_pods() if p != first], timeout=60,
                       message="a replacement pod")
    status = get(kubectl, namespace, "job", "evicted")["status"]
    assert not status.get("failed") and not any(c["type"] == "Failed" for c in status.get("conditions", []))
    kubectl("delete", "job", "evicted", "-n", namespace, "--cascade=foreground", "--timeout=60s")


def test_agent_resolves_env_from_secret(kubectl, namespace):
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                               "stringData": {"AWS_ACCESS_KEY_ID": "id-123", "secret": "s3cr3t"}})
    script = """
        import os
        with open(os.environ["FINETUNE_TERMINATION_LOG"], "w") as f:
            f.write(f"{os.environ['TOKEN']}|{os.environ['AWS_ACCESS_KEY_ID']}|{os.environ['NS']}")
    """
    pod = trainer_pod("env", script,
                      env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}}},
                           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                      envFrom=[{"secretRef": {"name": "s3-creds"}}])
    apply(kubectl, namespace, pod)
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "env"), timeout=60, message="the pod to finish")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == f"s3cr3t|id-123|{namespace}"


def test_agent_stops_a_deleted_pod(kubectl, namespace, cluster_env):
    script = """
        import os, signal, sys, time
        open(os.environ["FINETUNE_TERMINATION_LOG"], "w").write(str(os.getpid()))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        time.sleep(600)
    """
    apply(kubectl, namespace, trainer_pod("sleeper", script))
    wait_for(lambda: get(kubectl, namespace, "pod", "sleeper")["status"].get("phase") == "Running",
             timeout=60, message="the pod to run")
    pids_dir = Path(cluster_env["FINETUNE_CLUSTER_DIR"]) / "podagent" / "pids"
    pid = int(wait_for(lambda: [p.name for p in pids_dir.iterdir()
                                if p.read_text() == f"{namespace}/sleeper"], timeout=10)[0])
    kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=30s")
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]


def test_s3_put_list_get(make_bucket, s3_client):
    bucket = make_bucket()
    s3_client.put_object(Bucket=bucket, Key="models/run-1/model.safetensors", Body=b"weights")
    listed = s3_client.list_objects_v2(Bucket=bucket, Prefix="models/")
    assert [o["Key"] for o in listed["Contents"]] == ["models/run-1/model.safetensors"]
    assert s3_client.get_object(Bucket=bucket, Key="models/run-1/model.safetensors")["Body"].read() == b"weights"


def test_s3_client_configured_from_the_env_file_alone(make_bucket, cluster_env, monkeypatch):
    import boto3

    bucket = make_bucket()
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, cluster_env[key])
    s3 = boto3.client("s3")
    s3.put_object(Bucket=bucket, Key="a.txt", Body=b"a")
    assert [b["Name"] for b in s3.list_buckets()["Buckets"]].count(bucket) == 1


def test_bucket_helper_creates_buckets_idempotently(cluster_env, s3_client):
    import subprocess
    import sys
    import uuid

    name = f"helper-{uuid.uuid4().hex[:8]}"
    helper = [sys.executable, str(Path(__file__).resolve().parents[2] / "cluster" / "s3buckets.py"),
              "--env", str(Path(cluster_env["FINETUNE_CLUSTER_DIR"]) / "env"), name]
    try:
        first = subprocess.run(helper, capture_output=True, text=True, check=True)
        second = subprocess.run(helper + ["--list"], capture_output=True, text=True, check=True)
        assert first.stdout == f"created s3://{name}\n"
        assert name in second.stdout.splitlines() and "created" not in second.stdout
    finally:
        s3_client.delete_bucket(Bucket=name)


def test_prometheus_scrapes_a_trainer_pod_run_by_the_agent(kubectl, namespace, prometheus_query,
                                                            trainer_metrics_url):
    script = """
        import os, time
        from prometheus_client import Gauge, start_http_server
        Gauge("smoke_answer", "A constant for the smoke test").set(42)
        start_http_server(int(os.environ["FINETUNE_METRICS_PORT"]),
                          addr=os.environ["FINETUNE_METRICS_ADDR"])
        time.sleep(600)
    """
    pod = trainer_pod("metrics", script)
    pod["metadata"]["labels"]["finetune.dev/job"] = "smoke"
    apply(kubectl, namespace, pod)
    url = wait_for(lambda: trainer_metrics_url(namespace, "metrics"), timeout=60, message="the metrics port")
    wait_for(lambda: b"smoke_answer 42" in urllib.request.urlopen(url, timeout=2).read(), timeout=30,
             message="the trainer's metrics endpoint")
    result = wait_for(lambda: prometheus_query(f'smoke_answer{{namespace="{namespace}"}}'), timeout=30,
                      message="Prometheus to scrape the trainer")
    assert result[0]["metric"]["pod"] == "metrics" and result[0]["metric"]["finetunejob"] == "smoke"
    # The pod has a loopback address of its own, and it is the pod IP, as in a real cluster.
    pod_ip = json.loads(kubectl("get", "pod", "metrics", "-n", namespace, "-o", "json"))["status"]["podIP"]
    assert pod_ip.startswith("127.") and pod_ip != "127.0.0.1"
    assert url.startswith(f"http://{pod_ip}:")
    assert result[0]["value"][1] == "42"
    assert prometheus_query(f'up{{job="trainers", namespace="{namespace}"}}')[0]["value"][1] == "1"
    kubectl("delete", "pod", "metrics", "-n", namespace, "--timeout=30s")
    assert trainer_metrics_url(namespace, "metrics") is None


def test_pushgateway_metrics_reach_prometheus_with_their_labels(pushgateway_url, prometheus_query, namespace):
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    Gauge("smoke_pushed", "Pushed by the smoke test", registry=registry).set(7)
    push_to_gateway(pushgateway_url.removeprefix("http://"), job=f"smoke-{namespace}", registry=registry)
    result = wait_for(lambda: prometheus_query(f'smoke_pushed{{job="smoke-{namespace}"}}'), timeout=30,
                      message="Prometheus to scrape the pushgateway")
    assert result[0]["value"][1] == "7"


def test_everything_listens_on_loopback_only(cluster_env):
    state = Path(cluster_env["FINETUNE_CLUSTER_DIR"])
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    listening = _listening_sockets()
    seen = []
    for name, pid in pids.items():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    seen.append((name, listening[target[8:-1]]))
    # Every server listens somewhere (the pod agent is only a client).
    assert {name for name, _ in seen} == set(pids) - {"podagent"}, seen
    assert all(_is_loopback(address) for _, address in seen), seen


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _listening_sockets() -> dict[str, str]:
    """inode -> local IP of every TCP socket in LISTEN state."""
    import ipaddress

    result = {}
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            # /proc stores the address as host-order 32-bit words.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
            result[fields[9]] = str(ipaddress.ip_address(words))
    return result


def test_env_file_has_every_documented_key(cluster_env):
    env = read_env_file(Path(cluster_env["FINETUNE_CLUSTER_DIR"]) / "env")
    assert {"KUBECONFIG", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "PROMETHEUS_URL", "PUSHGATEWAY_URL", "FINETUNE_PODAGENT_PORTS"} <= set(env)
