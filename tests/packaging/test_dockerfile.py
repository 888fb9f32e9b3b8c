"""The Dockerfile, parsed (no Docker engine here): targets, users, entry points, pinned bases,
COPY sources that exist and survive .dockerignore, and final stages without build tools."""

from __future__ import annotations

import fnmatch
import json
import re
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
    build = stages()["operator-build"]
    runs = " ".join(build.all("RUN"))
    assert "requirements-operator.txt" in runs and "requirements-trainer.txt" not in runs
    # The final stage copies only the operator's environment.
    copies = stages()["operator"].all("COPY")
    assert copies == ["--from=operator-build /opt/venv /opt/venv"]


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
    """Layer order for cache reuse: a code change must not reinstall torch."""
    for name in ("operator-build", "trainer-build"):
        steps = stages()[name].instructions
        install = next(i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "-r requirements" in a)
        first_source = next(i for i, (kw, a) in enumerate(steps)
                            if kw == "COPY" and a.split()[0] in ("api", "operator", "trainer"))
        assert install < first_source, name


def test_dockerignore_keeps_the_context_small():
    for path in ("tests", "helm", ".git", "docs", "examples", "monitoring"):
        assert dockerignore_excludes(path), f"{path} would be sent to the build"
    for path in ("pyproject.toml", "api", "operator", "trainer"):
        assert not dockerignore_excludes(path)
