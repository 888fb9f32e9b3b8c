"""pytest fixtures for tests against the local cluster (cluster/localcluster.py).

One cluster per test session: either the one named by ``FINETUNE_CLUSTER_ENV`` (the path of a
running cluster's env file, e.g. after ``make cluster-up``: ``.state/cluster/env``), which is left
running, or a fresh one started in a temporary state directory and stopped at the end of the
session, also when the run is interrupted (atexit and SIGTERM/SIGHUP handlers).

Any test using one of these fixtures is marked ``cluster``, so ``pytest -m "not cluster"`` runs
without starting anything.

Session fixtures: ``cluster_env`` (dict of the env file), ``kubeconfig`` (path), ``api_client``
(``kubernetes.client.ApiClient``), ``kubectl`` (``kubectl(*args, input=None, check=True) -> str``),
``s3_config`` (endpoint_url, aws_access_key_id, aws_secret_access_key, region_name),
``s3_client`` (boto3, path-style addressing), ``prometheus_url``, ``pushgateway_url``,
``prometheus_query`` (``query(expr) -> list of result dicts``), ``trainer_metrics_url``
(``url(namespace, pod) -> str | None``: ``http://<podIP>:<metrics port>/metrics`` of a running pod).
Per test: ``namespace`` (a fresh namespace, deleted afterwards), ``make_bucket``
(``make_bucket(prefix="test") -> name``, emptied and deleted afterwards).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLUSTER_FIXTURES = {
    "cluster_env", "kubeconfig", "api_client", "kubectl", "namespace", "s3_config", "s3_client",
    "make_bucket", "prometheus_url", "pushgateway_url", "prometheus_query", "trainer_metrics_url",
}


@functools.cache
def load_localcluster():
    spec = importlib.util.spec_from_file_location("localcluster", REPO / "cluster" / "localcluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.5, message: str = "condition"):
    """Poll predicate() until it returns a truthy value (returned); fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as error:  # keep polling; report the last error on timeout
            last_error = error
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if CLUSTER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


class _SessionCluster:
    """A cluster started for this test session; stopped exactly once, however the session ends."""

    def __init__(self):
        self.localcluster = load_localcluster()
        cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
        os.environ["PATH"] = f"{cache / 'bin'}{os.pathsep}{os.environ['PATH']}"
        self.state = Path(tempfile.mkdtemp(prefix="finetune-cluster-"))
        self.cluster = self.localcluster.Cluster(self.state)
        self.stopped = False
        atexit.register(self.stop)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.stop()
                if callable(previous):
                    previous(signum, frame)
                raise SystemExit(128 + signum)
            signal.signal(sig, handler)

    def start(self) -> Path:
        missing = [b for b in ("etcd", "kube-apiserver", "kubelet", "kwok", "coredns", "versitygw",
                               "prometheus", "containerd", "runc", "finetune-pause")
                   if not shutil.which(b)]
        if missing:
            pytest.fail(f"cluster binaries missing ({', '.join(missing)}): run `make cluster-build`",
                        pytrace=False)
        self.cluster.up()
        return self.cluster.env_file

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.cluster.down()


@pytest.fixture(scope="session")
def cluster_env() -> dict[str, str]:
    given = os.environ.get("FINETUNE_CLUSTER_ENV")
    if given:
        yield read_env_file(Path(given))
        return
    session = _SessionCluster()
    try:
        yield read_env_file(session.start())
    finally:
        session.stop()


@pytest.fixture(scope="session")
def kubeconfig(cluster_env) -> str:
    return cluster_env["KUBECONFIG"]


@pytest.fixture(scope="session")
def api_client(kubeconfig):
    from kubernetes import config

    api = config.new_client_from_config(config_file=kubeconfig)
    yield api
    api.close()


@pytest.fixture(scope="session")
def kubectl(kubeconfig):
    """kubectl(*args, input=None, check=True) -> stdout; raises AssertionError with stderr on failure."""
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    exe = next((str(p) for p in (cache / "bin" / "kubectl",) if p.exists()), "kubectl")

    def run(*args: str, input: str | None = None, check: bool = True) -> str:
        result = subprocess.run([exe, f"--kubeconfig={kubeconfig}", *args], input=input,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {shlex.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout
    return run


@pytest.fixture
def namespace(request, api_client):
    """A fresh namespace named after the test; deleted (without waiting) afterwards."""
    from kubernetes import client

    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{uuid.uuid4().hex[:5]}"
    core = client.CoreV1Api(api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=name, labels={"finetune.dev/test": "true"})))
    # Pods need the namespace's default service account (the ServiceAccount admission plugin).
    wait_for(lambda: core.read_namespaced_service_account("default", name), timeout=30,
             message=f"service account default in {name}")
    yield name
    with contextlib.suppress(Exception):
        core.delete_namespace(name)


@pytest.fixture(scope="session")
def s3_config(cluster_env) -> dict[str, str]:
    return {
        "endpoint_url": cluster_env["S3_ENDPOINT_URL"],
        "aws_access_key_id": cluster_env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": cluster_env["AWS_SECRET_ACCESS_KEY"],
        "region_name": cluster_env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def s3_client(s3_config):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **s3_config)


@pytest.fixture
def make_bucket(s3_client):
    """make_bucket(prefix="test") -> a new bucket's name; emptied and deleted after the test."""
    created = []

    def make(prefix: str = "test") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        s3_client.create_bucket(Bucket=name)
        created.append(name)
        return name
    yield make
    for name in created:
        with contextlib.suppress(Exception):
            for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    s3_client.delete_object(Bucket=name, Key=obj["Key"])
            s3_client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def prometheus_url(cluster_env) -> str:
    return cluster_env["PROMETHEUS_URL"]


@pytest.fixture(scope="session")
def pushgateway_url(cluster_env) -> str:
    return cluster_env["PUSHGATEWAY_URL"]


@pytest.fixture(scope="session")
def prometheus_query(prometheus_url):
    """query(expr) -> the result list of an instant PromQL query."""
    def query(expr: str) -> list[dict]:
        url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]["result"]
    return query


@pytest.fixture(scope="session")
def trainer_metrics_url(api_client):
    """url(namespace, pod) -> http://<podIP>:<port>/metrics of a running pod's container port
    named "metrics", as Prometheus and the operator reach it; None while it has no such address."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)

    def url(namespace: str, pod: str) -> str | None:
        try:
            found = core.read_namespaced_pod(pod, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        if found.status.phase != "Running" or not found.status.pod_ip:
            return None
        ports = [p.container_port for c in found.spec.containers for p in c.ports or []
                 if p.name == "metrics"]
        return f"http://{found.status.pod_ip}:{ports[0]}/metrics" if ports else None
    return url


def container_processes(pod: dict, container: str | None = None) -> list[int]:
    """Host PIDs of the processes of a pod's container (the first one, or `container`), found
    through the container's cgroup on the real node."""
    statuses = pod["status"].get("containerStatuses") or []
    status = next(s for s in statuses if container in (None, s["name"]))
    container_id = status["containerID"].split("://", 1)[1]
    for top in Path("/sys/fs/cgroup/pids").glob("finetune-*"):
        for directory, subdirectories, _ in os.walk(top):
            if container_id in subdirectories:
                procs = Path(directory, container_id, "cgroup.procs").read_text().split()
                return [int(pid) for pid in procs]
    return []
