"""strategy: Auto's race: the plan stays within its budget, the candidates follow the rules of
thumb, and a real race on tiny data writes a leaderboard with one entry per candidate, the
winner continued from its race state, the same leaderboard again with the same seed, and the
top of it in the termination message and the FineTuneJob's status."""

from __future__ import annotations

import json

import pytest

from finetune_trainer import race, runtime, train
from finetune_trainer.metrics import TrainerMetrics
from trainer_helpers import manifest, write_three_classes, write_tiny_weights


@pytest.mark.parametrize("steps_per_epoch", [1, 3, 15, 62, 1000])
@pytest.mark.parametrize("candidates", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 7, 10, 20, 33, 100])
def test_the_losers_never_train_more_than_the_budget(candidates, epochs, steps_per_epoch):
    plan = race.race_plan(candidates, epochs, steps_per_epoch=steps_per_epoch)
    assert 1 <= plan.candidates <= candidates
    assert plan.loser_epochs() <= race.RACE_EXTRA * epochs
    rung_epochs = [rung_end for rung_end, _ in plan.rungs]
    assert rung_epochs == sorted(rung_epochs) and all(0 < e < epochs or epochs == 1
                                                      for e in rung_epochs)
    # Each rung keeps the better half, down to the one finalist.
    alive = plan.candidates
    for _, kept in plan.rungs:
        assert kept == alive // 2
        alive = kept
    assert alive == 1


def test_with_enough_epochs_every_candidate_races():
    plan = race.race_plan(5, 100, steps_per_epoch=200)
    assert plan.candidates == 5
    assert plan.rungs == ((6, 2), (12, 1))  # 100/16 and 100/8 epochs
    assert plan.loser_epochs() == 3 * 6 + 1 * 12
    assert race.race_plan(5, 3, steps_per_epoch=200).candidates == 2  # room for two


def test_a_rung_lasts_enough_optimizer_steps_to_rank_more_than_a_start():
    # 500 images at batch 32: 15 steps an epoch, 20 epochs planned. Rungs of 1 and 2 epochs
    # (15 and 30 steps) would fit four candidates; 50 steps leave room for three.
    plan = race.race_plan(4, 20, steps_per_epoch=15)
    assert plan.rungs == ((4, 1),) and plan.candidates == 3
    # Where a quarter of the epochs is shorter than that, the quarter.
    assert race.race_plan(4, 4, steps_per_epoch=4).rungs == ((1, 1),)


def test_rules_of_thumb_set_the_order_and_far_data_adds_from_scratch():
    small = race.fine_tune_candidates(stage_count=8, train_images=500, far_from_pretraining=False)
    large = race.fine_tune_candidates(stage_count=8, train_images=50000,
                                      far_from_pretraining=False)
    far = race.fine_tune_candidates(stage_count=8, train_images=500, far_from_pretraining=True)
    assert [c.name for c in small] == [
        "FineTune all layers lr 0.003 x0.3 no augmentation", "FineTune first 3 stages frozen",
        "FineTune all layers"]
    assert [c.name for c in large][1:] == ["FineTune all layers", "FineTune first 3 stages frozen"]
    assert [c.strategy for c in far] == ["FineTune", "FromScratch", "FineTune", "FineTune"]


def test_a_candidate_replaces_the_freeze_policy_and_merges_the_optimizer():
    base = train.resolve_spec(manifest("/data/", "/out/", freeze={
        "policy": "FirstStages", "stages": 2, "unfreezeAtEpoch": 1}, epochs=4))
    fast, frozen, _ = race.fine_tune_candidates(stage_count=8, train_images=10,
                                                far_from_pretraining=False)
    spec = fast.spec(base)
    assert spec["freeze"] == {"policy": "None", "batchNorm": "Frozen"}
    assert spec["optimizer"]["learningRate"] == race.FAST_LEARNING_RATE
    assert spec["optimizer"]["weightDecay"] == base["optimizer"]["weightDecay"]
    assert spec["augmentation"] == "None" and base["freeze"]["stages"] == 2  # base untouched
    assert frozen.settings(base) == {"freeze": "FirstStages", "frozenStages": 3,
                                     "learningRate": 0.01, "backboneLrMultiplier": 0.1,
                                     "augmentation": "None"}


