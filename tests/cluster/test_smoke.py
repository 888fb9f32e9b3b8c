"""Smoke tests of the local cluster itself: API server, controllers, scheduler, kwok's fake GPU
nodes, the real node (kubelet, containerd, runc, CNI, CoreDNS), S3 and Prometheus, each exercised
for real."""

from __future__ import annotations

import contextlib
import json
import os
import textwrap
import urllib.request
from pathlib import Path

import pytest
from fixtures_cluster import container_processes, load_localcluster, read_env_file, wait_for

pytestmark = pytest.mark.cluster

TRAINER_LABELS = {"finetune.dev/component": "trainer"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Pods for kwok's fake nodes only: they never run, so any image name does.
ON_FAKE_NODES = {"nodeSelector": {"type": "kwok"},
                 "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists",
                                  "effect": "NoSchedule"}]}
# What the operator's trainer pods ask for (finetune_operator.builders).
TRAINER_POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                        "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
TRAINER_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                              "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}


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


def trainer_pod(name: str, script: str, cluster_env: dict, **container) -> dict:
    """A pod on the real node: `python -c script` in a container of the project's trainer image."""
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": dict(TRAINER_LABELS)},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5,
                 "containers": [{"name": "trainer", "image": cluster_env["FINETUNE_TRAINER_IMAGE"],
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
    apply(kubectl, namespace, job("two-gpus", [container], nodeSelector=ON_FAKE_NODES["nodeSelector"],
                                  tolerations=[GPU_TOLERATION, *ON_FAKE_NODES["tolerations"]]))
    kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/two-gpus", "--timeout=60s")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=two-gpus",
                              "-o", "json"))["items"]
    assert [p["spec"]["nodeName"] for p in pods] == ["gpu-a100-0"]
    assert pods[0]["status"]["phase"] == "Succeeded"


def test_job_asking_more_gpus_than_any_node_stays_pending(kubectl, namespace):
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "8"}}}
    apply(kubectl, namespace, job("eight-gpus", [container],
                                  tolerations=[GPU_TOLERATION, *ON_FAKE_NODES["tolerations"]]))

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
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"nvidia.com/gpu": "4"}}}
    apply(kubectl, namespace, job("no-toleration", [container], **ON_FAKE_NODES))
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
    child = job("child", [{"name": "c", "image": "busybox"}], **ON_FAKE_NODES)
    child["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "parent",
                                             "uid": parent["metadata"]["uid"]}]
    apply(kubectl, namespace, child)
    kubectl("delete", "configmap", "parent", "-n", namespace)
    wait_for(lambda: kubectl("get", "job", "child", "-n", namespace, "--ignore-not-found", "-o", "name") == "",
             timeout=60, message="the garbage collector to delete the Job")


def test_real_node_runs_a_pod_under_the_trainers_security_settings(kubectl, namespace, cluster_env):
    """What the operator asks of a trainer pod is enforced, not simulated: uid 65532, a read-only
    root filesystem, no capabilities, RuntimeDefault seccomp, a memory limit, volumes, the
    termination message, the cluster's DNS."""
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
                               "data": {"greeting": "hello from a configmap"}})
    script = """
        import errno, json, os, pathlib
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        def refused(action):
            try:
                action()
            except OSError as error:
                return errno.errorcode[error.errno]
            return "allowed"
        out = pathlib.Path("/workspace/out/result.txt")
        out.write_text(pathlib.Path("/etc/finetune/greeting").read_text().upper())
        facts = {
            "uid": os.getuid(), "gid": os.getgid(),
            "capabilities": status["CapEff"].strip(), "seccomp": status["Seccomp"].strip(),
            "write_root": refused(lambda: open("/opt/written-by-the-pod", "w")),
            # /tmp is world-writable in the image: only the read-only root refuses it.
            "write_tmp": refused(lambda: open("/tmp/written-by-the-pod", "w")),
            "chown": refused(lambda: os.chown(out, 0, 0)),
            "scratch": out.read_text(),
            "memory_limit": int(open("/sys/fs/cgroup/memory/memory.limit_in_bytes").read()),
            "pod_ip": os.environ["POD_IP"],
            "nameserver": [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")],
        }
        pathlib.Path("/dev/termination-log").write_text(json.dumps(facts))
    """
    pod = trainer_pod("secure", script, cluster_env,
                      env=[{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                      volumeMounts=[{"name": "cfg", "mountPath": "/etc/finetune"},
                                    {"name": "scratch", "mountPath": "/workspace/out"}],
                      resources={"limits": {"cpu": "500m", "memory": "256Mi"}},
                      securityContext=TRAINER_CONTAINER_SECURITY)
    pod["spec"]["securityContext"] = TRAINER_POD_SECURITY
    pod["spec"]["volumes"] = [{"name": "cfg", "configMap": {"name": "cfg"}},
                              {"name": "scratch", "emptyDir": {"sizeLimit": "64Mi"}}]
    apply(kubectl, namespace, pod)
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "secure"), timeout=120, message="the pod to finish")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded", terminated
    assert pod["spec"]["nodeName"] == cluster_env["FINETUNE_NODE_NAME"]
    facts = json.loads(terminated["message"])
    assert (facts["uid"], facts["gid"]) == (65532, 65532)
    assert int(facts["capabilities"], 16) == 0
    assert facts["seccomp"] == "2"  # filter mode: RuntimeDefault
    assert facts["write_root"] == "EROFS" and facts["write_tmp"] == "EROFS"
    assert facts["chown"] == "EPERM"  # CAP_CHOWN was dropped
    assert facts["scratch"] == "HELLO FROM A CONFIGMAP"
    assert facts["memory_limit"] == 256 * 2**20
    assert facts["pod_ip"] == pod["status"]["podIP"] and not facts["pod_ip"].startswith("127.")
    assert facts["nameserver"] == [cluster_env["FINETUNE_CLUSTER_DNS"]]


