"""The Dockerfile, parsed: targets, users, entry points, pinned bases, COPY sources that exist and
survive .dockerignore, final stages without build tools, syntax that Debian's buildah builds, and
the content hash cluster/images.sh tags the images with. Building and running the images:
test_images_build.py."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field

import pytest

from packaging_support import REPO

DOCKERFILE = REPO / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) pairs, continuation lines joined and heredoc bodies folded into their
    instruction."""
    lines = text.splitlines()
    result, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        heredoc = re.search(r"<<-?'?(\w+)'?", line)
        if heredoc:
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(1):
                body.append(lines[i])
                i += 1
            i += 1
            line += "\n" + "\n".join(body)
        keyword, _, args = line.partition(" ")
        result.append((keyword.upper(), args.strip()))
    return result


def stages() -> dict[str, Stage]:
    parsed: dict[str, Stage] = {}
    current = None
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert match, args
            current = Stage(match.group(2) or f"stage{len(parsed)}", match.group(1))
            parsed[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args))
    return parsed


def global_args() -> dict[str, str]:
    defaults = {}
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = args.partition("=")
            defaults[name] = default
    return defaults


def lineage(name: str) -> list[Stage]:
    """A stage and the stages it is built FROM, nearest first."""
    all_stages, chain = stages(), []
    while name in all_stages:
        chain.append(all_stages[name])
        name = all_stages[name].base
    return chain


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path.split("/")[0], pattern):
            excluded = not negate
    return excluded


def test_both_targets_exist():
    assert {"operator", "trainer"} <= set(stages())


@pytest.mark.parametrize("target, entrypoint", [
    ("operator", ["finetune-operator"]),
    ("trainer", ["python", "-m", "finetune_trainer"]),
])
def test_targets_run_non_root_with_their_entrypoint(target, entrypoint):
    stage = stages()[target]
    users = stage.all("USER")
    assert users, f"{target} sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in {"0", "root"} and uid.isdigit(), f"{target} runs as {users[-1]}"
    assert json.loads(stage.all("ENTRYPOINT")[-1]) == entrypoint
    env = " ".join(stage.all("ENV"))
    assert "HOME=/tmp" in env, "HOME must be writable under a read-only root filesystem"


def test_entrypoints_exist_in_the_code():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "finetune-operator" in scripts
    assert (REPO / "trainer" / "finetune_trainer" / "__main__.py").exists(), \
        "`python -m finetune_trainer` needs trainer/finetune_trainer/__main__.py"


def test_operator_image_has_no_torch():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    operator_deps = pyproject["dependencies"] + pyproject["optional-dependencies"]["operator"]
    assert not any(re.match(r"(torch|torchvision|timm)\b", d) for d in operator_deps)
    runs = " ".join(run for stage in lineage("operator-build") for run in stage.all("RUN"))
    assert "requirements-operator.txt" in runs and "requirements-trainer.txt" not in runs
    # The final stage copies only the operator's environment (without pip) and the project.
    copies = stages()["operator"].all("COPY")
    assert copies == ["--from=operator-venv /opt/venv /opt/venv",
                      "--from=operator-build /opt/finetune /opt/finetune"]
    assert lineage("operator-venv")[1].name == "operator-deps"


def test_a_code_change_leaves_the_environment_layer_alone():
    """The final stages copy the environment from a stage that never sees the sources, so a code
    change adds a small layer instead of another copy of the 6 GB environment."""
    for target in ("operator", "trainer"):
        venv_stage, build_stage = (c.split()[0].removeprefix("--from=")
                                   for c in stages()[target].all("COPY"))
        for stage in lineage(venv_stage):
            assert not [c for c in stage.all("COPY") if c.split()[0] != "pyproject.toml"], stage
        env = " ".join(stages()[target].all("ENV"))
        assert "PYTHONPATH=/opt/finetune" in env and "/opt/finetune/bin:/opt/venv/bin" in env
        assert "--target /opt/finetune" in " ".join(stages()[build_stage].all("RUN"))


def test_final_stages_have_no_build_tools():
    for target in ("operator", "trainer"):
        stage = stages()[target]
        assert not stage.all("RUN"), f"{target} runs commands: build them in a builder stage"
        # Built FROM a plain base image, not from the builder.
        assert stage.base not in stages(), f"{target} is built on stage {stage.base}"
        for copy in stage.all("COPY"):
            assert copy.startswith("--from="), f"{target} copies from the context: {copy}"


