"""Progress from a real prometheus_client exposition, as the trainer serves it."""

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from finetune_api import contract
from finetune_operator.progress import KNOWN_METRICS, parse_exposition, progress_patch
from finetune_trainer.metrics import TrainerMetrics

from operator_factories import finetunejob

NOW = datetime(2026, 11, 28, 10, 10, tzinfo=timezone.utc)
EARLIER = NOW - timedelta(minutes=1)
SPEC = finetunejob()["spec"]


CHECKPOINTED = datetime(2026, 11, 28, 10, 7, 30, tzinfo=timezone.utc)


def trainer_exposition(epoch=3, steps=120, checkpoint_epoch=3, checkpoint_step=0,
                       checkpointed=CHECKPOINTED, with_info=True) -> str:
    registry = CollectorRegistry()
    Gauge(contract.METRIC_EPOCH, "epochs", registry=registry).set(epoch)
    Gauge(contract.METRIC_PLANNED_EPOCHS, "planned", registry=registry).set(10)
    Counter(contract.METRIC_STEPS, "steps", registry=registry).inc(steps)
    Gauge(contract.METRIC_PLANNED_STEPS, "planned steps", registry=registry).set(400)
    Gauge(contract.METRIC_TRAIN_LOSS, "loss", registry=registry).set(0.42)
    Gauge(contract.METRIC_VAL_ACCURACY, "acc", registry=registry).set(0.81)
    Gauge(contract.METRIC_BEST_VAL_ACCURACY, "best", registry=registry).set(0.83)
    Gauge(contract.METRIC_ETA, "eta", registry=registry).set(754.6)
    Gauge(contract.METRIC_CHECKPOINT_EPOCH, "ckpt", registry=registry).set(checkpoint_epoch)
    Gauge(contract.METRIC_CHECKPOINT_STEP, "ckpt step", registry=registry).set(checkpoint_step)
    Gauge(contract.METRIC_CHECKPOINT_TIME, "ckpt time", registry=registry).set(
        checkpointed.timestamp() if checkpointed else 0)
    lr = Gauge(contract.METRIC_LEARNING_RATE, "lr", ["group"], registry=registry)
    lr.labels("head").set(0.001)
    if with_info:
        info = Gauge(contract.METRIC_INFO, "info", ["backbone", "strategy", "reason"],
                     registry=registry)
        info.labels("resnet18", "FineTune", "1200 images per class").set(1)
    return generate_latest(registry).decode()


def test_progress_from_the_trainers_metrics():
    samples = parse_exposition(trainer_exposition())
    spec = finetunejob()["spec"]
    patch = progress_patch(samples, spec, {}, NOW)
    assert patch["progress"] == {"epoch": 3, "totalEpochs": 10, "epochProgress": "3/10",
                                 "percent": 30.0, "etaSeconds": 755,
                                 "updateTime": "2026-11-28T10:10:00Z"}
    assert patch["metrics"] == {"trainLoss": 0.42, "valAccuracy": 0.81, "bestValAccuracy": 0.83}
    assert patch["resolvedStrategy"] == "FineTune"
    assert patch["strategyReason"] == "1200 images per class"
    # When the trainer wrote it, not when the operator read it.
    assert patch["lastCheckpoint"] == {"uri": "s3://models/flowers/checkpoints/", "epoch": 3,
                                       "step": 0, "time": "2026-11-28T10:07:30Z"}


def test_checkpoint_time_only_moves_with_a_new_checkpoint():
    samples = parse_exposition(trainer_exposition())
    status = {"lastCheckpoint": {"uri": "s3://models/flowers/checkpoints/", "epoch": 3,
                                 "step": 0, "time": "2026-11-28T10:07:30Z"},
              "resolvedStrategy": "FineTune", "strategyReason": "1200 images per class"}
    patch = progress_patch(samples, finetunejob()["spec"], status, NOW)
    assert "lastCheckpoint" not in patch
    assert "resolvedStrategy" not in patch
    # A graceful stop's checkpoint, mid-epoch, a minute later:
    later = parse_exposition(trainer_exposition(checkpoint_step=17, checkpointed=datetime(
        2026, 11, 28, 10, 8, 30, tzinfo=timezone.utc)))
    assert progress_patch(later, finetunejob()["spec"], status, NOW)["lastCheckpoint"] == {
        "uri": "s3://models/flowers/checkpoints/", "epoch": 3, "step": 17,
        "time": "2026-11-28T10:08:30Z"}


def test_percent_falls_back_to_epochs_and_checkpoint_uri_to_the_spec():
    text = "\n".join([f"{contract.METRIC_EPOCH} 4", f"{contract.METRIC_CHECKPOINT_EPOCH} 4",
                      f"{contract.METRIC_CHECKPOINT_TIME} {CHECKPOINTED.timestamp()}", ""])
    spec = finetunejob(checkpoint={"uri": "s3://ckpt/flowers/"})["spec"]
    patch = progress_patch(parse_exposition(text), spec, {}, NOW)
    assert patch["progress"]["percent"] == 40.0
    assert patch["progress"]["epochProgress"] == "4/10"
    assert patch["lastCheckpoint"]["uri"] == "s3://ckpt/flowers/"
    assert "metrics" not in patch and "etaSeconds" not in patch["progress"]


