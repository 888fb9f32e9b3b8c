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
def kubectl_bin() -> str:
    """The kubectl binary (for `kubectl kustomize`; tests/fixtures_cluster.py's `kubectl` fixture
    is the cluster-bound one and marks a test `cluster`)."""
    return require_tool("kubectl", "`make cluster-build` builds it")

