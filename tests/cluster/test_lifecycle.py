"""cluster-up / cluster-down themselves: a second, private cluster comes up beside the session's
(its own network namespace, bridge, subnet, containerd and cgroups), runs a pod on its real node, is
found running by a second `up`, and `down` leaves no process, interface, mount, cgroup or state
behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_cluster import load_localcluster, read_env_file, wait_for

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def localcluster(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    env = {**os.environ, "FINETUNE_CLUSTER_DIR": str(state),
           "PATH": f"{cache / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, str(REPO / "cluster" / "localcluster.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_up_is_idempotent_and_down_leaves_nothing_behind(tmp_path, cluster_env):
    state = tmp_path / "cluster"
    up = localcluster(state, "up", "--no-product-images")
    try:
        assert up.returncode == 0, up.stderr
        env = read_env_file(state / "env")
        assert f"export KUBECONFIG={env['KUBECONFIG']}" in up.stdout
        assert env["S3_ENDPOINT_URL"] != cluster_env["S3_ENDPOINT_URL"]  # a network of its own
        pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
        assert set(pids) >= {"etcd", "kube-apiserver", "kwok", "coredns", "containerd", "kubelet",
                             "versitygw", "prometheus"}
        network = load_localcluster().realnode.Network(state)
        # A pod on its real node: mounts, a network namespace, cgroups, a shim to clean up.
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sandbox"},
               "spec": {"containers": [{"name": "c", "image": env["FINETUNE_PAUSE_IMAGE"]}]}}
        kubectl(env, "apply", "-f", "-", input=json.dumps(pod))
        wait_for(lambda: json.loads(kubectl(env, "get", "pod", "sandbox", "-o", "json"))[
            "status"].get("phase") == "Running", timeout=120, message="a pod on the second cluster")
        assert load_localcluster().realnode.cgroup_processes(network)
        again = localcluster(state, "up", "--no-product-images")
        assert again.returncode == 0 and "already running" in again.stderr
        assert {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")} == pids
    finally:
        down = localcluster(state, "down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    alive = [name for name, pid in pids.items() if load_localcluster().pid_alive(pid)]
    assert not alive, f"still running after down: {alive}"
    realnode = load_localcluster().realnode
    assert network.leftovers() == []
    assert realnode.mounts_under(state) == []
    assert realnode.cgroup_dirs(network) == []
    assert realnode.container_log_links(state) == []
    assert localcluster(state, "status").returncode == 1


def kubectl(env: dict, *args: str, input: str | None = None) -> str:
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    result = subprocess.run([str(cache / "bin" / "kubectl"), f"--kubeconfig={env['KUBECONFIG']}", *args],
                            input=input, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout
