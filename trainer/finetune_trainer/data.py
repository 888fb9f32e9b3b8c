"""The dataset: find the images (ImageFolder or Manifest layout), fetch them into a local cache
keyed by ETag, check them before any training, split them, and serve them as tensors.

Everything that can be wrong with the data is found here, before the first epoch, and reported
as INVALID_DATA naming the key, class or field to fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.utils.data

from finetune_api.contract import ExitCode
from finetune_api.schema import dataset_schema
from finetune_api.validation import apply_defaults
from finetune_trainer.errors import TrainerError
from finetune_trainer.storage import (ObjectInfo, ObjectNotFound, ObjectStore, is_s3_uri,
                                      join_uri, local_path, open_store)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
URI_FIELD = "spec.dataset.uri"
MANIFEST_FIELD = "spec.dataset.manifest"
_MANIFEST_HEADER_KEYS = {"key", "path", "file", "filename", "image", "uri"}
_EXAMPLES_SHOWN = 5
_UNREADABLE = "unreadable"  # prefix of the reasons that count towards maxCorruptFraction
# Decompression bombs: an image whose header promises more pixels than
# max(MIN_IMAGE_PIXEL_LIMIT, IMAGE_PIXEL_LIMIT_PER_INPUT_PIXEL * imageSize^2) is skipped as
# unreadable before any of it is decoded. Training resizes every image to imageSize, so a side 8
# times longer is already generous; the 50-megapixel floor keeps a high-end camera's photos. The
# limit stays under PIL's own warning threshold (Image.MAX_IMAGE_PIXELS, 89 Mpx) whatever
# imageSize (at most 1024) is, so it is this limit that decides, not PIL's global default.
MIN_IMAGE_PIXEL_LIMIT = 50_000_000
IMAGE_PIXEL_LIMIT_PER_INPUT_PIXEL = 64
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass
class Sample:
    path: Path
    label: int


@dataclass
class PreparedDataset:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]  # (uri, why), in key order
    train_counts: dict[str, int] = field(default_factory=dict)  # class -> images
    val_counts: dict[str, int] = field(default_factory=dict)
    val_source: str = "split"  # "val/" (ImageFolder), or "split" (held out with validationSplit)
    objects_listed: int = 0
    objects_downloaded: int = 0
    bytes_downloaded: int = 0
    cache_hits: int = 0
    corrupt: int = 0  # images that could not be read, included in `skipped`

    def summary(self) -> dict[str, Any]:
        """Counts for report.json."""
        return {"classes": self.classes, "trainImages": len(self.train),
                "valImages": len(self.val), "trainCounts": self.train_counts,
                "valCounts": self.val_counts, "valSource": self.val_source,
                "skippedImages": len(self.skipped), "corruptImages": self.corrupt,
                "skipped": [list(item) for item in self.skipped[:20]],
                "objectsListed": self.objects_listed,
                "objectsDownloaded": self.objects_downloaded,
                "bytesDownloaded": self.bytes_downloaded, "cacheHits": self.cache_hits}


@dataclass
class _Candidate:
    """An image the layout names, before it is fetched and checked."""

    info: ObjectInfo
    class_name: str
    split: str  # "train" or "val"


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_EXTENSIONS) and not key.rsplit("/", 1)[-1].startswith(".")


def image_pixel_limit(image_size: int | None) -> int:
    """The most pixels an image may have for a job whose input is image_size x image_size."""
    return max(MIN_IMAGE_PIXEL_LIMIT, IMAGE_PIXEL_LIMIT_PER_INPUT_PIXEL * (image_size or 0) ** 2)


def prepare_dataset(dataset_spec: dict, *, seed: int, cache_dir: Path,
                    store: ObjectStore | None = None, max_workers: int = 16,
                    image_size: int | None = None,
                    check_size: Callable[[int], None] | None = None) -> PreparedDataset:
    """Find, fetch, check and split the dataset that spec.dataset describes. `image_size`
    (spec.model.imageSize as resolved) sets the largest image accepted; without it the floor.
    `check_size` gets the bytes of the S3 images the listing names before any is downloaded
    (local files are read where they are), and raises when they cannot fit."""
    spec = apply_defaults(dataset_spec, dataset_schema())
    store = store or open_store(spec.get("s3"))
    uri = spec["uri"]
    objects = store.list(uri, field=URI_FIELD)
    if not objects:
        raise TrainerError(ExitCode.INVALID_DATA, f"no objects under {uri}", URI_FIELD)

    skipped: list[tuple[str, str]] = []
    if spec["format"] == "Manifest":
        candidates, missing = _manifest_candidates(spec, store, objects, skipped)
    else:
        candidates, missing = _image_folder_candidates(uri, objects, skipped), 0
    classes = _check_classes(candidates, uri, spec["format"])
    has_val_split = any(c.split == "val" for c in candidates)
    _check_counts(candidates, classes, spec["minImagesPerClass"], has_val_split,
                  after_checks=False)
    if check_size and is_s3_uri(uri):
        check_size(sum(candidate.info.size for candidate in candidates))

    local_paths, transfer = _fetch_and_verify(candidates, store, uri, cache_dir, max_workers,
                                              image_pixel_limit(image_size))
    readable = []
    corrupt = missing
    for candidate, (path, problem) in zip(candidates, local_paths):
        if problem:
            skipped.append((candidate.info.uri, problem))
            corrupt += 1
        else:
            readable.append((candidate, path))
    total_images = len(candidates) + missing
    if corrupt and corrupt / total_images > spec["maxCorruptFraction"]:
        bad = [f"{where} ({why})" for where, why in skipped if why.startswith(_UNREADABLE)]
        raise TrainerError(
            ExitCode.INVALID_DATA,
            f"{corrupt} of {total_images} images cannot be read, more than maxCorruptFraction "
            f"{spec['maxCorruptFraction']}: {', '.join(bad[:_EXAMPLES_SHOWN])}"
            f"{' ...' if len(bad) > _EXAMPLES_SHOWN else ''}", "spec.dataset.maxCorruptFraction")
    _check_counts([c for c, _ in readable], classes, spec["minImagesPerClass"], has_val_split,
                  after_checks=True)

    label_of = {name: index for index, name in enumerate(classes)}
    train = [Sample(path, label_of[c.class_name]) for c, path in readable if c.split == "train"]
    val = [Sample(path, label_of[c.class_name]) for c, path in readable if c.split == "val"]
    if not has_val_split:
        train, val = stratified_split(train, spec["validationSplit"], seed=seed)
    return PreparedDataset(
        classes=classes, train=train, val=val, skipped=sorted(skipped),
        train_counts=_counts(train, classes), val_counts=_counts(val, classes),
        val_source="val/" if has_val_split else "split", objects_listed=len(objects),
        objects_downloaded=transfer["downloaded"], bytes_downloaded=transfer["bytes"],
        cache_hits=transfer["cache_hits"], corrupt=corrupt)


def stratified_split(samples: list[Sample], fraction: float, *, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of each class (at least one image, and at least one stays in
    training), chosen by `seed`. Input order is the sorted key order, so a seed reproduces."""
    by_label: dict[int, list[Sample]] = {}
    for sample in samples:
        by_label.setdefault(sample.label, []).append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        members = list(by_label[label])
        rng.shuffle(members)
        held_out = min(max(1, round(len(members) * fraction)), len(members) - 1)
        val.extend(members[:held_out])
        train.extend(members[held_out:])
    order = {id(sample): index for index, sample in enumerate(samples)}
    return sorted(train, key=lambda s: order[id(s)]), sorted(val, key=lambda s: order[id(s)])


