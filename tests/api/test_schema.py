"""The FineTuneJob API: one schema, generated CRDs that cannot drift, and local validation that
names the field at fault."""

import copy

import pytest
import yaml

from finetune_api import crd
from finetune_api.schema import spec_schema, status_schema
from finetune_api.validation import SpecError, validate_manifest, validate_spec

MINIMAL_SPEC = {
    "dataset": {"uri": "s3://datasets/fashion/"},
    "model": {"backbone": "efficientnet_lite0"},
    "output": {"uri": "s3://models/fashion/"},
}


def _walk(schema, path="spec"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")


def test_generated_crds_match_the_schema():
    assert crd.main(["--check"]) == 0, "run `python -m finetune_api.crd --write`"


def test_crd_copies_are_identical_and_parse():
    texts = [p.read_text() for p in crd.CRD_PATHS]
    assert texts[0] == texts[1]
    document = yaml.safe_load(texts[0])
    version = document["spec"]["versions"][0]
    assert document["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]][:5] == [
        "Phase", "Backbone", "Strategy", "Epoch", "Accuracy"]


@pytest.mark.parametrize("schema", [spec_schema(), status_schema()], ids=["spec", "status"])
def test_every_field_is_described_for_kubectl_explain(schema):
    undescribed = [path for path, node in _walk(schema) if not node.get("description")]
    assert undescribed == []


def test_every_field_has_a_structural_type():
    untyped = [path for path, node in _walk(spec_schema())
               if "type" not in node and not node.get("x-kubernetes-int-or-string")]
    assert untyped == []


def test_defaults_fill_nested_objects_like_the_api_server():
    spec = validate_spec(MINIMAL_SPEC)
    assert spec["strategy"] == "Auto"
    assert spec["optimizer"]["backboneLrMultiplier"] == 0.1
    assert spec["freeze"] == {"policy": "None", "batchNorm": "Frozen"}
    assert spec["dataset"]["s3"]["addressingStyle"] == "Auto"
    assert "earlyStopping" not in spec  # present only when asked for


def test_whole_manifest_and_bare_spec_are_both_accepted():
    manifest = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": "x"}, "spec": MINIMAL_SPEC}
    assert validate_manifest(manifest) == validate_spec(MINIMAL_SPEC)


def _with(path, value):
    spec = copy.deepcopy(MINIMAL_SPEC)
    *parents, leaf = path.split(".")
    node = spec
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return spec


@pytest.mark.parametrize("spec,field,words", [
    (_with("epochs", 0), "spec.epochs", "minimum"),
    (_with("strategy", "Magic"), "spec.strategy", "is not one of"),
    (_with("dataset.uri", "http://bucket/x"), "spec.dataset.uri", "s3://bucket/prefix/"),
    (_with("dataset.validationSplit", 1.0), "spec.dataset.validationSplit", "less than 1"),
    (_with("optimizer.lr", 0.1), "spec.optimizer", "'lr' was unexpected"),
    (_with("optimizer.learningRate", 0), "spec.optimizer.learningRate", "minimum"),
    (_with("freeze.policy", "FirstStages"), "spec.freeze.stages", "required with policy FirstStages"),
    (_with("freeze.stages", 2), "spec.freeze.stages", "not allowed with other policies"),
    ({**_with("freeze.policy", "AllButHead"), "epochs": 3,
      "freeze": {"policy": "AllButHead", "unfreezeAtEpoch": 3}},
     "spec.freeze.unfreezeAtEpoch", "less than epochs"),
    ({**MINIMAL_SPEC, "epochs": 2, "schedule": {"warmupEpochs": 2}},
     "spec.schedule.warmupEpochs", "less than epochs"),
    ({**MINIMAL_SPEC, "strategy": "FromScratch", "freeze": {"policy": "AllButHead"}},
     "spec.freeze.policy", "FromScratch"),
    ({k: v for k, v in MINIMAL_SPEC.items() if k != "output"}, "spec", "'output' is a required"),
])
def test_bad_specs_name_the_field(spec, field, words):
    with pytest.raises(SpecError) as raised:
        validate_spec(spec)
    assert any(p.startswith(field + ":") and words in p for p in raised.value.problems), \
        raised.value.problems


def test_wrong_kind_is_refused():
    with pytest.raises(SpecError, match="kind: must be FineTuneJob"):
        validate_manifest({"apiVersion": "finetune.dev/v1alpha1", "kind": "Job",
                           "spec": MINIMAL_SPEC})
