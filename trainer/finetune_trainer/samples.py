"""Sample datasets written from locally installed packages (no download), for demos, tests and
benchmarks: Fashion-MNIST from Debian's dataset-fashion-mnist package and scikit-learn's bundled
handwritten digits, both as ImageFolder directories of PNGs."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path(os.environ.get("FINETUNE_FASHION_MNIST_DIR",
                                        "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle_boot"]
_FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
_IDX_UNSIGNED_BYTE = 0x08


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): magic 0x0000 <type> <dimensions>, big-endian sizes."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    zero, data_type, dimensions = struct.unpack(">HBB", data[:4])
    if zero != 0 or data_type != _IDX_UNSIGNED_BYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dimensions}I", data[4:4 + 4 * dimensions])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions).reshape(shape)


def load_fashion_mnist_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N uint8) of the "train" (60000) or "test" (10000) split."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = _FASHION_MNIST_FILES[split]
    images_path = FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(f"{images_path} is missing: install Debian's "
                                "dataset-fashion-mnist package or set FINETUNE_FASHION_MNIST_DIR")
    images = _read_idx(images_path)
    labels = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return images, labels


def stratified_indices(labels: np.ndarray, per_class: int | None, val_per_class: int, *,
                       seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `per_class` training and `val_per_class` validation examples of each label,
    disjoint, chosen by `seed` (None: every example not held out for validation)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        wanted = (per_class if per_class is not None else len(members) - val_per_class)
        if wanted < 1 or wanted + val_per_class > len(members):
            raise ValueError(f"label {label} has {len(members)} examples; cannot take "
                             f"{per_class} training and {val_per_class} validation examples")
        val.extend(members[:val_per_class])
        train.extend(members[val_per_class:val_per_class + wanted])
    return np.sort(np.array(train, dtype=int)), np.sort(np.array(val, dtype=int))


def write_image_folder(dest: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str],
                       train_indices: np.ndarray, val_indices: np.ndarray, *,
                       image_size: int) -> Path:
    """Write train/<class>/<index>.png (and val/) from uint8 grayscale arrays, replacing any
    train/ and val/ directories a previous call left, so the result holds exactly this subset."""
    from PIL import Image

    dest = Path(dest)
    for split, indices in (("train", train_indices), ("val", val_indices)):
        shutil.rmtree(dest / split, ignore_errors=True)
        for index in indices:
            class_dir = dest / split / class_names[int(labels[index])]
            class_dir.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index])  # 2-D uint8: grayscale "L"
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            image.save(class_dir / f"{int(index):05d}.png")
    return dest


def write_fashion_mnist(dest: Path, *, per_class: int, val_per_class: int = 0,
                        image_size: int = 28, seed: int = 0, split: str = "train") -> Path:
    """An ImageFolder of Fashion-MNIST PNGs: `per_class` training images per class (and
    `val_per_class` in val/), a seeded stratified subset of the given split."""
    images, labels = load_fashion_mnist_arrays(split)
    train, val = stratified_indices(labels, per_class, val_per_class, seed=seed)
    return write_image_folder(dest, images, labels, FASHION_MNIST_CLASSES, train, val,
                              image_size=image_size)


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits as (N x 8 x 8 uint8 scaled to 0..255, labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.uint8)


def write_digits(dest: Path, *, per_class: int | None = None, val_per_class: int = 0,
                 image_size: int = 32, seed: int = 0) -> Path:
    """An ImageFolder of scikit-learn's digits (classes "0".."9"), upscaled from 8x8;
    per_class None takes every digit not held out for val/."""
    images, labels = load_digits_arrays()
    train, val = stratified_indices(labels, per_class, val_per_class, seed=seed)
    return write_image_folder(dest, images, labels, [str(d) for d in range(10)], train, val,
                              image_size=image_size)
