"""Progress from a real prometheus_client exposition, as the trainer serves it."""

from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from finetune_api import contract
from finetune_operator.progress import parse_exposition, progress_patch

from operator_factories import finetunejob

NOW = datetime(2026, 11, 28, 10, 10, tzinfo=timezone.utc)


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
