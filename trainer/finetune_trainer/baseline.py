"""A cheap non-deep baseline on the same split: logistic regression on downsampled raw pixels.
If transfer learning does not beat it, the report says so (`transferBeatBaseline: false`)."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

PIXELS = 16  # images become 16x16 RGB: 768 features, seconds to fit even on one core
MAX_TRAIN_IMAGES = 5000
METHOD = f"LogisticRegression on {PIXELS}x{PIXELS} RGB pixels"


@dataclass
class BaselineResult:
    accuracy: float
    method: str
    train_images: int
    seconds: float


def _pixels(samples) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    for sample in samples:
        with Image.open(sample.path) as image:
            small = image.convert("RGB").resize((PIXELS, PIXELS), Image.Resampling.BILINEAR)
        rows.append(np.asarray(small, dtype=np.float32).reshape(-1) / 255.0)
        labels.append(sample.label)
    return np.stack(rows), np.asarray(labels)


def pixel_baseline(train, val, *, seed: int) -> BaselineResult:
    """Fit on `train` (at most MAX_TRAIN_IMAGES of them, drawn with `seed`), score on `val`."""
    started = time.perf_counter()
    if len(train) > MAX_TRAIN_IMAGES:
        train = random.Random(seed).sample(list(train), MAX_TRAIN_IMAGES)
    train_x, train_y = _pixels(train)
    val_x, val_y = _pixels(val)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, random_state=seed))
    classifier.fit(train_x, train_y)
    accuracy = float((classifier.predict(val_x) == val_y).mean())
    return BaselineResult(accuracy=accuracy, method=METHOD, train_images=len(train),
                          seconds=time.perf_counter() - started)
