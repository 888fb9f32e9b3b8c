"""Prometheus metrics: scraped over HTTP while a short run trains and after it ends, with the
contract's names and values that agree with the report."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from finetune_api import contract
from finetune_trainer import train
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.runtime import serve_metrics
from trainer_helpers import manifest, write_three_classes


def scrape(url: str) -> dict:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_metrics_are_served_during_and_after_a_run(tmp_path):
    dataset = write_three_classes(tmp_path / "shapes", train_per_class=6, val_per_class=2)
    metrics = TrainerMetrics()
    url = serve_metrics(metrics, "127.0.0.1", 0, any_port_if_busy=True)
    during = []

    def log(line):
        if line.startswith("epoch 1/"):
            during.append(scrape(url))

    job = manifest(str(dataset), str(tmp_path / "out"), epochs=2, batchSize=4)
    report = train.main(job, cache_dir=tmp_path / "cache", metrics=metrics, log=log)
    after = scrape(url)

    steps_per_epoch = 18 // 4  # drop_last
    assert during[0][(contract.METRIC_EPOCH, ())] == 1
    assert during[0][(contract.METRIC_STEPS, ())] == steps_per_epoch
    assert during[0][(contract.METRIC_ETA, ())] > 0
    assert after[(contract.METRIC_EPOCH, ())] == 2
    assert after[(contract.METRIC_PLANNED_EPOCHS, ())] == 2
    assert after[(contract.METRIC_STEPS, ())] == after[(contract.METRIC_PLANNED_STEPS, ())] == \
        2 * steps_per_epoch
    assert after[(contract.METRIC_VAL_ACCURACY, ())] == pytest.approx(report["valAccuracy"])
    assert after[(contract.METRIC_BEST_VAL_ACCURACY, ())] == pytest.approx(
        report["bestValAccuracy"])
    assert after[(contract.METRIC_BASELINE_ACCURACY, ())] == pytest.approx(
        report["baseline"]["accuracy"])
    assert after[(contract.METRIC_TRAIN_LOSS, ())] == pytest.approx(
        report["history"][-1]["trainLoss"])
    assert after[(contract.METRIC_LEARNING_RATE, (("group", "head"),))] == pytest.approx(
        report["history"][-1]["learningRates"]["head"])
    assert (contract.METRIC_LEARNING_RATE, (("group", "backbone"),)) in after
    assert after[(contract.METRIC_IMAGES_PER_SECOND, ())] > 0
    assert after[(contract.METRIC_DATA_WAIT, ())] > 0
    assert after[(contract.METRIC_CHECKPOINT_EPOCH, ())] == 2
    assert after[(contract.METRIC_ETA, ())] == 0
    info = [labels for name, labels in after if name == contract.METRIC_INFO]
    assert dict(info[0])["backbone"] == "test_efficientnet"
    assert dict(info[0])["strategy"] == "FineTune"