def test_base_images_are_pinned():
    args = global_args()
    for stage in stages().values():
        if stage.base in stages():
            continue
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), stage.base)
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), image)
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and re.search(r"\d+\.\d+\.\d+", tag), f"{stage.name}: {image} has no exact tag"
        assert tag != "latest"
        assert "DIGEST" in stage.base, f"{stage.name}: no digest build argument"


def test_copy_sources_exist_and_are_in_the_build_context():
    for stage in stages().values():
        for copy in stage.all("COPY"):
            parts = [p for p in copy.split() if not p.startswith("--")]
            if copy.startswith("--from="):
                continue
            for source in parts[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not dockerignore_excludes(source), f"COPY {source}: .dockerignore drops it"


def test_dependencies_are_installed_before_sources_are_copied():
    """Layer order for cache reuse: a code change (or a README edit) must not reinstall torch."""
    assert stages()["builder"].all("COPY") == ["pyproject.toml ./"]
    for name in ("operator-build", "trainer-build"):
        steps = [step for stage in reversed(lineage(name)) for step in stage.instructions]
        install = next(i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "-r requirements" in a)
        first_source = next(i for i, (kw, a) in enumerate(steps) if kw == "COPY" and
                            a.split()[0] in ("README.md", "api", "operator", "trainer"))
        assert install < first_source, name


def test_plain_syntax_that_debian_buildah_builds():
    """buildah 1.28 (Debian bookworm) parses no heredocs and no BuildKit-only flags, and a
    `# syntax=` line would make BuildKit pull a frontend image from the internet."""
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    for keyword, args in instructions(text):
        assert "<<" not in args, f"{keyword} uses a heredoc: {args.splitlines()[0]}"
        if keyword == "RUN":
            assert not re.match(r"--(mount|network|security)\b", args), f"RUN {args[:40]}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"--(link|parents|exclude|chmod|checksum)\b", args), args


def test_dockerignore_keeps_the_context_small():
    for path in ("tests", "helm", ".git", "docs", "examples", "monitoring"):
        assert dockerignore_excludes(path), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "api", "operator", "trainer"):
        assert not dockerignore_excludes(path)


# --- cluster/images.sh: the content hash in the images' tags ----------------------------------

IMAGES_SH = REPO / "cluster" / "images.sh"


def images_sh(tree, *args: str) -> str:
    result = subprocess.run([str(tree / "cluster" / "images.sh"), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_hash_covers_the_build_context_after_dockerignore():
    files = images_sh(REPO, "files").split()
    tracked = subprocess.run(["git", "ls-files", "api", "operator", "trainer"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert set(tracked) <= set(files)
    assert {"Dockerfile", "pyproject.toml", "README.md"} <= set(files)
    for path in files:
        assert path in ("Dockerfile", "pyproject.toml", "README.md") or \
            path.split("/")[0] in ("api", "operator", "trainer"), path
        assert "__pycache__" not in path and not path.endswith(".pyc") and ".egg-info" not in path
        assert path == "Dockerfile" or not dockerignore_excludes(path), path


def test_the_hash_changes_with_what_goes_into_the_images_only(tmp_path):
    tree = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    (tree / "cluster").mkdir(parents=True)
    shutil.copy2(IMAGES_SH, tree / "cluster" / "images.sh")
    shutil.copy2(IMAGES_SH.parent / "lib.sh", tree / "cluster" / "lib.sh")
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, tree / name)
    for name in ("api", "operator", "trainer"):
        shutil.copytree(REPO / name, tree / name, ignore=ignore)
    first = images_sh(tree, "hash").strip()
    assert re.fullmatch(r"[0-9a-f]{12}", first)

    (tree / "docs").mkdir()
    (tree / "docs" / "notes.md").write_text("not in the image")
    (tree / "trainer" / "finetune_trainer" / "__pycache__").mkdir(exist_ok=True)
    (tree / "trainer" / "finetune_trainer" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"0")
    assert images_sh(tree, "hash").strip() == first, "a file outside the build context counted"

    (tree / "trainer" / "finetune_trainer" / "new_module.py").write_text("")
    second = images_sh(tree, "hash").strip()
    assert second != first
    with open(tree / "Dockerfile", "a") as dockerfile:
        dockerfile.write("\n# a comment is a change too\n")
    third = images_sh(tree, "hash").strip()
    assert third not in (first, second)
    script = tree / "cluster" / "images.sh"
    script.write_text(script.read_text().replace(",ca-certificates", ",ca-certificates,curl", 1))
    assert images_sh(tree, "hash").strip() not in (first, second, third), \
        "the base image's recipe is not in the hash"
