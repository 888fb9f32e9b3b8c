"""Hostile data, as a tenant can hand it to a shared trainer: decompression bombs are skipped as
corrupt without being decoded, keys and manifest rows that climb out of the dataset or the cache
are refused naming the key, pickles that would run code are refused as weights or checkpoints
without running, and S3 answers that a retry fixes are retried."""

from __future__ import annotations

import ast
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from finetune_api.contract import ExitCode
from finetune_trainer.checkpoint import Checkpoints, job_identity
from finetune_trainer.data import (MIN_IMAGE_PIXEL_LIMIT, image_pixel_limit, image_problem,
                                   prepare_dataset)
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import read_state_dict
from finetune_trainer.storage import ObjectInfo, open_store

TRAINER_SOURCES = Path(__file__).resolve().parents[2] / "trainer" / "finetune_trainer"


# ---- decompression bombs -----------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A valid one-colour 1-bit PNG: tens of KB that decode to width x height pixels (PIL holds
    mode "1" at a byte a pixel: 400 MB for 20000 x 20000)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter "none", then all-zero bits
    compressor = zlib.compressobj(9)
    rows_per_block = 256
    data = [compressor.compress(row * min(rows_per_block, height - start))
            for start in range(0, height, rows_per_block)]
    data.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(data)) + _png_chunk(b"IEND", b""))


def write_small_images(root: Path, classes=("cat", "dog"), count: int = 5) -> None:
    for class_index, name in enumerate(classes):
        directory = root / "train" / name
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (12, 12), (40 * class_index, 20 * index, 90)).save(
                directory / f"{index:03d}.png")


@pytest.fixture
def decoded_sizes(monkeypatch):
    """Sizes of the images PIL decodes. A decode of more than 10 Mpx is refused here instead of
    run, so a missing check fails the test rather than the machine."""
    sizes = []
    original = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        if self.size[0] * self.size[1] > 10_000_000:
            raise AssertionError(f"decoding {self.size} in full")
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width,height,pil_limit", [
    (20000, 20000, "default"),  # PIL's own DecompressionBombError at Image.open
    (20000, 20000, None),  # PIL's limit switched off (by any library in the process)
    (10000, 10000, "default"),  # 100 Mpx: PIL only warns and would decode it
])
def test_decompression_bomb_is_skipped_as_corrupt_without_decoding(
        width, height, pil_limit, tmp_path, monkeypatch, decoded_sizes):
    if pil_limit != "default":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    root = tmp_path / "set"
    write_small_images(root)
    bomb = root / "train" / "cat" / "bomb.png"
    bomb.write_bytes(png_bomb(width, height))
    assert bomb.stat().st_size < 64 * 1024

    prepared = prepare_dataset({"uri": str(root), "maxCorruptFraction": 0.1}, seed=0,
                               cache_dir=tmp_path / "cache", image_size=224)
    skipped = dict(prepared.skipped)
    assert set(skipped) == {f"{root}/train/cat/bomb.png"}
    assert skipped[f"{root}/train/cat/bomb.png"].startswith("unreadable")
    assert "ecompression bomb" in skipped[f"{root}/train/cat/bomb.png"]
    assert prepared.corrupt == 1 and len(prepared.train) + len(prepared.val) == 10
    assert (width, height) not in decoded_sizes
    assert (12, 12) in decoded_sizes  # the ordinary images were decoded and checked

    # It counts towards maxCorruptFraction like any unreadable image.
    with pytest.raises(TrainerError) as caught:
        prepare_dataset({"uri": str(root), "maxCorruptFraction": 0.05}, seed=0,
                        cache_dir=tmp_path / "cache", image_size=224)
    assert caught.value.field == "spec.dataset.maxCorruptFraction"
    assert "bomb.png" in caught.value.message
    assert (width, height) not in decoded_sizes


def test_pixel_limit_follows_image_size(tmp_path, decoded_sizes):
    """max(50 Mpx, 64 x imageSize^2): the floor up to imageSize 884, then a side 8 times
    imageSize; always below PIL's warning threshold, so PIL's global is never what decides."""
    assert image_pixel_limit(None) == image_pixel_limit(224) == MIN_IMAGE_PIXEL_LIMIT == 50_000_000
    assert image_pixel_limit(1024) == 64 * 1024 * 1024
    assert image_pixel_limit(1024) < 89_478_485  # PIL's default Image.MAX_IMAGE_PIXELS

    small = tmp_path / "small.png"
    small.write_bytes(png_bomb(300, 200))
    assert image_problem(small) is None
    assert "60000 pixels, over the limit of 50000" in image_problem(small, max_pixels=50_000)
    assert decoded_sizes == [(300, 200)]  # decoded once, when it was within the limit

    root = tmp_path / "set"
    write_small_images(root)
    big = root / "train" / "cat" / "big.png"
    big.write_bytes(png_bomb(7000, 8000))  # 56 Mpx
    small_input = prepare_dataset({"uri": str(root), "maxCorruptFraction": 0.1}, seed=0,
                                  cache_dir=tmp_path / "cache", image_size=224)
    assert [uri for uri, _ in small_input.skipped] == [str(big)]
    assert "7000x8000" in small_input.skipped[0][1]
    assert (7000, 8000) not in decoded_sizes
    # For imageSize 1024 (limit 67 Mpx) the same image is in range: it goes on to a full decode
    # (refused by the fixture only to keep this test light, so it counts as unreadable here).
    prepare_dataset({"uri": str(root), "maxCorruptFraction": 0.1}, seed=0,
                    cache_dir=tmp_path / "cache", image_size=1024)
    assert (7000, 8000) in decoded_sizes


# ---- keys that climb out -----------------------------------------------------------------

class ListingStore:
    """An S3 bucket as a hostile listing can present it: any key, including those a real server
    of ours refuses to store (`..` segments). Records what is downloaded."""

    endpoint = "http://s3.example"

    def __init__(self, keys: list[str], bucket: str = "bkt"):
        self.bucket, self.keys, self.downloads = bucket, keys, []

    def list(self, uri: str, *, field=None) -> list[ObjectInfo]:
        prefix = uri[len(f"s3://{self.bucket}/"):]
        return [ObjectInfo(f"s3://{self.bucket}/{key}", key[len(prefix):], 100, f"etag-{key}")
                for key in sorted(self.keys) if key.startswith(prefix)]

    def read_bytes(self, uri: str, *, field=None) -> bytes:
        raise AssertionError(f"read {uri}")

    def download_file(self, uri: str, path, *, field=None) -> int:
        self.downloads.append((uri, str(path)))
        raise AssertionError(f"downloaded {uri} to {path}")


def image_folder_keys(prefix: str) -> list[str]:
    return [f"{prefix}train/{name}/{index}.png" for name in ("cat", "dog") for index in range(3)]


@pytest.mark.parametrize("hostile_key", [
    "data/train/cat/../../../../../escape.png",
    "data/val/cat/../../../other-tenant/train/cat/0.png",
])
def test_listed_key_climbing_out_of_the_prefix_is_refused(hostile_key, tmp_path):
    store = ListingStore(image_folder_keys("data/") + [hostile_key])
    with pytest.raises(TrainerError) as caught:
        prepare_dataset({"uri": "s3://bkt/data/"}, seed=0, cache_dir=tmp_path / "cache",
                        store=store)
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert caught.value.field == "spec.dataset.uri"
    assert hostile_key.removeprefix("data/") in caught.value.message
    assert "'..'" in caught.value.message
    assert store.downloads == []  # refused from the listing, before any download
    assert not (tmp_path / "escape.png").exists()


def test_prefix_climbing_out_of_the_cache_is_refused(tmp_path):
    """The whole key names the cache file: a prefix with `..` would write outside the cache."""
    prefix = "../../../../../../tmp/"
    store = ListingStore(image_folder_keys(prefix))
    with pytest.raises(TrainerError) as caught:
        prepare_dataset({"uri": f"s3://bkt/{prefix}"}, seed=0, cache_dir=tmp_path / "cache",
                        store=store)
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert caught.value.field == "spec.dataset.uri"
    assert f"{prefix}train/cat/0.png" in caught.value.message
    assert "outside the cache directory" in caught.value.message
    assert store.downloads == []


@pytest.mark.parametrize("hostile_key", [
    "../other-tenant/x.png",
    "images/../../x.png",
    "/etc/passwd.png",
    "s3://other-bucket/x.png",
])
def test_manifest_row_climbing_out_is_refused(hostile_key, tmp_path):
    root = tmp_path / "set"
    write_small_images(root)
    (tmp_path / "other-tenant").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "other-tenant" / "x.png")
    rows = ["key,label"] + [f"train/{name}/{index:03d}.png,{name}" for name in ("cat", "dog")
                            for index in range(5)]
    rows.insert(3, f"{hostile_key},cat")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(TrainerError) as caught:
        prepare_dataset({"uri": str(root), "format": "Manifest", "maxCorruptFraction": 0.5},
                        seed=0, cache_dir=tmp_path / "cache")
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert caught.value.field == "spec.dataset.manifest"
    assert f"line 4: refusing key {hostile_key!r}" in caught.value.message


