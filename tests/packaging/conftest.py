from __future__ import annotations

import pytest

from packaging_support import require_tool


@pytest.fixture(scope="session")
def helm() -> str:
    return require_tool("helm", "`make cluster-build` builds it (cluster/versions.env pins the version)")


@pytest.fixture(scope="session")
def promtool() -> str:
    return require_tool("promtool", "install Debian's `prometheus` package (it ships promtool)")


@pytest.fixture(scope="session")
def kubectl() -> str:
    return require_tool("kubectl", "`make cluster-build` builds it")


@pytest.fixture(scope="session")
def local_cluster():
    """The local cluster's settings (KUBECONFIG, S3_ENDPOINT_URL, ...): the running one, or one
    started for this session and stopped at its end."""
    import os
    import shlex
    import subprocess
    import sys

    from packaging_support import CACHE_BIN, REPO

    script = REPO / "cluster" / "localcluster.py"
    if not script.exists():
        pytest.fail("cluster/localcluster.py is missing")
    env = {**os.environ, "PATH": f"{CACHE_BIN}:{os.environ.get('PATH', '')}"}
    was_running = subprocess.run([sys.executable, str(script), "status"], env=env,
                                 capture_output=True).returncode == 0
    if not was_running:
        up = subprocess.run([sys.executable, str(script), "up"], env=env, capture_output=True,
                            text=True, timeout=600)
        assert up.returncode == 0, f"local cluster did not start:\n{up.stderr[-4000:]}"
    located = subprocess.run([sys.executable, str(script), "env"], env=env, capture_output=True,
                             text=True)
    assert located.returncode == 0, located.stderr
    settings = {"PATH": env["PATH"]}
    for line in open(located.stdout.strip()):
        if line.startswith("export "):
            key, _, value = line[len("export "):].strip().partition("=")
            settings[key] = shlex.split(value)[0] if value else ""
    yield settings
    if not was_running:
        subprocess.run([sys.executable, str(script), "down"], env=env, capture_output=True,
                       timeout=120)