def test_a_failing_container_fails_its_job_with_exit_code_and_message(kubectl, namespace, cluster_env):
    script = """
        import sys
        open("/dev/termination-log", "w").write("bad hyperparameters")
        sys.exit(3)
    """
    container = trainer_pod("unused", script, cluster_env)["spec"]["containers"][0]
    apply(kubectl, namespace, job("fails", [container], labels=TRAINER_LABELS))
    kubectl("wait", "-n", namespace, "--for=condition=Failed", "job/fails", "--timeout=120s")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=fails",
                              "-o", "json"))["items"]
    terminated = pods[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pods[0]["status"]["phase"] == "Failed"
    assert (terminated["exitCode"], terminated["reason"], terminated["message"]) == (3, "Error", "bad hyperparameters")


def test_evicted_pod_keeps_disruption_target_so_the_job_ignores_the_failure(kubectl, namespace, api_client,
                                                                           cluster_env):
    from kubernetes import client

    script = """
        import time
        time.sleep(600)
    """
    spec = job("evicted", [trainer_pod("unused", script, cluster_env)["spec"]["containers"][0]],
               labels=TRAINER_LABELS)
    spec["spec"]["podFailurePolicy"] = {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]}
    spec["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 5
    apply(kubectl, namespace, spec)

    def running_pods():
        pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
        return [p["metadata"]["name"] for p in pods
                if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    first, = wait_for(running_pods, timeout=120, message="the first pod to run")
    client.CoreV1Api(api_client).create_namespaced_pod_eviction(
        first, namespace, client.V1Eviction(metadata=client.V1ObjectMeta(name=first, namespace=namespace)))
    # backoffLimit is 0: only the Ignore rule (DisruptionTarget kept in the pod's status) lets the
    # Job start a second pod instead of failing.
    second, = wait_for(lambda: [p for p in running_pods() if p != first], timeout=120,
                       message="a replacement pod")
    status = get(kubectl, namespace, "job", "evicted")["status"]
    assert not status.get("failed") and not any(c["type"] == "Failed" for c in status.get("conditions", []))
    kubectl("delete", "job", "evicted", "-n", namespace, "--cascade=foreground", "--timeout=60s")


def test_env_from_a_secret_and_the_downward_api(kubectl, namespace, cluster_env):
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                               "stringData": {"AWS_ACCESS_KEY_ID": "id-123", "secret": "s3cr3t"}})
    script = """
        import os
        with open("/dev/termination-log", "w") as f:
            f.write(f"{os.environ['TOKEN']}|{os.environ['AWS_ACCESS_KEY_ID']}|{os.environ['NS']}")
    """
    pod = trainer_pod("env", script, cluster_env,
                      env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret"}}},
                           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
                      envFrom=[{"secretRef": {"name": "s3-creds"}}])
    apply(kubectl, namespace, pod)
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "env"), timeout=120, message="the pod to finish")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == f"s3cr3t|id-123|{namespace}"


