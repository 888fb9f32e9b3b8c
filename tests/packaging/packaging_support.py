"""Shared helpers of the packaging tests: where things are, finding tools, rendering the chart."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "finetune-operator"
MONITORING = REPO / "monitoring"
CACHE_BIN = Path(os.environ.get("CACHE_DIR", Path.home() / ".cache" / "finetune-operator")) / "bin"

# Values that switch on everything optional and change every default the templates branch on.
FULL_VALUES: dict[str, Any] = {
    "watchNamespaces": ["team-a", "team-b"],
    "image": {"digest": "sha256:" + "a" * 64, "tag": "1.2.3"},
    "trainer": {"image": {"repository": "registry.example/trainer", "digest": "sha256:" + "b" * 64},
                "pushgatewayUrl": "http://pushgateway.monitoring:9091", "ephemeralStorage": "100Gi",
                "maxDisruptions": 0, "startErrorGraceSeconds": 60},
    "networkPolicy": {"enabled": False, "metricsFromNamespaces": ["monitoring", "prometheus"]},
    "imagePullSecrets": [{"name": "regcred"}],
    "s3": {"defaultEndpoint": "http://s3.storage:7070"},
    "logLevel": "DEBUG",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kps"}, "interval": "30s"},
    "podMonitor": {"enabled": True, "labels": {"release": "kps"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring",
                         "annotations": {"grafana_folder": "Training"}},
}


def find_tool(name: str) -> str | None:
    """A tool the project builds into its cache (pinned versions, e.g. a kubectl of the local
    cluster's minor), else one on PATH."""
    cached = CACHE_BIN / name
    return str(cached) if cached.exists() else shutil.which(name)


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"`{name}` not found on PATH or in {CACHE_BIN}: {how}")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


def helm_template(helm: str, values: dict[str, Any] | None, tmp_path: Path,
                  release: str = "finetune-operator", namespace: str = "finetune-system",
                  extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [helm, "template", release, str(CHART), "--namespace", namespace]
    if values is not None:
        values_file = tmp_path / f"values-{abs(hash(repr(values)))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(values_file)]
    return run(cmd + (extra or []))


def render(helm: str, values: dict[str, Any] | None, tmp_path: Path, **kwargs: Any) -> list[dict]:
    result = helm_template(helm, values, tmp_path, **kwargs)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def find(objects: list[dict], kind: str, name: str | None = None,
         namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objects: list[dict], kind: str, **kwargs: Any) -> dict:
    found = find(objects, kind, **kwargs)
    assert len(found) == 1, f"expected one {kind} {kwargs}, got {len(found)}"
    return found[0]
