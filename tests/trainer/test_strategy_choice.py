"""`strategy: Auto` (issue 7): the rule in finetune_trainer.strategy, checked at its boundaries and
against the measurements it was derived from (docs/strategies.json, written by
bench/strategies.py): at every dataset size of the study where Auto's pick was measured, the pick
is within one accuracy point of the best measured strategy, except where docs/strategies.md says
it is not and why."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from finetune_trainer import strategy
from finetune_trainer.strategy import choose_strategy

REPO = Path(__file__).resolve().parents[2]
STUDY_JSON = REPO / "docs" / "strategies.json"
STUDY_PAGE = REPO / "docs" / "strategies.md"
ONE_POINT = 0.01


def load_bench():
    if "bench_strategies" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_strategies",
                                                      REPO / "bench" / "strategies.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["bench_strategies"]


def test_a_declared_strategy_is_kept():
    for declared in ("LinearProbe", "FineTune", "FromScratch"):
        assert choose_strategy(declared, train_images=10, weights="None") == (
            declared, "set in spec.strategy")


def test_no_pretrained_weights_means_from_scratch():
    chosen, reason = choose_strategy("Auto", train_images=50_000, weights="None")
    assert chosen == "FromScratch" and "weights is None" in reason


@pytest.mark.parametrize("weights", ["Pretrained", "s3://models/lite0.pth", "/models/lite0.pth"])
def test_the_size_boundary(weights):
    boundary = strategy.LINEAR_PROBE_MAX_TRAIN_IMAGES
    at, _ = choose_strategy("Auto", train_images=boundary, weights=weights)
    above, _ = choose_strategy("Auto", train_images=boundary + 1, weights=weights)
    assert (at, above) == ("LinearProbe", "FineTune")
    assert choose_strategy("Auto", train_images=2, weights=weights)[0] == "LinearProbe"
    assert choose_strategy("Auto", train_images=60_000, weights=weights)[0] == "FineTune"


def test_the_reason_names_the_count_the_threshold_and_the_evidence():
    for images in (90, 50_000):
        _, reason = choose_strategy("Auto", train_images=images, weights="Pretrained")
        assert reason.startswith("Auto: ")
        assert str(images) in reason and str(strategy.LINEAR_PROBE_MAX_TRAIN_IMAGES) in reason
        assert "docs/strategies.md" in reason


def study_cells():
    """(dataset, size) -> strategy -> mean accuracy, from the committed study."""
    bench = load_bench()
    table = bench.summarise(json.loads(STUDY_JSON.read_text())["runs"])
    return bench, {key: {name: cell["mean"] for name, cell in cells.items()}
                   for key, cells in table.items()}


def test_the_threshold_is_the_one_the_study_measured():
    bench = load_bench()
    results = json.loads(STUDY_JSON.read_text())
    assert strategy.LINEAR_PROBE_MAX_TRAIN_IMAGES == bench.derive_linear_probe_max(results), \
        "the study moved Auto's threshold: update LINEAR_PROBE_MAX_TRAIN_IMAGES and the page"


def test_the_derivation_stops_at_the_first_size_where_a_fine_tune_wins():
    bench = load_bench()

    def run(size, strategy_name, accuracy):
        return {"dataset": "d", "size": size, "strategy": strategy_name, "seed": 0,
                "accuracy": accuracy, "seconds": 1.0}
    runs = [run(100, "LinearProbe", 0.60), run(100, "FineTune", 0.50),
            run(1000, "LinearProbe", 0.80), run(1000, "FineTune", 0.805),  # within a point
            run(5000, "LinearProbe", 0.85), run(5000, "FineTuneFrozen", 0.90),
            run(20000, "LinearProbe", 0.95), run(20000, "FineTune", 0.90),
            run(50000, "Baseline", 0.99)]  # no probe and fine-tune to compare: ignored
    results = {"runs": {str(i): r for i, r in enumerate(runs)}}
    assert bench.derive_linear_probe_max(results) == 1000
    assert bench.derive_linear_probe_max({"runs": {"0": runs[4], "1": runs[5]}}) is None


def test_auto_is_within_one_point_of_the_best_measured_strategy():
    bench, cells = study_cells()
    page = STUDY_PAGE.read_text()
    checked, misses = 0, []
    for (dataset, size), means in sorted(cells.items()):
        picked, _ = choose_strategy("Auto", train_images=size, weights="Pretrained")
        best = bench.best_deep({name: {"mean": mean} for name, mean in means.items()})
        if picked not in means or best is None:
            continue  # Auto's pick was not measured at this size (see the page)
        checked += 1
        if means[picked] < means[best] - ONE_POINT:
            misses.append((dataset, size, picked, best))
    assert checked >= 4, "the study should measure Auto's pick at several sizes"
    for dataset, size, picked, best in misses:
        # Every miss is stated, with its reason, in the study's page.
        assert f"{dataset} at {size}" in page, (dataset, size, picked, best)


def test_the_study_table_in_the_page_is_the_one_the_rule_was_derived_from():
    bench = load_bench()
    table = bench.markdown_table(json.loads(STUDY_JSON.read_text()))
    assert table in STUDY_PAGE.read_text(), "rerun: python bench/strategies.py --report-only"