# ---- layouts -----------------------------------------------------------------------------

def _image_folder_candidates(uri: str, objects: list[ObjectInfo],
                             skipped: list[tuple[str, str]]) -> list[_Candidate]:
    candidates = []
    for info in objects:
        parts = info.key.split("/")
        if len(parts) < 3 or parts[0] not in ("train", "val"):
            continue  # README, manifests, anything outside train/<class>/ and val/<class>/
        if problem := path_escape(info.key):
            raise TrainerError(ExitCode.INVALID_DATA,
                               f"refusing object key {info.key!r} ({info.uri}): {problem}, which "
                               f"reaches outside the dataset prefix {uri}", URI_FIELD)
        if not is_image_key(info.key):
            skipped.append((info.uri, "not an image file (by extension)"))
            continue
        candidates.append(_Candidate(info, parts[1], parts[0]))
    if not any(c.split == "train" for c in candidates):
        found = ", ".join(info.key for info in objects[:_EXAMPLES_SHOWN])
        raise TrainerError(
            ExitCode.INVALID_DATA,
            f"no images under {join_uri(uri, 'train/')}<class>/ (ImageFolder layout expects "
            f"train/<class>/<image>); found {len(objects)} objects such as {found}", URI_FIELD)
    return candidates


def _manifest_candidates(spec: dict, store: ObjectStore, objects: list[ObjectInfo],
                         skipped: list[tuple[str, str]]) -> tuple[list[_Candidate], int]:
    uri = spec["uri"]
    manifest_uri = join_uri(uri, spec["manifest"])
    try:
        text = store.read_bytes(manifest_uri, field=MANIFEST_FIELD).decode("utf-8-sig")
    except ObjectNotFound as error:
        raise TrainerError(ExitCode.INVALID_DATA, f"manifest {manifest_uri} does not exist",
                           MANIFEST_FIELD) from error
    except UnicodeDecodeError as error:
        raise TrainerError(ExitCode.INVALID_DATA, f"manifest {manifest_uri} is not UTF-8 text",
                           MANIFEST_FIELD) from error
    by_key = {info.key: info for info in objects}
    candidates, missing = [], 0
    rows = list(csv.reader(io.StringIO(text)))
    for line_number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) != 2:
            raise TrainerError(
                ExitCode.INVALID_DATA,
                f"manifest {manifest_uri} line {line_number}: expected 2 columns key,label, "
                f"got {len(row)}: {','.join(row)[:200]}", MANIFEST_FIELD)
        key, label = row[0].strip(), row[1].strip()
        if line_number == 1 and key.lower() in _MANIFEST_HEADER_KEYS:
            continue
        if not key or not label:
            raise TrainerError(ExitCode.INVALID_DATA,
                               f"manifest {manifest_uri} line {line_number}: empty key or label",
                               MANIFEST_FIELD)
        if problem := path_escape(key):
            raise TrainerError(ExitCode.INVALID_DATA,
                               f"manifest {manifest_uri} line {line_number}: refusing key "
                               f"{key!r}: {problem}, which reaches outside the dataset {uri} "
                               "(keys are relative to it)", MANIFEST_FIELD)
        info = by_key.get(key)
        if info is None:
            skipped.append((join_uri(uri, key), f"{_UNREADABLE}: listed in the manifest (line "
                            f"{line_number}) but not found"))
            missing += 1
        elif not is_image_key(key):
            skipped.append((info.uri, "not an image file (by extension)"))
        else:
            candidates.append(_Candidate(info, label, "train"))
    if not candidates and not missing:
        raise TrainerError(ExitCode.INVALID_DATA, f"manifest {manifest_uri} lists no images",
                           MANIFEST_FIELD)
    return candidates, missing


