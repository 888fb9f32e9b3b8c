"""LinearProbe: features of the frozen pretrained backbone, computed once and cached, and a linear
classifier from scikit-learn whose regularisation C is picked by stratified k-fold cross-validation
(from HOLDOUT_MIN_IMAGES training images on: one stratified hold-out of a fifth, which costs a
k-th of the fits and is as reliable with that much data). The fitted classifier (with its feature scaling folded in) becomes the model's head, so the
exported model is an ordinary end-to-end classifier."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import nn

from finetune_trainer.models import head_module_name
from finetune_trainer.preprocessing import Preprocessing

C_GRID = [0.001, 0.01, 0.1, 1.0, 10.0]
# k-fold CV refits every C k times; at 10000 images that took over half an hour on two CPU cores
# (bench/strategies.py). A fifth held out gives 2000 validation images from this size on.
HOLDOUT_MIN_IMAGES = 5000
HOLDOUT_FRACTION = 0.2


@dataclass
class ProbeResult:
    classifier: str
    c: float
    selection: str  # how C was chosen: "5-fold CV", "hold-out 20%" or "default (too few images)"
    cv_folds: int  # 0 when a class had too few images to cross-validate, or with a hold-out
    cv_accuracy: float | None  # of the chosen C, by k-fold CV or on the hold-out
    val_accuracy: float
    val_predictions: np.ndarray
    weight: np.ndarray  # (classes, features), on raw features
    bias: np.ndarray


@torch.no_grad()
def extract_features(model: nn.Module, loader, device: torch.device,
                     autocast_dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What the classifier head sees (its input), for every image of `loader`."""
    captured = []
    head = model.get_submodule(head_module_name(model))
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    model.eval()
    features, labels = [], []
    try:
        for images, targets in loader:
            captured.clear()
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                model(images.to(device, non_blocking=True))
            features.append(captured[0].float().flatten(1).cpu().numpy())
            labels.append(targets.numpy())
    finally:
        hook.remove()
    return np.concatenate(features), np.concatenate(labels)


def features_cache_key(model: nn.Module, samples, *, preprocessing: Preprocessing) -> str:
    """Changes with the backbone's weights, the images (path, size, mtime, label) and the
    preprocessing (size, mean, std, interpolation, crop)."""
    settings = {k: v for k, v in preprocessing.describe().items() if k != "source"}
    digest = hashlib.sha256(f"{type(model).__name__}:{sorted(settings.items())}".encode())
    head_prefix = head_module_name(model) + "."
    for name, tensor in model.state_dict().items():
        if not name.startswith(head_prefix):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    for sample in samples:
        stat = os.stat(sample.path)
        digest.update(f"{sample.path}|{stat.st_size}|{stat.st_mtime_ns}|{sample.label}\n".encode())
    return digest.hexdigest()[:32]


def cached_features(cache_dir: Path | None, key: str, compute) -> tuple[np.ndarray, np.ndarray]:
    """compute() once per key; the result lives in cache_dir/features/<key>.npz."""
    if cache_dir is None:
        return compute()
    path = Path(cache_dir) / "features" / f"{key}.npz"
    if path.exists():
        with np.load(path) as stored:
            return stored["features"], stored["labels"]
    features, labels = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per process: the ranks of a multi-process job may fill the same cache at the same time.
    partial = path.with_suffix(f".{os.getpid()}.partial.npz")
    np.savez(partial, features=features, labels=labels)
    partial.replace(path)
    return features, labels


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                     val_y: np.ndarray, *, num_classes: int, classifier: str, cv_folds: int,
                     seed: int, prefer_holdout: bool = False) -> ProbeResult:
    """`prefer_holdout`: choose C on one hold-out whenever it can hold every class out (Auto's
    race, where the probe is one candidate of several and k-fold CV would dominate its cost)."""
    def pipeline(c: float) -> Pipeline:
        linear = (LinearSVC(C=c, random_state=seed) if classifier == "LinearSVM"
                  else LogisticRegression(C=c, max_iter=1000, random_state=seed))
        return Pipeline([("scale", StandardScaler()), ("linear", linear)])

    smallest_class = int(np.bincount(train_y)[np.unique(train_y)].min()) if len(train_y) else 0
    folds = min(cv_folds, smallest_class)
    classes_present = len(np.unique(train_y))
    holdout_fits = smallest_class >= 2 and int(HOLDOUT_FRACTION * len(train_y)) >= classes_present
    if len(train_y) >= HOLDOUT_MIN_IMAGES or (prefer_holdout and holdout_fits):
        c, cv_accuracy = _choose_c_on_holdout(pipeline, train_x, train_y, seed)
        folds, selection = 0, f"hold-out {HOLDOUT_FRACTION:.0%}"
        fitted = pipeline(c).fit(train_x, train_y)
    elif folds >= 2:
        search = GridSearchCV(pipeline(1.0), {"linear__C": C_GRID}, cv=StratifiedKFold(
            folds, shuffle=True, random_state=seed), n_jobs=1)
        search.fit(train_x, train_y)
        fitted, c, cv_accuracy = search.best_estimator_, search.best_params_["linear__C"], \
            float(search.best_score_)
        selection = f"{folds}-fold CV"
    else:
        folds, c, cv_accuracy, selection = 0, 1.0, None, "default (too few images)"
        fitted = pipeline(c).fit(train_x, train_y)
    weight, bias = _fold_scaling(fitted, num_classes)
    val_predictions = (val_x @ weight.T + bias).argmax(axis=1)
    return ProbeResult(classifier=classifier, c=c, selection=selection, cv_folds=folds,
                       cv_accuracy=cv_accuracy,
                       val_accuracy=float((val_predictions == val_y).mean()) if len(val_y) else 0.0,
                       val_predictions=val_predictions, weight=weight, bias=bias)


def _choose_c_on_holdout(pipeline, train_x, train_y, seed: int) -> tuple[float, float]:
    """(C, its accuracy) on a stratified hold-out of the training images."""
    fit_x, held_x, fit_y, held_y = train_test_split(
        train_x, train_y, test_size=HOLDOUT_FRACTION, stratify=train_y, random_state=seed)
    scores = {c: float(pipeline(c).fit(fit_x, fit_y).score(held_x, held_y)) for c in C_GRID}
    best = max(C_GRID, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    return best, scores[best]


def _fold_scaling(pipeline: Pipeline, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The pipeline's scaler and linear model as one (weight, bias) on raw features, one row per
    class (classes absent from training get a bias no logit can lose to)."""
    scaler, linear = pipeline.named_steps["scale"], pipeline.named_steps["linear"]
    coef, intercept = linear.coef_, linear.intercept_
    if coef.shape[0] == 1:  # scikit-learn keeps one row for two classes: score of the second
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    scaled_coef = coef / scaler.scale_
    weight = np.zeros((num_classes, coef.shape[1]), dtype=np.float32)
    bias = np.full(num_classes, -1e4, dtype=np.float32)
    weight[linear.classes_] = scaled_coef
    bias[linear.classes_] = intercept - scaled_coef @ scaler.mean_
    return weight, bias


def install_head(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> None:
    head = model.get_submodule(head_module_name(model))
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))


def describe(result: ProbeResult) -> dict:
    return {"classifier": result.classifier, "C": result.c, "selection": result.selection,
            "cvFolds": result.cv_folds, "cvAccuracy": result.cv_accuracy}