def _board(*accuracies_by_name):
    return race.ranked([race.leaderboard_entry(name, strategy, val_accuracy=accuracy, epochs=1,
                                               steps=1, seconds=1.0,
                                               deployable=strategy != "Baseline")
                        for name, strategy, accuracy in accuracies_by_name])


def test_the_reason_says_plainly_when_the_pixel_baseline_wins():
    lost = race.race_reason(_board(("LinearProbe", "LinearProbe", 0.73),
                                   ("FineTune all layers", "FineTune", 0.70),
                                   ("Baseline", "Baseline", 0.80)),
                            train_images=540, val_images=60, cost_ratio=1.4)
    assert "LinearProbe won with 0.730" in lost and "next: FineTune all layers 0.700" in lost
    assert "pixel baseline (0.800) beat every deployable candidate" in lost
    assert "more images or a larger spec.model.imageSize" in lost and "1.40x" in lost
    won = race.race_reason(_board(("LinearProbe", "LinearProbe", 0.73),
                                  ("FineTune all layers", "FineTune", 0.85),
                                  ("Baseline", "Baseline", 0.80)),
                           train_images=540, val_images=60, cost_ratio=1.4)
    assert "FineTune all layers won with 0.850" in won and "baseline" not in won


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """One Auto race on tiny data, run twice with the same seed, through runtime.run_job so the
    termination message is written too."""
    tmp = tmp_path_factory.mktemp("auto")
    shapes = write_three_classes(tmp / "shapes", train_per_class=10, val_per_class=4)
    weights = write_tiny_weights(tmp / "pretrained.pt")
    reports = []
    for attempt in ("first", "second"):
        job = manifest(str(shapes), str(tmp / attempt), strategy="Auto", epochs=4, model={
            "backbone": "test_efficientnet", "weights": str(weights), "imageSize": 32})
        termination = tmp / f"{attempt}.termination"
        assert runtime.run_job(job, termination_log=str(termination), metrics=TrainerMetrics(),
                               log=lambda *_: None, cache_dir=tmp / "cache") == 0
        reports.append((json.loads((tmp / attempt / "report.json").read_text()),
                        json.loads(termination.read_text())))
    return reports


def test_auto_writes_a_leaderboard_with_one_entry_per_candidate(auto_run):
    report, _ = auto_run[0]
    board, summary = report["leaderboard"], report["race"]
    assert [e["valAccuracy"] for e in board] == sorted((e["valAccuracy"] for e in board),
                                                       reverse=True)
    deployable = [e for e in board if e["deployable"]]
    assert len(deployable) == summary["candidates"]  # the probe and the fine-tune candidates
    assert [e["strategy"] for e in board if not e["deployable"]] == ["Baseline"]
    assert report["strategy"] == deployable[0]["strategy"]
    assert report["bestValAccuracy"] == pytest.approx(deployable[0]["valAccuracy"])
    finalists = [e for e in board if e["outcome"].startswith("finalist")]
    assert len(finalists) == 1 and finalists[0]["candidate"] == summary["finalist"]
    # Four planned epochs: one epoch each in the only rung, then the finalist continues to four
    # (early stopping may end it sooner), the losers stop at the rung.
    assert summary["rungs"] == [{"epochs": 1, "kept": 1}]
    assert all(e["epochs"] == 1 for e in board if e["outcome"] == "out after rung 1")
    assert 1 <= finalists[0]["epochs"] <= 4
    assert summary["costRatio"] == pytest.approx(
        (summary["raceSeconds"] + summary["finalistSeconds"]) / summary["finalistSeconds"])
    if report["strategy"] != "LinearProbe":  # the finalist's epochs are the report's history
        assert len(report["history"]) == finalists[0]["epochs"]
    assert report["strategyReason"].startswith(f"Auto: race of {summary['candidates']}")


