"""The operator as a platform team runs it: the Helm chart's Deployment, from the project's image,
with in-cluster configuration, its ServiceAccount token and the chart's RBAC, on the local
cluster's real node. Used by the operator, observability and packaging end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Callable

from fixtures_cluster import load_localcluster, wait_for

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "finetune-operator"
CACHE_BIN = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator") / "bin"
METRICS_PORT = 8080


def helm_binary() -> str:
    cached = CACHE_BIN / "helm"
    return str(cached) if cached.exists() else "helm"


class ChartOperator:
    """One Helm release of the chart in `namespace`, watching `watch` namespaces."""

    def __init__(self, kubectl: Callable[..., str], cluster_env: dict[str, str], release: str,
                 namespace: str, watch: list[str], out_dir: Path, replicas: int = 1,
                 chart_values: dict[str, Any] | None = None, **extra_env: str):
        self.kubectl = kubectl
        self.cluster_env = cluster_env
        self.release = release
        self.namespace = namespace
        self.fullname = f"{release}-finetune-operator"
        self.selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
        self.replicas = replicas
        values = {**load_localcluster().operator_chart_values(cluster_env, watch, replicas,
                                                              extra_env), **(chart_values or {})}
        self.values_file = out_dir / f"{release}-values.json"
        self.values_file.write_text(json.dumps(values, indent=1))

    # --- lifecycle

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "KUBECONFIG": self.cluster_env["KUBECONFIG"]})
        if check and result.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
        return result

    def start(self) -> "ChartOperator":
        """Install the release, or scale an installed one back to its replicas."""
        installed = self.helm("status", self.release, "-n", self.namespace, check=False)
        if installed.returncode == 0:
            self.scale(self.replicas)
        else:
            self.helm("install", self.release, str(CHART), "-n", self.namespace, "--skip-crds",
                      "-f", str(self.values_file))
        return self

    def scale(self, replicas: int) -> None:
        self.kubectl("scale", "deployment", self.fullname, "-n", self.namespace,
                     f"--replicas={replicas}")

    def stop(self, force: bool = False, timeout: float = 60) -> None:
        """Scale to zero and wait until no pod is left; `force` kills the pods at once (SIGKILL,
        as a crashed node or an OOM kill would), not after their graceful shutdown."""
        self.scale(0)
        if force:
            self.kubectl("delete", "pods", "-n", self.namespace, "-l", self.selector,
                         "--grace-period=0", "--force", "--wait=false", check=False)
        wait_for(lambda: not self.pods(include_terminating=True), timeout=timeout,
                 message=f"the pods of {self.fullname} to be gone")

    def kill_pod(self, pod: str) -> None:
        self.kubectl("delete", "pod", pod, "-n", self.namespace, "--grace-period=0", "--force",
                     "--wait=false", check=False)

    def uninstall(self) -> None:
        self.helm("uninstall", self.release, "-n", self.namespace, "--wait", "--timeout=60s",
                  check=False)

    # --- what is running

    def pods(self, include_terminating: bool = False) -> list[dict]:
        items = json.loads(self.kubectl("get", "pods", "-n", self.namespace, "-l", self.selector,
                                        "-o", "json"))["items"]
        return [p for p in items
                if include_terminating or (p["status"].get("phase") == "Running"
                                           and not p["metadata"].get("deletionTimestamp"))]

    def metrics_text(self, pod: dict) -> str:
        url = f"http://{pod['status']['podIP']}:{METRICS_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def pod_metric(self, pod: dict, name: str, **labels: str) -> float | None:
        from prometheus_client.parser import text_string_to_metric_families
        for family in text_string_to_metric_families(self.metrics_text(pod)):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):
                    return sample.value
        return None

    def pods_leading(self, leading: bool) -> list[dict]:
        """Running pods whose leader gauge says they lead (or follow); pods not serving yet are
        neither."""
        found = []
        for pod in self.pods():
            try:
                if self.pod_metric(pod, "finetune_operator_leader") == int(leading):
                    found.append(pod)
            except OSError:
                continue
        return found

    def leader(self) -> dict | None:
        return next(iter(self.pods_leading(True)), None)

    def followers(self) -> list[dict]:
        return self.pods_leading(False)

    def metric(self, name: str, **labels: str) -> float | None:
        """A metric of the leading pod."""
        pod = self.leader()
        assert pod is not None, f"no pod of {self.fullname} leads"
        return self.pod_metric(pod, name, **labels)

    def wait_leader(self, timeout: float = 120) -> "ChartOperator":
        try:
            wait_for(self.leader, timeout=timeout, message=f"a pod of {self.fullname} to lead")
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- operator log ---\n{self.log_tail()}") from None
        return self

    def log_tail(self, lines: int = 60) -> str:
        """The pods' logs through the API server (the kubelet serves them), with their names."""
        result = subprocess.run(
            [str(CACHE_BIN / "kubectl") if (CACHE_BIN / "kubectl").exists() else "kubectl",
             f"--kubeconfig={self.cluster_env['KUBECONFIG']}", "logs", "-n", self.namespace,
             "-l", self.selector, "--prefix", f"--tail={lines}", "--all-containers"],
            capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr

    def describe(self) -> Any:
        return self.kubectl("describe", "pods", "-n", self.namespace, "-l", self.selector,
                            check=False)
