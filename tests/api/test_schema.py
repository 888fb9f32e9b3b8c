"""The FineTuneJob API: one schema, generated CRDs that cannot drift, and local validation that
names the field at fault."""

import copy
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from finetune_api import crd, validation
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


def test_each_cel_rule_reads_only_the_fields_its_verdict_is_remembered_by():
    """A rule's verdict is remembered by the values of the `self.<field>`s it names; a rule that
    reads `self` whole (or a macro on it) is never projected. Checked against the rules' text,
    so a new rule cannot slip past the projection unnoticed."""
    rules = list(validation._cel_rules(spec_schema()))
    assert rules
    for rule in rules:
        if rule.reads is None:
            continue
        named = set(re.findall(r"\bself\.(\w+)", rule.rule))
        assert set(rule.reads) == named, rule.rule
        assert len(re.findall(r"\bself\b", rule.rule)) == len(re.findall(r"\bself\.", rule.rule))
    assert validation._fields_read("self.all(x, x > 0)", {"properties": {"a": {}}}) is None
    assert validation._fields_read("self > 0.0", {}) is None
    assert validation._fields_read("has(self.a) || self.b == 1",
                                   {"properties": {"a": {}, "b": {}}}) == ("a", "b")


@pytest.mark.parametrize("good,bad,field", [
    # Same fields elsewhere, only the ones the rule reads differ.
    ({**MINIMAL_SPEC, "epochs": 4, "freeze": {"policy": "AllButHead", "unfreezeAtEpoch": 3}},
     {**MINIMAL_SPEC, "epochs": 3, "freeze": {"policy": "AllButHead", "unfreezeAtEpoch": 3}},
     "spec.freeze.unfreezeAtEpoch"),
    (_with("dataset.validationSplit", 0.5), _with("dataset.validationSplit", 1.0),
     "spec.dataset.validationSplit"),
    ({**MINIMAL_SPEC, "strategy": "FromScratch"},
     {**MINIMAL_SPEC, "strategy": "FromScratch", "freeze": {"policy": "AllButHead"}},
     "spec.freeze.policy"),
])
def test_remembered_verdicts_never_let_a_bad_spec_through(good, bad, field):
    for _ in range(2):  # the second round answers from the remembered verdicts
        validate_spec(good)
        with pytest.raises(SpecError) as raised:
            validate_spec(bad)
        assert any(p.startswith(field) for p in raised.value.problems), raised.value.problems
    # Outputs differ job by job; the verdicts on the rules that never read them are shared.
    before = len(validation._verdicts.verdicts)
    validate_spec({**good, "output": {"uri": "s3://models/another-job/"}})
    assert len(validation._verdicts.verdicts) == before


def test_the_validator_is_built_once_by_threads_that_meet_their_first_spec_together(monkeypatch):
    built = []
    real = validation.spec_schema

    def counting_schema():
        built.append(1)
        return real()

    monkeypatch.setattr(validation, "_compiled_once", None)
    monkeypatch.setattr(validation, "spec_schema", counting_schema)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: validate_spec(MINIMAL_SPEC), range(8)))
    assert len(built) == 1
