"""Sample datasets from the installed Fashion-MNIST and scikit-learn digits, and the
`finetune dataset sample|upload` commands (upload against a real S3 server)."""

from __future__ import annotations

import argparse
import hashlib

import numpy as np
import pytest
from PIL import Image

from finetune_trainer import samples
from finetune_trainer.dataset_cli import add_dataset_parser
from finetune_trainer.storage import open_store


def test_fashion_mnist_arrays_are_the_real_dataset():
    images, labels = samples.load_fashion_mnist_arrays("train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = samples.load_fashion_mnist_arrays("test")
    assert test_images.shape == (10000, 28, 28) and len(test_labels) == 10000
    with pytest.raises(ValueError, match="split must be"):
        samples.load_fashion_mnist_arrays("validation")


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))


def test_write_fashion_mnist_is_a_deterministic_stratified_subset(tmp_path):
    first = samples.write_fashion_mnist(tmp_path / "a", per_class=3, val_per_class=2, seed=1)
    again = samples.write_fashion_mnist(tmp_path / "b", per_class=3, val_per_class=2, seed=1)
    other = samples.write_fashion_mnist(tmp_path / "c", per_class=3, val_per_class=2, seed=2)
    assert tree(first) == tree(again) != tree(other)
    assert sorted(p.name for p in (first / "train").iterdir()) == sorted(
        samples.FASHION_MNIST_CLASSES)
    for class_name in samples.FASHION_MNIST_CLASSES:
        assert len(list((first / "train" / class_name).iterdir())) == 3
        assert len(list((first / "val" / class_name).iterdir())) == 2
    train_files = {p.name for p in (first / "train").rglob("*.png")}
    assert not train_files & {p.name for p in (first / "val").rglob("*.png")}

    # The file name is the index in the original split; the pixels and label are that example's.
    images, labels = samples.load_fashion_mnist_arrays("train")
    png = next((first / "train" / "Sneaker").iterdir())
    index = int(png.stem)
    assert samples.FASHION_MNIST_CLASSES[labels[index]] == "Sneaker"
    assert np.array_equal(np.asarray(Image.open(png)), images[index])

    # Writing again replaces the subset rather than adding to it.
    samples.write_fashion_mnist(first, per_class=1, seed=1)
    assert len(tree(first)) == 10


def test_write_fashion_mnist_resizes_and_rejects_impossible_subsets(tmp_path):
    dest = samples.write_fashion_mnist(tmp_path / "big", per_class=1, image_size=64,
                                       split="test")
    image = Image.open(next((dest / "train").rglob("*.png")))
    assert image.size == (64, 64) and image.mode == "L"
    with pytest.raises(ValueError, match="has 1000 examples"):
        samples.write_fashion_mnist(tmp_path / "x", per_class=999, val_per_class=2, split="test")


def test_write_digits(tmp_path):
    dest = samples.write_digits(tmp_path / "digits", per_class=4, val_per_class=1)
    assert sorted(p.name for p in (dest / "train").iterdir()) == [str(d) for d in range(10)]
    assert len(tree(dest)) == 50
    image = Image.open(next((dest / "train" / "7").iterdir()))
    assert image.size == (32, 32)
    assert np.asarray(image).max() > 200  # ink upscaled from 0..16 to 0..255
    whole = samples.write_digits(tmp_path / "all")
    assert len(tree(whole)) == 1797


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="finetune")
    add_dataset_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def test_cli_sample(tmp_path, capsys):
    assert run_cli("dataset", "sample", "fashion-mnist", str(tmp_path / "f"), "--per-class", "2",
                   "--val-per-class", "1") == 0
    assert "wrote 20 training and 10 validation images" in capsys.readouterr().out
    assert run_cli("dataset", "sample", "digits", str(tmp_path / "d"), "--per-class", "0") == 2
    assert "--per-class must be positive" in capsys.readouterr().err
    assert run_cli("dataset", "sample", "digits", str(tmp_path / "d"), "--per-class",
                   "500") == 3
    assert "cannot take 500 training" in capsys.readouterr().err


def test_cli_upload_to_s3(aws_env, s3_bucket, fashion_mnist_dir, capsys):
    uri = f"s3://{s3_bucket}/fashion/"
    assert run_cli("dataset", "upload", str(fashion_mnist_dir), uri) == 0
    assert "uploaded 250 of 250 files" in capsys.readouterr().out
    listed = open_store().list(uri)  # endpoint from AWS_ENDPOINT_URL
    assert len(listed) == 250
    first_val_bag = next(o for o in listed if o.key.startswith("val/Bag/"))
    local = fashion_mnist_dir / first_val_bag.key
    assert first_val_bag.etag == hashlib.md5(local.read_bytes()).hexdigest()

    assert run_cli("dataset", "upload", str(fashion_mnist_dir), uri,
                   "--endpoint", aws_env["AWS_ENDPOINT_URL"]) == 0
    assert "uploaded 0 of 250 files" in capsys.readouterr().out


def test_cli_upload_errors_name_the_cause(aws_env, tmp_path, fashion_mnist_dir, capsys):
    assert run_cli("dataset", "upload", str(tmp_path / "absent"), "s3://bucket/x/") == 3
    assert "is not a directory" in capsys.readouterr().err
    assert run_cli("dataset", "upload", str(fashion_mnist_dir), "s3://no-such-bucket-x/p/") == 4
    assert "'no-such-bucket-x' does not exist" in capsys.readouterr().err


def test_finetune_command_samples_and_uploads(aws_env, s3_bucket, tmp_path):
    """The installed `finetune` command, as a user runs it."""
    import subprocess
    import sys
    from pathlib import Path

    finetune = Path(sys.executable).parent / "finetune"
    command = [str(finetune)] if finetune.exists() else [sys.executable, "-m",
                                                         "finetune_trainer.cli"]
    dest = tmp_path / "digits"
    sampled = subprocess.run([*command, "dataset", "sample", "digits", str(dest), "--per-class",
                              "3", "--val-per-class", "1"], capture_output=True, text=True)
    assert sampled.returncode == 0, sampled.stderr
    uri = f"s3://{s3_bucket}/digits/"
    uploaded = subprocess.run([*command, "dataset", "upload", str(dest), uri],
                              capture_output=True, text=True)
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded 40 of 40 files" in uploaded.stdout
    assert len(open_store().list(uri + "val/")) == 10
