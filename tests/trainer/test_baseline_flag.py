"""The per-job baseline check (issue 7): every report states the accuracy of the pixel baseline
on the job's own validation split and flags a model that did not beat it. The losing model is a
real run: the tiny backbone from scratch, one epoch at a negligible learning rate, on
scikit-learn's digits, where logistic regression on pixels is strong."""

from __future__ import annotations

import json

import pytest

from finetune_trainer import samples, train
from finetune_trainer.baseline import METHOD, pixel_baseline
from finetune_trainer.data import prepare_dataset
from trainer_helpers import manifest


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return samples.write_digits(tmp_path_factory.mktemp("digits"), per_class=12, val_per_class=6,
                                image_size=32, seed=0)


def losing_job(digits_dir, output_dir, **spec):
    return manifest(str(digits_dir), str(output_dir), strategy="FromScratch", epochs=1,
                    optimizer={"learningRate": 1e-9}, seed=3, **spec)


@pytest.fixture(scope="module")
def losing_run(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("losing")
    report = train.main(losing_job(digits_dir, out / "out"), cache_dir=out / "cache", log=quiet)
    return report, out


def test_a_model_that_loses_to_the_baseline_is_flagged(losing_run):
    report, out = losing_run
    baseline = report["baseline"]
    assert baseline["enabled"] is True and baseline["method"] == METHOD
    # Scored on the job's own validation split (6 of each of 10 digits), like the model.
    assert report["dataset"]["valImages"] == 60
    assert baseline["accuracy"] >= 0.7  # pixels separate digits well
    assert report["valAccuracy"] < 0.3  # an untrained network is near chance (0.1)
    assert report["transferBeatBaseline"] is False
    stored = json.loads((out / "out" / "report.json").read_text())
    assert stored["transferBeatBaseline"] is False
    assert stored["baseline"]["accuracy"] == pytest.approx(baseline["accuracy"])


def test_the_baseline_is_reproducible_and_matches_a_direct_fit(digits_dir, losing_run,
                                                               tmp_path):
    """The number in the report is pixel_baseline on the same split and seed: a user can check it."""
    report, _ = losing_run
    dataset = prepare_dataset({"uri": str(digits_dir)}, seed=3, cache_dir=tmp_path / "cache")
    direct = pixel_baseline(dataset.train, dataset.val, seed=3)
    assert direct.accuracy == pytest.approx(report["baseline"]["accuracy"])


def test_the_baseline_can_be_turned_off(digits_dir, tmp_path):
    report = train.main(losing_job(digits_dir, tmp_path / "out", baseline={"enabled": False}),
                        cache_dir=tmp_path / "cache", log=quiet)
    assert report["baseline"] == {"enabled": False}
    assert report["transferBeatBaseline"] is None  # no claim either way
