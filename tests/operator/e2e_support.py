"""Running the real operator against the local cluster, with exactly the RBAC of
finetune_operator.rbac (a ServiceAccount token, not the admin certificate)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

from finetune_operator import rbac
from fixtures_cluster import wait_for as poll

REPO = Path(__file__).resolve().parents[2]
OPERATOR_ROLE = "finetune-operator-e2e"
LEADER_ROLE = "finetune-operator-e2e-leader-election"
SERVICE_ACCOUNT = "finetune-operator"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5,
             message: str = "condition") -> Any:
    """The cluster fixtures' poll, with the longer default an operator's round trip needs."""
    return poll(predicate, timeout=timeout, interval=interval, message=message)


SECRET = "s3-credentials"
TRAINER_SELECTOR = "finetune.dev/component=trainer"


def s3_secret(kubectl, namespace: str, cluster_env: dict) -> None:
    """The local S3 server's credentials as the Secret the test jobs name."""
    apply(kubectl, {"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": SECRET, "namespace": namespace},
                    "stringData": {"AWS_ACCESS_KEY_ID": cluster_env["AWS_ACCESS_KEY_ID"],
                                   "AWS_SECRET_ACCESS_KEY": cluster_env["AWS_SECRET_ACCESS_KEY"]}})


def apply(kubectl, *documents: dict, namespace: str | None = None) -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    kubectl(*args, input="\n---\n".join(json.dumps(d) for d in documents))


def get(kubectl, kind: str, name: str, namespace: str) -> dict | None:
    out = kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


def grant_operator(kubectl, kubeconfig: str, namespaces: list[str], home: str,
                   out_dir: Path) -> Path:
    """ServiceAccount in `home` bound to rbac.py's rules in each watched namespace (and the
    leader-election rules in `home`); returns a kubeconfig holding its token."""
    apply(kubectl,
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": OPERATOR_ROLE}, "rules": rbac.CLUSTER_RULES},
          {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
           "metadata": {"name": LEADER_ROLE}, "rules": rbac.LEADER_ELECTION_RULES})
    apply(kubectl, {"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": SERVICE_ACCOUNT, "namespace": home}})
    subject = [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": home}]
    for namespace in namespaces:
        apply(kubectl, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                        "metadata": {"name": OPERATOR_ROLE, "namespace": namespace},
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                    "kind": "ClusterRole", "name": OPERATOR_ROLE},
                        "subjects": subject})
    apply(kubectl, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                    "metadata": {"name": LEADER_ROLE, "namespace": home},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                "name": LEADER_ROLE},
                    "subjects": subject})
    token = kubectl("create", "token", SERVICE_ACCOUNT, "-n", home, "--duration=2h").strip()
    admin = yaml.safe_load(Path(kubeconfig).read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "operator",
              "clusters": [{"name": "local", "cluster": cluster}],
              "users": [{"name": "operator", "user": {"token": token}}],
              "contexts": [{"name": "operator",
                            "context": {"cluster": "local", "user": "operator"}}]}
    path = out_dir / f"operator-{home}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    def __init__(self, kubeconfig: Path, namespaces: list[str], home: str, s3_endpoint: str,
                 log_path: Path, **extra_env: str):
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("api", "operator")),
            "FINETUNE_WATCH_NAMESPACES": ",".join(namespaces),
            "POD_NAMESPACE": home,
            "FINETUNE_OPERATOR_METRICS_ADDR": "127.0.0.1",
            "FINETUNE_OPERATOR_METRICS_PORT": str(self.port),
            "FINETUNE_DEFAULT_S3_ENDPOINT": s3_endpoint,
            "FINETUNE_TRAINER_IMAGE": "finetune-trainer:dev",
            "FINETUNE_PROGRESS_INTERVAL_SECONDS": "2",
            "FINETUNE_LEASE_DURATION_SECONDS": "6",
            "FINETUNE_LOG_LEVEL": "INFO",
            **extra_env,
        }
        self.process: subprocess.Popen | None = None

    def start(self) -> "OperatorProcess":
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "finetune_operator"],
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return self

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        return None

    def is_leader(self) -> bool:
        try:
            return self.metric("finetune_operator_leader") == 1
        except OSError:
            return False

    def wait_leader(self, timeout: float = 60) -> "OperatorProcess":
        try:
            wait_for(lambda: self.alive() and self.is_leader(), timeout=timeout,
                     message="the operator to lead")
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- operator log ---\n{self.log_tail()}") from None
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if not self.alive():
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


# --- FineTuneJobs and what they leave behind ------------------------------------------------------------------------------

def finetunejob(name: str, namespace: str, dataset: str, **spec) -> dict:
    base = {
        "dataset": {"uri": dataset, "s3": {"credentialsSecret": SECRET, "addressingStyle": "Path"}},
        "model": {"backbone": "test_resnet", "weights": "None", "imageSize": 32},
        "strategy": "FineTune", "epochs": 2, "batchSize": 16, "augmentation": "None",
        "dataLoaderWorkers": 0, "baseline": {"enabled": False},
        "output": {"uri": f"s3://models/{namespace}/{name}/"},
        "resources": {"gpus": 0},
    }
    for key, value in spec.items():
        base[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


def ftj(kubectl, namespace: str, name: str) -> dict | None:
    return get(kubectl, "finetunejob", name, namespace)


def status(kubectl, namespace: str, name: str) -> dict:
    return (ftj(kubectl, namespace, name) or {}).get("status") or {}


def wait_phase(kubectl, namespace: str, name: str, *phases: str, timeout: float = 300) -> dict:
    def reached():
        current = status(kubectl, namespace, name)
        return current if current.get("phase") in phases else None
    try:
        return wait_for(reached, timeout=timeout, interval=1,
                        message=f"{namespace}/{name} to reach {'/'.join(phases)}")
    except AssertionError as error:
        raise AssertionError(f"{error}; status: {json.dumps(status(kubectl, namespace, name))}")


def condition(current: dict, type_: str) -> dict:
    return next((c for c in current.get("conditions") or [] if c["type"] == type_), {})


def objects(kubectl, kind: str, namespace: str, selector: str = TRAINER_SELECTOR) -> list[dict]:
    return json.loads(kubectl("get", kind, "-n", namespace, "-l", selector, "-o", "json"))["items"]


def configmaps(kubectl, namespace: str) -> list[dict]:
    return objects(kubectl, "configmaps", namespace, "app.kubernetes.io/managed-by=finetune-operator")


def s3_keys(s3_client, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_bytes(s3_client, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_json(s3_client, uri: str) -> dict:
    return json.loads(s3_bytes(s3_client, uri))


def wait_checkpoint(s3_client, output_uri: str, timeout: float = 240) -> None:
    wait_for(lambda: any(k.endswith("checkpoints/latest.json")
                         for k in s3_keys(s3_client, output_uri)),
             timeout=timeout, interval=0.5, message=f"a checkpoint under {output_uri}")


def events(kubectl, namespace: str, name: str) -> list[dict]:
    items = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json",
                               "--field-selector", f"involvedObject.name={name}"))["items"]
    return [e for e in items if e.get("source", {}).get("component") == "finetune-operator"]