def test_a_deleted_pod_is_stopped_and_its_logs_were_served(kubectl, namespace, cluster_env):
    script = """
        import signal, sys, time
        print("sleeper started", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        time.sleep(600)
    """
    apply(kubectl, namespace, trainer_pod("sleeper", script, cluster_env))
    wait_for(lambda: get(kubectl, namespace, "pod", "sleeper")["status"].get("phase") == "Running",
             timeout=120, message="the pod to run")
    # kubectl logs goes through the API server to the kubelet, as on any cluster.
    wait_for(lambda: "sleeper started" in kubectl("logs", "sleeper", "-n", namespace), timeout=30,
             message="the pod's log through the API server")
    processes = container_processes(get(kubectl, namespace, "pod", "sleeper"))
    assert processes
    kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=60s")
    assert not [pid for pid in processes if load_localcluster().pid_alive(pid)]


def test_pods_resolve_each_other_through_cluster_dns(kubectl, namespace, cluster_env):
    """A headless Service and pods with hostname/subdomain, as a multi-worker FineTuneJob has
    them: CoreDNS answers with the pod IP from the EndpointSlice; names outside the cluster do not
    resolve (pods here have no way out)."""
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers"},
                               "spec": {"clusterIP": "None", "selector": {"app": "peer"},
                                        "publishNotReadyAddresses": True,
                                        "ports": [{"name": "p", "port": 29500}]}})
    server = trainer_pod("server", "import time; time.sleep(600)", cluster_env)
    server["metadata"]["labels"]["app"] = "peer"
    server["spec"].update(hostname="rank-0", subdomain="peers")
    apply(kubectl, namespace, server)
    server_ip = wait_for(lambda: get(kubectl, namespace, "pod", "server")["status"].get("podIP"),
                         timeout=120, message="the server pod's IP")
    script = f"""
        import socket, time
        deadline = time.monotonic() + 60
        while True:
            try:
                found = socket.gethostbyname("rank-0.peers")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        full = socket.gethostbyname("rank-0.peers.{namespace}.svc.cluster.local")
        try:
            socket.gethostbyname("pypi.org")
            outside = "resolved"
        except OSError:
            outside = "unresolved"
        open("/dev/termination-log", "w").write(f"{{found}} {{full}} {{outside}}")
    """
    apply(kubectl, namespace, trainer_pod("client", script, cluster_env))
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "client"), timeout=120,
                   message="the client pod to finish")
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["message"] == f"{server_ip} {server_ip} unresolved", terminated


