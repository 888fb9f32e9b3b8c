"""The example manifests pass (or fail) the local validator, naming the same field the API
server names (the server side is in test_e2e_cluster.py)."""

from pathlib import Path

import pytest
import yaml

from finetune_api.validation import SpecError, validate_manifest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


def expected_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <field>'"
    return first.removeprefix("# expect: ").strip()


def names_field(problem: str, field: str) -> bool:
    """`spec.a.b: ...`, or for a missing required field `spec.a: 'b' is a required property`."""
    parent, _, leaf = field.rpartition(".")
    return problem.startswith(field) or (problem.startswith(f"{parent}:") and f"'{leaf}'" in problem)


def test_the_example_is_valid():
    documents = list(yaml.safe_load_all((EXAMPLES / "fashion-mnist.yaml").read_text()))
    finetunejob, = [d for d in documents if d["kind"] == "FineTuneJob"]
    spec = validate_manifest(finetunejob)
    assert spec["resources"]["gpus"] == 1
    secret, = [d for d in documents if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == spec["dataset"]["s3"]["credentialsSecret"]


def test_the_two_worker_example_is_valid():
    spec = validate_manifest(yaml.safe_load(
        (EXAMPLES / "fashion-mnist-two-workers.yaml").read_text()))
    assert spec["resources"]["workers"] == 2
    assert spec["optimizer"]["lrScaling"] == "Linear"


def test_there_are_several_invalid_examples():
    assert len(INVALID) >= 6


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_examples_are_rejected_locally_naming_the_field(path):
    with pytest.raises(SpecError) as rejected:
        validate_manifest(yaml.safe_load(path.read_text()))
    field = expected_field(path)
    assert any(names_field(problem, field) for problem in rejected.value.problems), \
        rejected.value.problems
