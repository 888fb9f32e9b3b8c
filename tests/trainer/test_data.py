"""prepare_dataset against a real S3 server (versitygw) and local directories: layouts, the ETag
cache, the split, and every pre-flight failure; then the transforms and the torch Dataset."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from finetune_api.contract import ExitCode
from finetune_trainer.data import ImageDataset, image_problem, prepare_dataset
from finetune_trainer.errors import TrainerError
from finetune_trainer.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, Preprocessing,
                                            build_transform)
from finetune_trainer.samples import FASHION_MNIST_CLASSES
from finetune_trainer.storage import open_store, upload_directory


def png_bytes(seed: int | str, size: int = 12, mode: str = "RGB") -> bytes:
    rng = random.Random(seed)
    image = Image.new(mode, (size, size), tuple(rng.randrange(256) for _ in mode))
    image.putpixel((rng.randrange(size), rng.randrange(size)), tuple(0 for _ in mode))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, layout: dict[str, int], *, split: str = "train") -> None:
    """layout: class name -> number of images under root/split/class/."""
    for class_name, count in layout.items():
        directory = root / split / class_name
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            (directory / f"{index:03d}.png").write_bytes(png_bytes(f"{class_name}/{index}"))


@pytest.fixture
def s3(aws_env, s3_bucket, tmp_path):
    """Upload a local directory to the test bucket and prepare it from there."""
    class S3Dataset:
        bucket = s3_bucket
        endpoint = aws_env["AWS_ENDPOINT_URL"]
        cache_dir = tmp_path / "cache"
        uploader = open_store({"endpoint": endpoint})  # also for changing objects in tests

        def store(self, **options):
            """A fresh store, as in a new trainer pod, with its own request counters."""
            return open_store({"endpoint": self.endpoint}, **options)

        def upload(self, directory: Path, prefix: str = "data") -> str:
            uri = f"s3://{s3_bucket}/{prefix}/"
            upload_directory(directory, uri, self.uploader)
            return uri

        def prepare(self, uri: str, store=None, seed: int = 0, **dataset):
            return prepare_dataset({"uri": uri, "s3": {"endpoint": self.endpoint}, **dataset},
                                   seed=seed, cache_dir=self.cache_dir,
                                   store=store or self.store())

    return S3Dataset()


def test_image_folder_from_s3_is_cached_by_etag(s3, fashion_mnist_dir):
    uri = s3.upload(fashion_mnist_dir)
    store = s3.store()
    first = s3.prepare(uri, store=store)
    assert first.classes == sorted(FASHION_MNIST_CLASSES)
    assert (len(first.train), len(first.val)) == (200, 50)
    assert first.val_source == "val/"
    assert set(first.train_counts.values()) == {20} and set(first.val_counts.values()) == {5}
    assert first.objects_downloaded == store.stats.gets == 250 and first.cache_hits == 0
    for sample in first.train[:: 37]:
        assert sample.path.is_relative_to(s3.cache_dir)
        assert sample.path.parent.name == first.classes[sample.label]
        original = fashion_mnist_dir / "train" / sample.path.parent.name / sample.path.name
        assert sample.path.read_bytes() == original.read_bytes()

    # A restarted pod with the same cache volume downloads nothing.
    restarted_store = s3.store()
    again = s3.prepare(uri, store=restarted_store)
    assert restarted_store.stats.gets == 0 and again.objects_downloaded == 0
    assert again.cache_hits == 250
    assert [(s.path, s.label) for s in again.train] == [(s.path, s.label) for s in first.train]

    # A changed object (new ETag) is downloaded again, and only that one.
    changed = sorted((fashion_mnist_dir / "train" / "Bag").iterdir())[0]
    s3_key = f"data/train/Bag/{changed.name}"
    s3.uploader.write_bytes(f"s3://{s3.bucket}/{s3_key}", png_bytes(7, size=28, mode="L"))
    after_change_store = s3.store()
    after_change = s3.prepare(uri, store=after_change_store)
    assert after_change_store.stats.gets == 1 and after_change.cache_hits == 249
    path = next(s.path for s in after_change.train if s.path.name == changed.name
                and s.path.parent.name == "Bag")
    assert path.read_bytes() == png_bytes(7, size=28, mode="L")


def test_local_directory_is_read_in_place(fashion_mnist_dir, tmp_path):
    for uri in (str(fashion_mnist_dir), f"file://{fashion_mnist_dir}"):
        prepared = prepare_dataset({"uri": uri}, seed=0, cache_dir=tmp_path / "cache")
        assert (len(prepared.train), len(prepared.val)) == (200, 50)
        assert all(s.path.is_relative_to(fashion_mnist_dir) for s in prepared.train)
        assert prepared.objects_downloaded == 0
    assert not (tmp_path / "cache").exists()


def test_split_is_stratified_and_reproducible(s3, tmp_path):
    write_images(tmp_path / "set", {"cat": 10, "dog": 10, "emu": 20})
    uri = s3.upload(tmp_path / "set")
    split = s3.prepare(uri, seed=3, validationSplit=0.2)
    assert split.val_source == "split"
    assert split.val_counts == {"cat": 2, "dog": 2, "emu": 4}
    assert split.train_counts == {"cat": 8, "dog": 8, "emu": 16}
    assert not {s.path for s in split.train} & {s.path for s in split.val}

    def names(prepared):
        return [s.path.name + str(s.label) for s in prepared.val]

    assert names(s3.prepare(uri, seed=3, validationSplit=0.2)) == names(split)
    assert names(s3.prepare(uri, seed=4, validationSplit=0.2)) != names(split)
    # A tiny class still keeps one image on each side.
    write_images(tmp_path / "tiny", {"a": 2, "b": 2})
    tiny = s3.prepare(s3.upload(tmp_path / "tiny", "tiny"), validationSplit=0.1)
    assert tiny.train_counts == tiny.val_counts == {"a": 1, "b": 1}


def test_manifest_layout(s3, tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    rows = ["key,label"]
    for index in range(12):
        label = ["10", "2", "3"][index % 3]
        (root / "images" / f"{index}.jpg").write_bytes(_jpeg(index))
        rows.append(f"images/{index}.jpg,{label}")
    rows.append("images/gone.jpg,2")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    uri = s3.upload(root, "flat")

    prepared = s3.prepare(uri, format="Manifest", manifest="labels.csv", validationSplit=0.25,
                          maxCorruptFraction=0.1)
    assert prepared.classes == ["2", "3", "10"]  # numeric labels in numeric order
    assert len(prepared.train) + len(prepared.val) == 12
    assert prepared.val_counts == {"2": 1, "3": 1, "10": 1}
    assert [uri for uri, _ in prepared.skipped] == [f"s3://{s3.bucket}/flat/images/gone.jpg"]
    assert "line 14" in prepared.skipped[0][1]
    label_of_path = {s.path.name: prepared.classes[s.label]
                     for s in prepared.train + prepared.val}
    assert label_of_path["4.jpg"] == "2" and label_of_path["0.jpg"] == "10"


def test_manifest_problems_name_the_field(s3, tmp_path):
    write_images(tmp_path / "set", {"a": 3, "b": 3})
    uri = s3.upload(tmp_path / "set")
    with pytest.raises(TrainerError) as caught:
        s3.prepare(uri, format="Manifest")
    assert caught.value.field == "spec.dataset.manifest"
    assert f"{uri}manifest.csv does not exist" in caught.value.message

    s3.uploader.write_bytes(uri + "manifest.csv", b"train/a/000.png,a,extra\n")
    with pytest.raises(TrainerError) as caught:
        s3.prepare(uri, format="Manifest")
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert "line 1: expected 2 columns" in caught.value.message


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes(seed, size=16))).save(buffer, format="JPEG")
    return buffer.getvalue()


def _failure(s3, uri, **dataset) -> TrainerError:
    with pytest.raises(TrainerError) as caught:
        s3.prepare(uri, **dataset)
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    return caught.value


def test_preflight_one_class(s3, tmp_path):
    write_images(tmp_path / "set", {"cat": 5})
    error = _failure(s3, s3.upload(tmp_path / "set"))
    assert error.field == "spec.dataset.uri"
    assert "at least 2 classes; found only 'cat'" in error.message


def test_preflight_empty_prefix(s3):
    uri = f"s3://{s3.bucket}/nothing-here/"
    error = _failure(s3, uri)
    assert error.field == "spec.dataset.uri"
    assert error.message == f"no objects under {uri}"


def test_preflight_not_an_image_folder(s3, tmp_path):
    (tmp_path / "set" / "cat").mkdir(parents=True)
    (tmp_path / "set" / "cat" / "1.png").write_bytes(png_bytes(1))
    uri = s3.upload(tmp_path / "set")
    error = _failure(s3, uri)
    assert f"no images under {uri}train/<class>/" in error.message
    assert "cat/1.png" in error.message


def test_preflight_corrupt_images_skipped_or_fatal(s3, tmp_path):
    root = tmp_path / "set"
    write_images(root, {"cat": 10, "dog": 10})
    (root / "train" / "dog" / "broken.png").write_bytes(b"this is not a png")
    truncated = png_bytes(5, size=64)
    (root / "train" / "cat" / "truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (root / "train" / "cat" / "notes.txt").write_text("not an image, not counted as corrupt")
    uri = s3.upload(root)

    prepared = s3.prepare(uri, maxCorruptFraction=0.1)
    skipped = dict(prepared.skipped)
    assert set(skipped) == {uri + "train/dog/broken.png", uri + "train/cat/truncated.png",
                            uri + "train/cat/notes.txt"}
    assert prepared.corrupt == 2
    assert skipped[uri + "train/dog/broken.png"].startswith("unreadable")
    assert len(prepared.train) + len(prepared.val) == 20

    error = _failure(s3, uri, maxCorruptFraction=0.05)
    assert error.field == "spec.dataset.maxCorruptFraction"
    assert "2 of 22 images cannot be read" in error.message
    assert uri + "train/dog/broken.png" in error.message


def test_preflight_val_classes_must_match_train(s3, tmp_path):
    root = tmp_path / "set"
    write_images(root, {"cat": 3, "dog": 3})
    write_images(root, {"cat": 2, "bird": 2}, split="val")
    error = _failure(s3, s3.upload(root))
    assert "val/ lacks class 'dog'" in error.message
    assert "val/ has class 'bird' that train/ lacks" in error.message


def test_preflight_too_few_images_per_class(s3, tmp_path):
    root = tmp_path / "set"
    write_images(root, {"cat": 6, "dog": 3, "emu": 6})
    uri = s3.upload(root)
    store = s3.store()
    with pytest.raises(TrainerError) as caught:
        s3.prepare(uri, store=store, minImagesPerClass=5)
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert caught.value.field == "spec.dataset.minImagesPerClass"
    assert "at least 5 training images: 'dog' has 3" in caught.value.message
    assert store.stats.gets == 0  # found from the listing, before downloading anything


def test_preflight_class_emptied_by_corrupt_images(s3, tmp_path):
    root = tmp_path / "set"
    write_images(root, {"cat": 4, "dog": 4})
    uri = s3.upload(root)
    # Corrupt images do not count towards the minimum: the check runs again after reading.
    for index in range(2):
        s3.uploader.write_bytes(uri + f"train/dog/{index:03d}.png", b"garbage")
    error = _failure(s3, uri, minImagesPerClass=3, maxCorruptFraction=0.5)
    assert "at least 3 readable training images: 'dog' has 2" in error.message
    for index in range(2, 4):
        s3.uploader.write_bytes(uri + f"train/dog/{index:03d}.png", b"garbage")
    error = _failure(s3, uri, minImagesPerClass=1, maxCorruptFraction=0.6)
    assert "at least 2 readable training images: 'dog' has 0" in error.message


def test_wrong_credentials_fail_before_any_download(s3, tmp_path, monkeypatch):
    write_images(tmp_path / "set", {"cat": 3, "dog": 3})
    uri = s3.upload(tmp_path / "set")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(TrainerError) as caught:
        s3.prepare(uri)
    assert caught.value.exit_code == ExitCode.ACCESS_DENIED
    assert caught.value.field == "spec.dataset.s3.credentialsSecret"


def test_image_problem_detects_bad_files(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(1))
    assert image_problem(good) is None
    jpeg = _jpeg(2)
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) - 200])
    assert image_problem(truncated) is not None
    text = tmp_path / "text.png"
    text.write_text("hello")
    assert "UnidentifiedImageError" in image_problem(text)


def imagenet(size: int) -> Preprocessing:
    return Preprocessing(input_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         interpolation="bilinear", crop_pct=0.875, source="test")


@pytest.mark.parametrize("augmentation", ["None", "Light", "Standard", "Strong"])
def test_transforms_give_normalised_rgb_tensors(augmentation, tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (28, 28), 200).save(gray)
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(rgba)
    from finetune_trainer.data import Sample

    for train in (True, False):
        dataset = ImageDataset([Sample(gray, 0), Sample(rgba, 1)],
                               build_transform(augmentation, imagenet(64), train=train))
        tensor, label = dataset[0]
        assert tensor.shape == (3, 64, 64) and tensor.dtype == torch.float32
        assert label == 0 and dataset[1][1] == 1
        if not train or augmentation == "None":
            # A uniform gray 200 normalised with ImageNet statistics, channel by channel.
            expected = torch.tensor([(200 / 255 - m) / s for m, s in
                                     zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
            assert torch.allclose(tensor.mean(dim=(1, 2)), expected, atol=1e-3)


def test_training_augmentation_varies_and_eval_does_not(tmp_path):
    path = tmp_path / "x.png"
    Image.open(io.BytesIO(png_bytes(3, size=32))).save(path)
    from finetune_trainer.data import Sample

    # timm's transforms draw from Python's random, torchvision's from torch's: seed both, and
    # compare several draws (two can coincide: no crop change, no flip, no op applied).
    torch.manual_seed(0)
    random.seed(0)
    train = ImageDataset([Sample(path, 0)], build_transform("Strong", imagenet(32), train=True))
    evaluation = ImageDataset([Sample(path, 0)], build_transform("Strong", imagenet(32), train=False))
    draws = [train[0][0] for _ in range(5)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])
    assert torch.equal(evaluation[0][0], evaluation[0][0])


def test_unknown_augmentation_names_the_field():
    with pytest.raises(TrainerError) as caught:
        build_transform("Extreme", imagenet(32), train=True)
    assert caught.value.field == "spec.augmentation"