def test_ordinary_manifest_and_keys_still_load(tmp_path):
    """Dots inside names are not `..` segments."""
    root = tmp_path / "set"
    write_small_images(root)
    (root / "train" / "cat" / "a..b.png").write_bytes((root / "train" / "cat" / "000.png")
                                                      .read_bytes())
    rows = [f"train/{name}/{index:03d}.png,{name}" for name in ("cat", "dog") for index in range(5)]
    (root / "manifest.csv").write_text("\n".join(rows + ["train/cat/a..b.png,cat"]) + "\n")
    prepared = prepare_dataset({"uri": str(root), "format": "Manifest"}, seed=0,
                               cache_dir=tmp_path / "cache")
    assert len(prepared.train) + len(prepared.val) == 11 and not prepared.skipped


# ---- pickles that run code ---------------------------------------------------------------

class RunsCode:
    """Unpickling this calls os.system, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_torch_file(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2), "extra": payload}, buffer)
    return buffer.getvalue()


def _legacy_torch_file(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2, 2), "extra": payload}, buffer,
               _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _plain_pickle(payload) -> bytes:
    return pickle.dumps({"weight": torch.zeros(2, 2), "extra": payload})


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("serialize", [_zip_torch_file, _legacy_torch_file, _plain_pickle])
def test_weights_that_run_code_are_refused_without_running(serialize, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "weights.pth"
    path.write_bytes(serialize(RunsCode(marker)))
    with pytest.raises(TrainerError) as caught:
        read_state_dict(str(path))
    assert not marker.exists()
    assert caught.value.exit_code == ExitCode.INVALID_MODEL
    assert caught.value.field == "spec.model.weights"
    message = caught.value.message
    assert "\n" not in str(caught.value) and len(message) <= 400
    assert str(path) in message and "refused without unpickling it" in message
    if serialize is not _plain_pickle:  # protocol 4 stops weights_only earlier, at a FRAME
        assert "posix.system" in message and "could run code" in message


def test_weights_from_s3_that_run_code_are_refused_without_running(aws_env, s3_bucket, tmp_path):
    marker = tmp_path / "payload-ran"
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]})
    uri = f"s3://{s3_bucket}/models/weights.pt"
    store.write_bytes(uri, _zip_torch_file(RunsCode(marker)))
    with pytest.raises(TrainerError) as caught:
        read_state_dict(uri, store)
    assert not marker.exists()
    assert caught.value.exit_code == ExitCode.INVALID_MODEL
    assert caught.value.field == "spec.model.weights"
    assert uri in caught.value.message and "could run code" in caught.value.message


def test_checkpoint_that_runs_code_is_refused_without_running(tmp_path):
    """Even with a matching sha256 in latest.json (whoever can write the checkpoints can write
    the pointer): the newest checkpoint is refused with one log line, the previous one used."""
    marker = tmp_path / "payload-ran"
    messages = []
    identity = job_identity({"name": "cats", "namespace": "team"}, {"epochs": 2})
    checkpoints = Checkpoints(open_store(None), str(tmp_path / "checkpoints"), identity, keep=2,
                              log=messages.append)
    checkpoints.save({"epoch": 1, "weights": torch.ones(3)}, 1)
    checkpoints.save({"epoch": 2, "weights": torch.ones(3), "extra": RunsCode(marker)}, 2)
    assert not marker.exists()

    loaded = checkpoints.load_latest()
    assert not marker.exists()
    assert loaded.epoch == 1 and torch.equal(loaded.state["weights"], torch.ones(3))
    [refusal] = [m for m in messages if "epoch-0002.pt" in m]
    assert "\n" not in refusal and "system" in refusal and "could run code" in refusal


def _calls(tree: ast.AST, module: str, function: str) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == function
            and isinstance(node.func.value, ast.Name) and node.func.value.id == module]


def test_every_torch_load_in_the_trainer_is_weights_only():
    loads = 0
    for path in sorted(TRAINER_SOURCES.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch", "load"):
            loads += 1
            weights_only = {k.arg: k.value for k in call.keywords}.get("weights_only")
            assert isinstance(weights_only, ast.Constant) and weights_only.value is True, \
                f"{path.name}:{call.lineno}: torch.load without weights_only=True"
        for function in ("load", "loads", "Unpickler"):
            assert not _calls(tree, "pickle", function), f"{path.name} unpickles"
        assert "allow_pickle=True" not in path.read_text(), path.name
    assert loads >= 2  # models.read_state_dict and Checkpoints.load_latest