def test_before_the_first_epoch():
    patch = progress_patch(parse_exposition(trainer_exposition(epoch=0, steps=0,
                                                               checkpoint_epoch=0,
                                                               checkpointed=None)),
                           finetunejob()["spec"], {}, NOW)
    assert patch["progress"]["epochProgress"] == "0/10"
    assert patch["progress"]["percent"] == 0.0
    assert "lastCheckpoint" not in patch


def test_accuracy_and_loss_stay_empty_until_an_epoch_was_measured():
    registry = CollectorRegistry()
    Gauge(contract.METRIC_EPOCH, "epochs", registry=registry).set(0)
    Gauge(contract.METRIC_VAL_ACCURACY, "acc", registry=registry)  # never set: exposes 0.0
    Gauge(contract.METRIC_TRAIN_LOSS, "loss", registry=registry)
    Gauge(contract.METRIC_BASELINE_ACCURACY, "baseline", registry=registry).set(0.8)
    samples = parse_exposition(generate_latest(registry).decode())
    patch = progress_patch(samples, finetunejob()["spec"], {}, NOW)
    assert patch["metrics"] == {"baselineAccuracy": 0.8}


# The trainer's own metrics, driven through its methods as train.py does: 10 epochs of 40 steps.

STEPS_PER_EPOCH = 40
LEARNING_RATES = {"head": 0.001, "backbone": 0.0001}


def started_trainer(rank=None, epochs_done=0, steps_done=0, strategy="FineTune",
                    reason="1200 images per class") -> TrainerMetrics:
    metrics = TrainerMetrics(rank=rank)
    metrics.start(backbone="resnet18", strategy=strategy, reason=reason, planned_epochs=10,
                  planned_steps=10 * STEPS_PER_EPOCH, steps_done=steps_done,
                  epochs_done=epochs_done)
    return metrics


