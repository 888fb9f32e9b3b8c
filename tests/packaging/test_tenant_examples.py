"""examples/tenant/: builds with kustomize (kubectl's), and what it builds fits together: the
FineTuneJob is valid and names the Secret the kustomization generates, the quota limits GPUs, the
RoleBinding names a role the chart creates."""

from __future__ import annotations

import shutil

import pytest
import yaml

from finetune_api.validation import validate_manifest
from packaging_support import REPO, find, one, render, run

TENANT = REPO / "examples" / "tenant"


@pytest.fixture()
def built(kubectl_bin, tmp_path) -> list[dict]:
    work = tmp_path / "tenant"
    shutil.copytree(TENANT, work)
    # The credentials file is git-ignored; the example says to create it from the template.
    shutil.copy(work / "s3-credentials.env.example", work / "s3-credentials.env")
    result = run([kubectl_bin, "kustomize", str(work)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_tenant_objects_share_one_namespace(built):
    namespace = one(built, "Namespace")["metadata"]["name"]
    for obj in built:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["kind"]


def test_quota_counts_gpus_and_finetunejobs(built):
    hard = one(built, "ResourceQuota")["spec"]["hard"]
    assert int(hard["requests.nvidia.com/gpu"]) >= 1
    assert "count/finetunejobs.finetune.dev" in hard


def test_finetunejob_is_valid_and_uses_the_generated_secret(built):
    ftj = one(built, "FineTuneJob")
    validated = validate_manifest(ftj)  # the defaulted spec
    secret = one(built, "Secret")
    assert validated["dataset"]["s3"]["credentialsSecret"] == secret["metadata"]["name"]
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    gpus = validated["resources"]["gpus"]
    assert gpus <= int(one(built, "ResourceQuota")["spec"]["hard"]["requests.nvidia.com/gpu"])


def test_credentials_are_not_committed():
    assert "s3-credentials.env" in (TENANT / ".gitignore").read_text().split()
    tracked = run(["git", "ls-files", str(TENANT)], cwd=REPO).stdout.split()
    assert not any(path.endswith("s3-credentials.env") for path in tracked)


def test_rolebinding_names_the_charts_edit_role(built, helm, tmp_path):
    binding = one(built, "RoleBinding")
    chart = render(helm, None, tmp_path, release="finetune-operator")
    names = {o["metadata"]["name"] for o in find(chart, "ClusterRole")}
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert binding["roleRef"]["name"] in names


def test_the_platform_values_are_the_charts_defaults_and_pass_the_tenants_job(built, helm,
                                                                              tmp_path):
    """operator-values.yaml renders (strict schema), spells out the chart's tenancy defaults, and
    the example FineTuneJob passes the policy it installs."""
    from finetune_api.tenancy import TenancyPolicy, violations

    platform = yaml.safe_load((TENANT / "operator-values.yaml").read_text())
    defaults = yaml.safe_load((REPO / "helm" / "finetune-operator" / "values.yaml").read_text())
    assert platform["tenancy"] == defaults["tenancy"]
    chart = render(helm, platform, tmp_path)
    assert find(chart, "ValidatingAdmissionPolicy")
    env = {e["name"]: e.get("value", "") for e in one(chart, "Deployment")["spec"]["template"][
        "spec"]["containers"][0]["env"]}
    policy = TenancyPolicy.from_json(env["FINETUNE_TENANCY_POLICY"],
                                     default_image=env["FINETUNE_TRAINER_IMAGE"])
    assert violations(validate_manifest(one(built, "FineTuneJob")), policy) == []
    namespace = one(built, "Namespace")["metadata"]["name"]
    assert platform["watchNamespaces"] == [namespace]