def test_only_local_images_may_run_on_the_real_node(kubectl, namespace):
    """No registry is reachable: the cluster refuses pods whose image would have to be pulled."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "remote"},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    with pytest.raises(AssertionError, match="images from `make images`"):
        apply(kubectl, namespace, pod)
    assert kubectl("get", "pod", "remote", "-n", namespace, "--ignore-not-found") == ""


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


def test_prometheus_scrapes_a_trainer_pod_at_its_pod_ip(kubectl, namespace, prometheus_query,
                                                        trainer_metrics_url, cluster_env):
    script = """
        import time
        from prometheus_client import Gauge, start_http_server
        Gauge("smoke_answer", "A constant for the smoke test").set(42)
        start_http_server(9400)
        time.sleep(600)
    """
    pod = trainer_pod("metrics", script, cluster_env,
                      ports=[{"name": "metrics", "containerPort": 9400}])
    pod["metadata"]["labels"]["finetune.dev/job"] = "smoke"
    apply(kubectl, namespace, pod)
    url = wait_for(lambda: trainer_metrics_url(namespace, "metrics"), timeout=120, message="the metrics port")
    wait_for(lambda: b"smoke_answer 42" in urllib.request.urlopen(url, timeout=2).read(), timeout=60,
             message="the trainer's metrics endpoint")
    result = wait_for(lambda: prometheus_query(f'smoke_answer{{namespace="{namespace}"}}'), timeout=60,
                      message="Prometheus to scrape the trainer")
    assert result[0]["metric"]["pod"] == "metrics" and result[0]["metric"]["finetunejob"] == "smoke"
    pod_ip = get(kubectl, namespace, "pod", "metrics")["status"]["podIP"]
    assert url == f"http://{pod_ip}:9400/metrics"
    assert result[0]["metric"]["instance"] == f"{pod_ip}:9400"
    assert result[0]["value"][1] == "42"
    assert prometheus_query(f'up{{job="trainers", namespace="{namespace}"}}')[0]["value"][1] == "1"
    kubectl("delete", "pod", "metrics", "-n", namespace, "--timeout=60s")
    assert trainer_metrics_url(namespace, "metrics") is None


def test_pods_reach_s3_at_the_clusters_endpoint(kubectl, namespace, make_bucket, s3_client, cluster_env):
    bucket = make_bucket()
    s3_client.put_object(Bucket=bucket, Key="from-the-host.txt", Body=b"hello pod")
    script = f"""
        import boto3, os
        s3 = boto3.client("s3", endpoint_url=os.environ["S3"], region_name="us-east-1",
                          aws_access_key_id=os.environ["KEY"], aws_secret_access_key=os.environ["SECRET"])
        body = s3.get_object(Bucket="{bucket}", Key="from-the-host.txt")["Body"].read()
        s3.put_object(Bucket="{bucket}", Key="from-the-pod.txt", Body=body.upper())
    """
    apply(kubectl, namespace, trainer_pod("s3", script, cluster_env, env=[
        {"name": "S3", "value": cluster_env["S3_ENDPOINT_URL"]},
        {"name": "KEY", "value": cluster_env["AWS_ACCESS_KEY_ID"]},
        {"name": "SECRET", "value": cluster_env["AWS_SECRET_ACCESS_KEY"]},
        {"name": "HOME", "value": "/tmp"}]))
    pod = wait_for(lambda: pod_finished(kubectl, namespace, "s3"), timeout=120, message="the pod to finish")
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    assert s3_client.get_object(Bucket=bucket, Key="from-the-pod.txt")["Body"].read() == b"HELLO POD"


def test_pushgateway_metrics_reach_prometheus_with_their_labels(pushgateway_url, prometheus_query, namespace):
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    Gauge("smoke_pushed", "Pushed by the smoke test", registry=registry).set(7)
    push_to_gateway(pushgateway_url.removeprefix("http://"), job=f"smoke-{namespace}", registry=registry)
    result = wait_for(lambda: prometheus_query(f'smoke_pushed{{job="smoke-{namespace}"}}'), timeout=30,
                      message="Prometheus to scrape the pushgateway")
    assert result[0]["value"][1] == "7"


def test_everything_listens_on_loopback_or_the_clusters_own_addresses(cluster_env):
    """No server is reachable from outside: components listen on loopback, inside the cluster's
    network namespace (whose only other interface is on the cluster's bridge), or on the bridge's
    own address (the kubelet)."""
    import ipaddress

    state = Path(cluster_env["FINETUNE_CLUSTER_DIR"])
    pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
    subnet = ipaddress.ip_network(json.loads((state / "network.json").read_text())["subnet"])
    seen = []
    for name, pid in pids.items():
        listening = _listening_sockets(pid)  # as seen from the process's network namespace
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    seen.append((name, listening[target[8:-1]]))
    # Every server listens somewhere (podtargets is only a client of the API).
    assert {name for name, _ in seen} == set(pids) - {"podtargets"}, seen
    netns = os.readlink(f"/proc/{pids['kube-apiserver']}/ns/net")
    for name, address in seen:
        ip = ipaddress.ip_address(address)
        in_cluster_netns = os.readlink(f"/proc/{pids[name]}/ns/net") == netns
        assert _is_loopback(address) or ip in subnet or (in_cluster_netns and ip.is_unspecified), \
            (name, address)
    assert os.readlink(f"/proc/{pids['kubelet']}/ns/net") != netns  # the node is this machine


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _listening_sockets(pid: int) -> dict[str, str]:
    """inode -> local IP of every TCP socket in LISTEN state in the network namespace of pid."""
    import ipaddress

    result = {}
    for table, size in ((f"/proc/{pid}/net/tcp", 4), (f"/proc/{pid}/net/tcp6", 16)):
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
            "PROMETHEUS_URL", "PUSHGATEWAY_URL", "FINETUNE_API_SERVER_HOST", "FINETUNE_API_SERVER_PORT",
            "FINETUNE_CLUSTER_DNS", "FINETUNE_NODE_NAME", "FINETUNE_OPERATOR_IMAGE",
            "FINETUNE_TRAINER_IMAGE"} <= set(env)
