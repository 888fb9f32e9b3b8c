"""Small manifests and datasets for the trainer's tests: timm's 100k-parameter test_efficientnet
on 32 px images keeps a training run to seconds on a shared CPU."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune_trainer.models import build_model

TINY_BACKBONE = "test_efficientnet"


def write_three_classes(dest: Path, *, train_per_class: int = 8, val_per_class: int = 3,
                        size: int = 24, classes: tuple[str, ...] = ("circle", "square", "stripes"),
                        seed: int = 0) -> Path:
    """An ImageFolder of noisy shapes a small model separates in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    shapes = {"circle": (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2,
              "square": (abs(xx - size / 2) < size / 4) & (abs(yy - size / 2) < size / 4),
              "stripes": (xx // 3) % 2 == 0, "dots": (xx % 6 < 2) & (yy % 6 < 2)}
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for name in classes:
            folder = dest / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.normal(60, 25, (size, size, 3))
                pixels[shapes[name]] += 140
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{index:03d}.png")
    return dest


def write_tiny_weights(path: Path, classes: int = 1000) -> Path:
    """A 'pretrained' state dict for the tiny backbone, as another training run would save it."""
    torch.manual_seed(123)
    model = build_model({"backbone": TINY_BACKBONE, "library": "Timm", "weights": "None",
                         "imageSize": 32}, classes)
    torch.nn.init.normal_(model.classifier.weight, std=0.01)
    torch.save({"epoch": 90, "state_dict": model.state_dict()}, path)
    return path


def manifest(dataset_uri: str, output_uri: str, *, name: str = "tiny", **spec) -> dict:
    body = {"dataset": {"uri": dataset_uri},
            "model": {"backbone": TINY_BACKBONE, "weights": "None", "imageSize": 32},
            "strategy": "FineTune", "epochs": 2, "batchSize": 8, "dataLoaderWorkers": 0,
            "augmentation": "None", "optimizer": {"learningRate": 0.01},
            "output": {"uri": output_uri}}
    for key, value in spec.items():
        if value is None:  # leave the field out
            body.pop(key, None)
        else:
            body[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": "tests"}, "spec": body}


def signal_once_checkpointed(process, client, bucket: str, pointer_key: str, signum: int,
                             timeout: float = 300) -> None:
    """Send `signum` to a trainer process as soon as its first checkpoint pointer is in S3."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if client.list_objects_v2(Bucket=bucket, Prefix=pointer_key).get("KeyCount"):
            process.send_signal(signum)
            return
        time.sleep(0.05)