def train(metrics: TrainerMetrics, epochs: range, steps: int = STEPS_PER_EPOCH,
          started: datetime = CHECKPOINTED) -> None:
    """Trains `epochs` (1-based), `steps` steps of 0.5 s each, and checkpoints after each, at
    `started` plus a minute an epoch."""
    for epoch in epochs:
        for _ in range(steps):
            metrics.step_done(seconds=0.5, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
        metrics.epoch_done(epoch=epoch, train_loss=1 / epoch, val_accuracy=0.5 + epoch / 20,
                           best_val_accuracy=0.5 + epoch / 20, images_per_second=100.0)
        metrics.checkpoint_saved({"epoch": epoch, "step": 0, "time": checkpointed(epoch, started)})


def checkpointed(epoch: int, started: datetime = CHECKPOINTED) -> str:
    return (started + timedelta(minutes=epoch)).isoformat()


def served(metrics: TrainerMetrics) -> str:
    """The body of the trainer's /metrics."""
    return generate_latest(metrics.exported).decode()


def three_epochs(rank=None) -> TrainerMetrics:
    metrics = started_trainer(rank)
    train(metrics, range(1, 4))
    return metrics


def merged(status: dict, patch: dict) -> dict:
    """`status` after a JSON merge patch, as the API server applies it."""
    result = dict(status)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def status_after(body: str) -> dict:
    """status once the operator has recorded one reading of `body`."""
    return merged({}, progress_patch(parse_exposition(body), SPEC, {}, EARLIER))


@pytest.mark.parametrize("rank", [None, 0])
def test_progress_from_the_trainer_alone_and_from_rank_0(rank):
    patch = progress_patch(parse_exposition(served(three_epochs(rank))), SPEC, {}, NOW)
    assert patch == {
        "progress": {"epoch": 3, "totalEpochs": 10, "epochProgress": "3/10", "percent": 30.0,
                     "etaSeconds": 140, "updateTime": "2026-11-28T10:10:00Z"},
        # No baselineAccuracy: the baseline was not trained and its gauge reads 0.
        "metrics": {"trainLoss": 1 / 3, "valAccuracy": 0.65, "bestValAccuracy": 0.65},
        "resolvedStrategy": "FineTune", "strategyReason": "1200 images per class",
        "lastCheckpoint": {"uri": "s3://models/flowers/checkpoints/", "epoch": 3, "step": 0,
                           "time": "2026-11-28T10:10:30Z"}}


def test_info_labels_without_the_rank():
    samples = parse_exposition(served(three_epochs(rank=0)))
    assert samples[contract.METRIC_INFO] == {"backbone": "resnet18", "strategy": "FineTune",
                                             "reason": "1200 images per class"}


def test_other_ranks_give_no_progress():
    body = served(three_epochs(rank=1))
    assert parse_exposition(body) == {}
    assert progress_patch(parse_exposition(body), SPEC, {}, NOW) == {}


def test_rank_0_wins_over_an_unlabelled_sample():
    unlabelled = started_trainer()
    train(unlabelled, range(1, 2))
    body = served(three_epochs(rank=0)) + served(unlabelled)
    assert parse_exposition(body)[contract.METRIC_EPOCH] == 3


def test_unknown_and_labelled_samples_are_dropped():
    body = served(three_epochs())
    hostile = "".join(f"# TYPE tenant_{i} gauge\ntenant_{i} {i}\n" for i in range(10_000))
    relabelled = "".join(f'{name}{{pod="other"}} 99\n' for name in KNOWN_METRICS
                         if name != contract.METRIC_INFO)
    samples = parse_exposition(body + hostile + relabelled)
    assert samples == parse_exposition(body)
    assert set(samples) == KNOWN_METRICS


@pytest.mark.parametrize("garbage", [
    "<html><body>502 Bad Gateway</body></html>",
    "{, ==P",  # the parser fails with an IndexError
])
def test_garbage_raises_value_error(garbage):
    with pytest.raises(ValueError, match="not a Prometheus exposition"):
        parse_exposition(garbage)


def test_an_identical_reading_changes_nothing():
    body = served(three_epochs())
    assert progress_patch(parse_exposition(body), SPEC, status_after(body), NOW) == {}


def test_a_reading_that_only_moves_steps_or_eta_updates_progress():
    metrics = three_epochs()
    status = status_after(served(metrics))
    metrics.step_done(seconds=1.0, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
    patch = progress_patch(parse_exposition(served(metrics)), SPEC, status, NOW)
    assert patch == {"progress": {"epoch": 3, "totalEpochs": 10, "epochProgress": "3/10",
                                  "percent": 30.2, "etaSeconds": 142,
                                  "updateTime": "2026-11-28T10:10:00Z"}}
    metrics.finished()  # early stopping: only the ETA moves
    patch = progress_patch(parse_exposition(served(metrics)), SPEC, merged(status, patch), NOW)
    assert patch == {"progress": {**status["progress"], "percent": 30.2, "etaSeconds": 0,
                                  "updateTime": "2026-11-28T10:10:00Z"}}


def test_a_restarted_trainer_does_not_reset_progress():
    status = status_after(served(three_epochs()))
    # Started over (its checkpoints gone), its gauges at 0, and resolved another strategy:
    restarted = started_trainer(strategy="LinearProbe", reason="few images")
    restarted.step_done(seconds=0.5, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
    patch = progress_patch(parse_exposition(served(restarted)), SPEC, status, NOW)
    assert patch == {"resolvedStrategy": "LinearProbe", "strategyReason": "few images"}


def test_a_trainer_resumed_from_an_older_checkpoint_does_not_replace_later_figures():
    status = status_after(served(three_epochs()))
    resumed = started_trainer(epochs_done=1, steps_done=STEPS_PER_EPOCH)
    # Epoch 2 again, and a checkpoint newer than the one status has:
    train(resumed, range(2, 3), started=CHECKPOINTED + timedelta(minutes=2))
    patch = progress_patch(parse_exposition(served(resumed)), SPEC, status, NOW)
    assert patch == {"lastCheckpoint": {"uri": "s3://models/flowers/checkpoints/", "epoch": 2,
                                        "step": 0, "time": "2026-11-28T10:11:30Z"}}


def test_a_trainer_resumed_from_the_latest_checkpoint_waits_to_catch_up():
    metrics = three_epochs()
    for _ in range(20):
        metrics.step_done(seconds=0.5, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
    status = status_after(served(metrics))
    assert status["progress"]["percent"] == 35.0
    # Preempted; resumed from the end of epoch 3, its loss and accuracy gauges at 0 until it
    # finishes epoch 4:
    resumed = started_trainer(epochs_done=3, steps_done=3 * STEPS_PER_EPOCH)
    resumed.checkpoint_saved({"epoch": 3, "step": 0, "time": checkpointed(3)})
    for _ in range(10):
        resumed.step_done(seconds=0.5, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
    assert progress_patch(parse_exposition(served(resumed)), SPEC, status, NOW) == {}
    for _ in range(15):
        resumed.step_done(seconds=0.5, data_wait_seconds=0.01, learning_rates=LEARNING_RATES)
    patch = progress_patch(parse_exposition(served(resumed)), SPEC, status, NOW)
    assert patch == {"progress": {"epoch": 3, "totalEpochs": 10, "epochProgress": "3/10",
                                  "percent": 36.2, "etaSeconds": 128,
                                  "updateTime": "2026-11-28T10:10:00Z"}}
    train(resumed, range(4, 5), steps=15)
    patch = progress_patch(parse_exposition(served(resumed)), SPEC, status, NOW)
    assert patch["metrics"] == {"trainLoss": 0.25, "valAccuracy": 0.7, "bestValAccuracy": 0.7}