def test_auto_is_deterministic_with_a_seed(auto_run):
    (first, _), (second, _) = auto_run
    keys = ("candidate", "valAccuracy", "epochs", "steps", "outcome")
    assert [{k: e[k] for k in keys} for e in first["leaderboard"]] == \
        [{k: e[k] for k in keys} for e in second["leaderboard"]]
    assert first["strategy"] == second["strategy"]


def test_the_top_of_the_leaderboard_reaches_the_status(auto_run):
    from finetune_operator.status import _result_fields

    report, termination = auto_run[0]
    assert termination["leaderboard"] == race.top(report["leaderboard"])
    fields = _result_fields(termination, {"strategy": "Auto"})
    assert fields["leaderboard"][0]["candidate"] == report["leaderboard"][0]["candidate"]
    assert fields["resolvedStrategy"] == report["strategy"]
    assert "won with" in fields["strategyReason"]


def test_a_declared_strategy_runs_alone(tmp_path):
    shapes = write_three_classes(tmp_path / "shapes", train_per_class=4, val_per_class=2)
    job = manifest(str(shapes), str(tmp_path / "out"), epochs=1, baseline={"enabled": False})
    report = train.main(job, cache_dir=tmp_path / "cache", log=lambda *_: None)
    assert report["strategy"] == "FineTune" and "leaderboard" not in report


def test_early_stopping_waits_for_its_minimum_and_a_restored_stop_stays_stopped():
    never_better = {"patience": 1, "metric": "ValAccuracy", "minDelta": 1.0}
    stopping = train.EarlyStopping(never_better, min_epochs=3)
    evaluation = train.Evaluation(loss=1.0, accuracy=0.5, targets=None, predictions=None)
    assert [stopping.update(evaluation, epoch) for epoch in (1, 2, 3, 4)] == \
        [False, False, True, True]
    assert train.EarlyStopping(never_better).update(evaluation, 1) is False  # first epoch: best
    assert not train.EarlyStopping(None).says_stop(10)


@pytest.mark.parametrize("loser_epochs,planned,floor", [(0, 5, 1), (2, 5, 3), (4, 8, 5),
                                                        (34, 100, 35), (9, 6, 6)])
def test_the_finalist_trains_as_long_as_the_rest_of_the_race(loser_epochs, planned, floor):
    assert race.finalist_min_epochs(loser_epochs, planned) == floor
    assert race.PROBE_COST_EPOCHS >= 1


def test_early_stopping_cannot_make_the_race_cost_more_than_twice_the_finalist(tmp_path):
    """Early stopping that fires as soon as it may (nothing ever improves by 1.0): without the
    floor the finalist would stop at its race epochs and the losers and probe would outweigh
    it. The finalist trains the losers' epochs plus the probe's before it may stop."""
    shapes = write_three_classes(tmp_path / "shapes", train_per_class=10, val_per_class=4)
    weights = write_tiny_weights(tmp_path / "pretrained.pt")
    job = manifest(str(shapes), str(tmp_path / "out"), strategy="Auto", epochs=12,
                   earlyStopping={"patience": 1, "metric": "ValAccuracy", "minDelta": 1.0},
                   model={"backbone": "test_efficientnet", "weights": str(weights),
                          "imageSize": 32})
    assert runtime.run_job(job, termination_log=None, metrics=TrainerMetrics(),
                           log=lambda *_: None, cache_dir=tmp_path / "cache") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    summary = report["race"]
    finalist = next(e for e in report["leaderboard"] if e["outcome"].startswith("finalist"))
    assert summary["loserEpochs"] >= 2  # the race had losers that trained
    assert summary["finalistMinEpochs"] == summary["loserEpochs"] + race.PROBE_COST_EPOCHS
    assert finalist["epochs"] == summary["finalistMinEpochs"]  # stopped at the first chance
    assert finalist["epochs"] >= summary["loserEpochs"] + race.PROBE_COST_EPOCHS
