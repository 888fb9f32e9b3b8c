"""`finetune-operator` without a usable cluster configuration: exit 2 with one line on stderr that
says what is missing, not a traceback (the operator image started outside a cluster does this)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_operator(home: Path, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(HOME=str(home), KUBECONFIG=str(kubeconfig))
    return subprocess.run([sys.executable, "-m", "finetune_operator"], env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("kubeconfig_text, reason", [
    (None, "No configuration found"),
    ("clusters: [unclosed\n", ""),
    ("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n", ""),
])
def test_no_service_account_and_no_kubeconfig_is_one_line(tmp_path, kubeconfig_text, reason):
    kubeconfig = tmp_path / "kubeconfig"
    if kubeconfig_text is not None:
        kubeconfig.write_text(kubeconfig_text)
    result = run_operator(tmp_path, kubeconfig)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("finetune-operator: configuration error: no Kubernetes configuration")
    assert "in-cluster service account" in lines[0] and "kubeconfig" in lines[0]
    assert reason in lines[0]
    assert result.stdout == ""


def test_a_bad_setting_is_reported_before_the_cluster_is_looked_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env.update(HOME=str(tmp_path), KUBECONFIG=str(tmp_path / "absent"),
               FINETUNE_LOG_LEVEL="LOUD")
    result = subprocess.run([sys.executable, "-m", "finetune_operator"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "finetune-operator: configuration error: FINETUNE_LOG_LEVEL: 'LOUD' is not DEBUG, INFO, "
        "WARNING or ERROR"]
