"""`strategy: Auto` (issue 16): a declared strategy runs as declared, Auto without weights is
FromScratch, Auto with weights races (tests/trainer/test_race.py); and the study that measures
the race against every single strategy (docs/strategies.json, written by bench/strategies.py)
is the one its page shows, trained enough, and every size where Auto was more than one point
behind the best strategy is named on the page."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from finetune_trainer import budget
from finetune_trainer.strategy import choose_strategy

REPO = Path(__file__).resolve().parents[2]
STUDY_JSON = REPO / "docs" / "strategies.json"
STUDY_PAGE = REPO / "docs" / "strategies.md"
ONE_POINT = 1.0  # in accuracy points


def load_bench():
    """bench/strategies.py as the module `strategies`, importable by the study's worker
    processes too (spawned children get this sys.path)."""
    bench = str(REPO / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("strategies")


@pytest.mark.parametrize("declared", ["LinearProbe", "FineTune", "FromScratch"])
def test_a_declared_strategy_is_kept(declared):
    assert choose_strategy(declared, weights="Pretrained") == (declared, "set in spec.strategy")


def test_auto_races_unless_there_are_no_pretrained_weights():
    assert choose_strategy("Auto", weights="None")[0] == "FromScratch"
    assert choose_strategy("Auto", weights="s3://models/w.pth")[0] == "Auto"


def test_the_study_table_in_the_page_is_the_one_in_the_json():
    table = load_bench().markdown_table(json.loads(STUDY_JSON.read_text()))
    assert table in STUDY_PAGE.read_text(), "rerun: python bench/strategies.py --report-only"


def test_the_studys_deep_runs_were_planned_for_the_trainers_step_budget():
    runs = json.loads(STUDY_JSON.read_text())["runs"].values()
    deep = [run for run in runs if run["strategy"] in ("FineTuneFrozen", "FineTune",
                                                       "FromScratch")]
    assert deep
    for run in deep:
        steps_per_epoch = run["steps"] / run["epochs"]
        assert run["plannedEpochs"] * steps_per_epoch >= min(
            budget.TARGET_STEPS, budget.MAX_EPOCHS * steps_per_epoch), run


def test_every_size_where_auto_missed_the_best_by_more_than_a_point_is_on_the_page():
    gaps = load_bench().auto_versus_best(json.loads(STUDY_JSON.read_text()))
    assert gaps, "the study should compare Auto with the best strategy at some size"
    page = STUDY_PAGE.read_text()
    for (dataset, size), (_, gap) in gaps.items():
        if gap < -ONE_POINT:
            assert f"{dataset} at {size}" in page, (dataset, size, gap)


def test_a_short_study_measures_every_strategy_and_auto_with_its_race_cost(tmp_path):
    """The study's own code end to end, small: digits, 30 training images, one seed, 32 px, two
    epochs. Every column is measured, Auto's race cost is recorded, and the table compares it
    with the best single strategy."""
    bench = load_bench()
    settings, _ = bench.settings_from_args([
        "--datasets", "digits", "--sizes", "30", "--seeds", "1", "--image-size", "32",
        "--epochs", "2", "--jobs", "1", "--work-dir", str(tmp_path / "work"),
        "--out-dir", str(tmp_path / "out")])
    results = bench.run_study(settings, log=lambda *_: None)
    runs = {run["strategy"]: run for run in results["runs"].values()}
    assert set(runs) == set(bench.STRATEGIES)
    auto = runs["Auto"]
    assert auto["race"]["costRatio"] >= 1 and auto["steps"] > 0
    assert {entry["strategy"] for entry in auto["leaderboard"]} >= {"LinearProbe", "Baseline"}
    assert all(runs[name]["epochs"] == 2 and runs[name]["steps"] == 2 for name in bench.DEEP)
    best_name, gap = bench.auto_versus_best(results)[("digits", 30)]
    best = max(runs[name]["accuracy"] for name in bench.DEPLOYABLE)
    assert runs[best_name]["accuracy"] == best
    assert gap == pytest.approx(100 * (auto["accuracy"] - best))
    table = bench.markdown_table(results)
    assert "| digits | 30 |" in table and f"{gap:+.1f}" in table
