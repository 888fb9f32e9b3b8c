"""How the linear probe chooses C: k-fold CV on small training sets, one stratified hold-out on
large ones, never the validation images it is scored on."""

from __future__ import annotations

import numpy as np

from finetune_trainer import linear_probe as probe


def blobs(per_class: int, val_per_class: int = 20, *, classes: int = 3, features: int = 8):
    """Training and validation images' features as separable Gaussian clusters (what frozen
    features of distinct classes look like): (train_x, train_y, val_x, val_y)."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, size=(classes, features))

    def draw(count):
        labels = np.repeat(np.arange(classes), count)
        noise = rng.normal(0, 1, size=(len(labels), features))
        return (centres[labels] + noise).astype(np.float32), labels
    return (*draw(per_class), *draw(val_per_class))


def fit(train_x, train_y, val_x, val_y, folds=5):
    return probe.fit_linear_probe(train_x, train_y, val_x, val_y, num_classes=3,
                                  classifier="LogisticRegression", cv_folds=folds, seed=0)


def test_small_training_sets_choose_c_by_k_fold_cross_validation():
    train_x, train_y, val_x, val_y = blobs(40)
    result = fit(train_x, train_y, val_x, val_y)
    assert (result.selection, result.cv_folds) == ("5-fold CV", 5)
    assert result.c in probe.C_GRID and result.val_accuracy > 0.9
    assert probe.describe(result)["selection"] == "5-fold CV"


def test_large_training_sets_choose_c_on_one_stratified_holdout(monkeypatch):
    monkeypatch.setattr(probe, "HOLDOUT_MIN_IMAGES", 300)
    train_x, train_y, val_x, val_y = blobs(100)  # 300 images: from the (lowered) threshold on
    fitted_sizes = []
    original_fit = probe.Pipeline.fit

    def recording_fit(self, x, y, **kwargs):
        fitted_sizes.append(len(y))
        return original_fit(self, x, y, **kwargs)
    monkeypatch.setattr(probe.Pipeline, "fit", recording_fit)
    result = fit(train_x, train_y, val_x, val_y)
    assert result.selection == "hold-out 20%" and result.cv_folds == 0
    # One fit per C on 80 % of the training images, then the chosen C on all of them: never on
    # the validation images, and k times fewer fits than k-fold CV.
    assert fitted_sizes == [240] * len(probe.C_GRID) + [300]
    assert result.c in probe.C_GRID and 0.9 < result.cv_accuracy <= 1.0
    assert result.val_accuracy > 0.9


def test_a_class_too_small_to_cross_validate_falls_back_to_the_default_c():
    train_x, train_y, _, _ = blobs(1)
    result = fit(train_x, train_y, train_x, train_y)
    assert (result.selection, result.c, result.cv_accuracy) == ("default (too few images)", 1.0,
                                                                 None)