def path_escape(key: str) -> str | None:
    """How `key`, joined to a directory or prefix, would name something outside it, or None."""
    if key.startswith("/") or _URI_SCHEME.match(key):
        return "it is an absolute path or a URI"
    if ".." in key.split("/"):
        return "it has a '..' segment"
    return None


def _label_order(name: str) -> tuple:
    """Numeric labels sort as numbers (2 before 10), others alphabetically."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _check_classes(candidates: list[_Candidate], uri: str, layout: str) -> list[str]:
    train_classes = sorted({c.class_name for c in candidates if c.split == "train"},
                           key=_label_order)
    if len(train_classes) < 2:
        found = f"only {train_classes[0]!r}" if train_classes else "none"
        where = "labels in the manifest" if layout == "Manifest" else \
            f"class directories under {join_uri(uri, 'train/')}"
        raise TrainerError(ExitCode.INVALID_DATA,
                           f"a classifier needs at least 2 classes; found {found} ({where})",
                           URI_FIELD)
    val_classes = {c.class_name for c in candidates if c.split == "val"}
    if val_classes and val_classes != set(train_classes):
        problems = [f"val/ lacks class {name!r}" for name in train_classes
                    if name not in val_classes]
        problems += [f"val/ has class {name!r} that train/ lacks"
                     for name in sorted(val_classes - set(train_classes))]
        raise TrainerError(ExitCode.INVALID_DATA,
                           f"val/ and train/ must have the same classes under {uri}: "
                           + "; ".join(problems), URI_FIELD)
    return train_classes


def _check_counts(candidates: list[_Candidate], classes: list[str], minimum: int,
                  has_val_split: bool, *, after_checks: bool) -> None:
    readable = " readable" if after_checks else ""
    train_counts = Counter(c.class_name for c in candidates if c.split == "train")
    # Without a val/ split the held-out images come out of train/, so each class needs two.
    needed = max(minimum, 1 if has_val_split else 2)
    short = [(name, train_counts[name]) for name in classes if train_counts[name] < needed]
    if short:
        listed = ", ".join(f"{name!r} has {count}" for name, count in short)
        raise TrainerError(ExitCode.INVALID_DATA,
                           f"every class needs at least {needed}{readable} training images: "
                           f"{listed}", "spec.dataset.minImagesPerClass")
    if has_val_split:
        val_counts = Counter(c.class_name for c in candidates if c.split == "val")
        empty = [name for name in classes if not val_counts[name]]
        if empty:
            raise TrainerError(ExitCode.INVALID_DATA,
                               f"val/ has no{readable} images of class "
                               + ", ".join(repr(name) for name in empty), URI_FIELD)


def _counts(samples: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = Counter(sample.label for sample in samples)
    return {name: counts.get(index, 0) for index, name in enumerate(classes)}


# ---- fetching and checking ---------------------------------------------------------------

def cache_namespace(store: ObjectStore, uri: str) -> str:
    """Cache directory name for one endpoint and bucket, so equal keys never collide."""
    bucket = uri[len("s3://"):].split("/", 1)[0]
    return hashlib.sha256(f"{store.endpoint}\n{bucket}".encode()).hexdigest()[:16]


def _fetch_and_verify(candidates: list[_Candidate], store: ObjectStore, uri: str,
                      cache_dir: Path, max_workers: int, max_pixels: int
                      ) -> tuple[list[tuple[Path | None, str | None]], dict[str, int]]:
    """For each candidate: (local path, None) or (None, why it is unusable). S3 objects are
    downloaded into `cache_dir` unless the cached copy has the same ETag; local files are
    read in place."""
    transfer = Counter()
    transfer_lock = threading.Lock()

    def count(**amounts: int) -> None:
        with transfer_lock:
            transfer.update(amounts)
    namespace_dir = Path(cache_dir) / cache_namespace(store, uri) if is_s3_uri(uri) else None
    if namespace_dir is not None:
        # The whole key names the cache file, so the prefix in spec.dataset.uri must not climb
        # out of the cache either (into another bucket's or another job's files).
        for candidate in candidates:
            object_key = candidate.info.uri[len("s3://"):].split("/", 1)[1]
            if problem := path_escape(object_key):
                raise TrainerError(ExitCode.INVALID_DATA,
                                   f"refusing object key {object_key!r} ({candidate.info.uri}): "
                                   f"{problem}, which reaches outside the cache directory "
                                   f"{namespace_dir}",
                                   URI_FIELD)

    def fetch(candidate: _Candidate) -> tuple[Path | None, str | None]:
        info = candidate.info
        if namespace_dir is None:
            path = local_path(uri) / info.key
        else:
            object_key = info.uri[len("s3://"):].split("/", 1)[1]
            if any(part in ("", ".", "..") for part in object_key.split("/")):
                return None, f"{_UNREADABLE}: key is not a safe relative path"
            path = namespace_dir / "objects" / object_key
            etag_path = namespace_dir / "etags" / object_key
            if path.is_file() and etag_path.is_file() and etag_path.read_text() == info.etag:
                count(cache_hits=1)
            else:
                try:
                    written = store.download_file(info.uri, path, field=URI_FIELD)
                except ObjectNotFound:  # deleted since it was listed
                    return None, f"{_UNREADABLE}: deleted while the dataset was being read"
                count(bytes=written, downloaded=1)
                etag_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = etag_path.with_name(f".tmp-{etag_path.name}")
                tmp.write_text(info.etag)
                tmp.replace(etag_path)
        problem = image_problem(path, max_pixels=max_pixels)
        return (None, f"{_UNREADABLE}: {problem}") if problem else (path, None)

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        results = list(pool.map(fetch, candidates))
    return results, transfer


def image_problem(path: Path, *, max_pixels: int = MIN_IMAGE_PIXEL_LIMIT) -> str | None:
    """Why PIL cannot use this image, or None. The size comes from the header (Image.open is
    lazy), so an image over `max_pixels` is refused before a byte of it is decoded (one over
    twice PIL's global Image.MAX_IMAGE_PIXELS already fails in Image.open, with PIL's
    DecompressionBombError, also before decoding). `verify` checks the structure (PNG CRCs) and
    a full decode catches truncated data, which `verify` misses for JPEG."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                return (f"decompression bomb? its header says {width}x{height} = "
                        f"{width * height} pixels, over the limit of {max_pixels}; not decoded")
            image.verify()
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "image has no pixels"
    except Exception as error:  # PIL raises many types for bad files
        return f"{type(error).__name__}: {error}"[:200]
    return None


# ---- tensors -----------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """(tensor, label) pairs from prepared samples."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform
        self.targets = [sample.label for sample in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        sample = self.samples[index]
        with Image.open(sample.path) as image:
            image = image.convert("RGB")
        return self.transform(image), sample.label
