"""Both Dockerfile targets really built (cluster/images.sh: podman on a Debian base) and run the way
the cluster runs them: as UID 65532 with a read-only root, no capabilities and no network.

Runs where podman exists or root can install it from Debian. The first run builds the images
(minutes: the trainer's wheels are 3 GB); afterwards they are cached by content hash and the build
is a no-op of a few seconds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from packaging_support import REPO

IMAGES_SH = REPO / "cluster" / "images.sh"


def podman_available() -> bool:
    if shutil.which("podman"):
        return True
    if os.geteuid() != 0 or not shutil.which("apt-cache"):
        return False
    policy = subprocess.run(["apt-cache", "policy", "podman"], capture_output=True, text=True)
    return "Candidate:" in policy.stdout and "Candidate: (none)" not in policy.stdout


# A cold build takes minutes; whichever test comes first builds (the others find it cached).
pytestmark = [pytest.mark.skipif(not podman_available(),
                                 reason="podman is neither installed nor installable from Debian"),
              pytest.mark.timeout(3600)]


def images_sh(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(IMAGES_SH), *args], capture_output=True, text=True,
                          timeout=timeout)


def run_image(image: str, *args: str, entrypoint: str | None = None,
              locked_down: bool = True) -> subprocess.CompletedProcess[str]:
    """`podman run` as the cluster runs the pods (the trainer pod's securityContext)."""
    options = ["--rm"]
    if locked_down:
        options += ["--user", "65532:65532", "--read-only", "--cap-drop", "ALL",
                    "--network", "none", "--tmpfs", "/tmp"]
    if entrypoint:
        options += ["--entrypoint", entrypoint]
    return images_sh("run", *options, image, *args)


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """images.env after `cluster/images.sh build` (cold: minutes; warm: seconds)."""
    result = images_sh("build", timeout=3600)
    assert result.returncode == 0, result.stderr[-4000:]
    env_file = Path(os.environ.get("CACHE_DIR", Path.home() / ".cache" / "finetune-operator"))
    env_file = env_file / "images" / "images.env"
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines())


def installed_distributions(image: str) -> set[str]:
    listing = run_image(image, "-c", "import importlib.metadata as m; "
                        "print('\\n'.join(d.metadata['Name'] for d in m.distributions()))",
                        entrypoint="python")
    assert listing.returncode == 0, listing.stderr
    return {re.sub(r"[-_.]+", "-", name).lower() for name in listing.stdout.split()}


def test_images_env_names_content_addressed_images_and_their_archives(images):
    tree_hash = images_sh("hash").stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{12}", tree_hash)
    assert set(images) == {"FINETUNE_OPERATOR_IMAGE", "FINETUNE_TRAINER_IMAGE",
                           "FINETUNE_OPERATOR_ARCHIVE", "FINETUNE_TRAINER_ARCHIVE"}
    for name in ("operator", "trainer"):
        image = images[f"FINETUNE_{name.upper()}_IMAGE"]
        assert image == f"localhost/finetune-{name}:{tree_hash}"
        archive = Path(images[f"FINETUNE_{name.upper()}_ARCHIVE"])
        assert archive.name == f"finetune-{name}-{tree_hash}.tar" and archive.is_file()
        # A docker-archive: what `ctr images import` reads, tagged with the image's name.
        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        assert manifest[0]["RepoTags"] == [image]


def test_an_unchanged_tree_rebuilds_nothing(images):
    if not images["FINETUNE_OPERATOR_IMAGE"].endswith(":" + images_sh("hash").stdout.strip()):
        pytest.skip("the tree changed since the session built the images")
    started = time.monotonic()
    result = images_sh("build")
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "building" not in result.stderr and "written" not in result.stderr, result.stderr
    assert seconds < 30, f"warm build took {seconds:.0f} s"


def test_operator_image_has_kopf_and_no_torch(images):
    installed = installed_distributions(images["FINETUNE_OPERATOR_IMAGE"])
    assert {"kopf", "kubernetes", "prometheus-client", "finetune-operator"} <= installed
    assert not installed & {"torch", "torchvision", "timm"}
    assert not [name for name in installed if name.startswith(("nvidia-", "cuda-"))]


def test_trainer_image_has_torch_and_no_kopf(images):
    installed = installed_distributions(images["FINETUNE_TRAINER_IMAGE"])
    assert {"torch", "torchvision", "timm", "boto3", "finetune-operator"} <= installed
    assert not installed & {"kopf", "kubernetes"}


def test_trainer_runs_as_65532_on_a_read_only_root_without_network(images):
    trainer = images["FINETUNE_TRAINER_IMAGE"]
    default_user = run_image(trainer, "-c", "import os; print(os.getuid(), os.getgid())",
                             entrypoint="python", locked_down=False)
    assert default_user.stdout.split() == ["65532", "65532"], default_user.stderr

    help_text = run_image(trainer, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert "usage: python -m finetune_trainer" in help_text.stdout
    cli = run_image(trainer, "--help", entrypoint="finetune")
    assert cli.returncode == 0 and "usage: finetune" in cli.stdout, cli.stderr

    probe = run_image(trainer, "-c", """
import os, torch, torchvision, timm, matplotlib.pyplot
for path in ("/tmp/probe", os.environ["TORCH_HOME"] + "/probe", "/opt/venv/probe", "/probe"):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").write("x")
        print(path, "writable")
    except OSError as error:
        print(path, "refused", error.errno)
""", entrypoint="python")
    assert probe.returncode == 0, probe.stderr
    results = dict(line.split(" ", 1) for line in probe.stdout.splitlines())
    assert results["/tmp/probe"] == "writable"
    assert results["/tmp/.cache/torch/probe"] == "writable"
    assert results["/opt/venv/probe"].startswith("refused")
    assert results["/probe"].startswith("refused")


def test_operator_image_without_a_cluster_says_so_in_one_line(images):
    result = run_image(images["FINETUNE_OPERATOR_IMAGE"])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("finetune-operator: configuration error: no Kubernetes "
                               "configuration: no in-cluster service account"), lines[0]
