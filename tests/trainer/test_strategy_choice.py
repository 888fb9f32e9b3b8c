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
    if "bench_strategies" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_strategies",
                                                      REPO / "bench" / "strategies.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules["bench_strategies"]


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
    for (dataset, size), gap in gaps.items():
        if gap < -ONE_POINT:
            assert f"{dataset} at {size}" in page, (dataset, size, gap)
