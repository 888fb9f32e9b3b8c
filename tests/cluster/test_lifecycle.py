"""cluster-up / cluster-down themselves: a second, private cluster comes up, is found running by a
second `up`, and `down` leaves no process and no state behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures_cluster import read_env_file

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]


def localcluster(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    env = {**os.environ, "FINETUNE_CLUSTER_DIR": str(state),
           "PATH": f"{cache / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, str(REPO / "cluster" / "localcluster.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_up_is_idempotent_and_down_leaves_nothing_behind(tmp_path):
    state = tmp_path / "cluster"
    up = localcluster(state, "up")
    try:
        assert up.returncode == 0, up.stderr
        env = read_env_file(state / "env")
        assert f"export KUBECONFIG={env['KUBECONFIG']}" in up.stdout
        pids = {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")}
        assert set(pids) >= {"etcd", "kube-apiserver", "kwok", "podagent", "versitygw", "prometheus"}
        again = localcluster(state, "up")
        assert again.returncode == 0 and "already running" in again.stderr
        assert {p.stem: int(p.read_text()) for p in (state / "pids").glob("*.pid")} == pids
    finally:
        down = localcluster(state, "down")
    assert down.returncode == 0, down.stderr
    assert not state.exists()
    alive = [name for name, pid in pids.items() if _alive(pid)]
    assert not alive, f"still running after down: {alive}"
    assert localcluster(state, "status").returncode == 1


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"
