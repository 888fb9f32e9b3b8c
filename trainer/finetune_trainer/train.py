"""The training run, top to bottom: `train_one_epoch`, `evaluate`, `load_data`, `FineTuneRun`
(one fine-tune, an epoch at a time), `fine_tune`, `linear_probe`, `auto_race` (strategy Auto,
race.py), `main`. Modelled on torchvision's references/classification/train.py; the policy
(freeze, learning rates, schedule) lives in policy.py, the backbones in models.py."""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune_api.contract import ExitCode
from finetune_api.validation import SpecError, validate_manifest
from finetune_trainer import baseline as baseline_module
from finetune_trainer import budget
from finetune_trainer import distributed
from finetune_trainer import linear_probe as probe
from finetune_trainer import policy, race
from finetune_trainer.checkpoint import (Checkpoints, checkpoint_uri, job_identity,
                                         restore_rng_state, rng_state)
from finetune_trainer.distributed import SINGLE, World
from finetune_trainer.data import ImageDataset, prepare_dataset
from finetune_trainer.errors import TrainerError
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.models import build_model
from finetune_trainer.preemption import STOP, Preempted
from finetune_trainer.preflight import (check_output, check_preflight, dataset_size_check,
                                         output_owner)
from finetune_trainer.preprocessing import Preprocessing, build_transform, resolve_preprocessing
from finetune_trainer.report import classification_summary, write_outputs
from finetune_trainer.storage import open_store
from finetune_trainer.strategy import choose_strategy


@dataclass
class Device:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool


def pick_device(precision: str, channels_last: bool) -> Device:
    if not torch.cuda.is_available():
        return Device(torch.device("cpu"), torch.bfloat16 if precision == "BF16" else None, False)
    bf16 = precision == "BF16" or (precision == "Auto" and torch.cuda.is_bf16_supported())
    return Device(torch.device("cuda"), torch.bfloat16 if bf16 else None, channels_last)


def _to_device(images: torch.Tensor, run: Device) -> torch.Tensor:
    images = images.to(run.device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if run.channels_last else images


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_wait_seconds: float
    steps: int = 0
    interrupted: bool = False  # stopped by a stop request before the epoch's last step

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def plus(self, later: EpochStats) -> EpochStats:
        """These steps of an epoch followed by `later` ones (a run resumed mid-epoch)."""
        images = self.images + later.images
        return EpochStats(loss=(self.loss * self.images + later.loss * later.images) / max(1, images),
                          images=images, seconds=self.seconds + later.seconds,
                          data_wait_seconds=self.data_wait_seconds + later.data_wait_seconds,
                          steps=self.steps + later.steps, interrupted=later.interrupted)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, loader, run: Device, *, frozen_norms: list[nn.Module] = (),
                    metrics: TrainerMetrics | None = None, should_stop=None) -> EpochStats:
    """Train on what `loader` yields. `should_stop()` is asked after each optimizer step; when
    it says yes the epoch ends there, marked `interrupted` if steps were left."""
    policy.set_train_mode(model, list(frozen_norms))
    total_loss, images_seen, data_wait, steps = 0.0, 0, 0.0, 0
    remaining = len(loader)
    started = step_started = time.perf_counter()
    for images, targets in loader:
        waited = time.perf_counter() - step_started
        images, targets = _to_device(images, run), targets.to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total_loss += loss.item() * len(targets)
        images_seen += len(targets)
        data_wait += waited
        steps += 1
        if metrics is not None:
            metrics.step_done(seconds=time.perf_counter() - step_started, data_wait_seconds=waited,
                              learning_rates=policy.group_learning_rates(optimizer))
        if should_stop is not None and steps < remaining and should_stop():
            return EpochStats(loss=total_loss / max(1, images_seen), images=images_seen,
                              seconds=time.perf_counter() - started, data_wait_seconds=data_wait,
                              steps=steps, interrupted=True)
        step_started = time.perf_counter()
    return EpochStats(loss=total_loss / max(1, images_seen), images=images_seen,
                      seconds=time.perf_counter() - started, data_wait_seconds=data_wait,
                      steps=steps)


def distributed_model(model: nn.Module, run: Device, compile_model: bool) -> nn.Module:
    """DDP around the model: gradients averaged over every rank after each backward."""
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device] if run.device.type == "cuda" else None)
    return torch.compile(ddp) if compile_model else ddp


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    targets: np.ndarray
    predictions: np.ndarray


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader, run: Device) -> Evaluation:
    model.eval()
    total_loss, targets_seen, predictions = 0.0, [], []
    for images, targets in loader:
        images, targets = _to_device(images, run), targets.to(run.device, non_blocking=True)
        with torch.autocast(run.device.type, dtype=run.autocast_dtype or torch.float32,
                            enabled=run.autocast_dtype is not None):
            logits = model(images)
        total_loss += criterion(logits.float(), targets).item() * len(targets)
        targets_seen.append(targets.cpu().numpy())
        predictions.append(logits.argmax(dim=1).cpu().numpy())
    targets_all = np.concatenate(targets_seen) if targets_seen else np.zeros(0, dtype=np.int64)
    predictions_all = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
    accuracy = float((targets_all == predictions_all).mean()) if len(targets_all) else 0.0
    return Evaluation(loss=total_loss / max(1, len(targets_all)), accuracy=accuracy,
                      targets=targets_all, predictions=predictions_all)


class EpochSampler(torch.utils.data.Sampler):
    """This process's share of one seeded permutation of the training images per epoch, from a
    given position: a run resumed mid-epoch sees exactly the images an uninterrupted run would
    have seen next, none twice and none skipped. With several processes the permutation is
    padded and dealt as torch's DistributedSampler deals it."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, replicas: int = 1):
        self.size, self.seed, self.rank, self.replicas = size, seed, rank, replicas
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Epoch `epoch`, skipping the first `start` images of this process's share."""
        self.epoch, self.start = epoch, start

    def _share(self) -> list[int]:
        order = torch.randperm(self.size,
                               generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order.tolist()
        if self.replicas > 1:
            total = math.ceil(self.size / self.replicas) * self.replicas
            order = (order * math.ceil(total / max(1, self.size)))[:total][self.rank::self.replicas]
        return order

    def __iter__(self):
        return iter(self._share()[self.start:])

    def __len__(self) -> int:
        return math.ceil(self.size / self.replicas) - self.start


@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    train_eval: torch.utils.data.DataLoader  # training images without augmentation, in order
    preprocessing: Preprocessing


def load_data(dataset, *, preprocessing: Preprocessing, augmentation: str, batch_size: int,
              workers: int, run: Device, seed: int, world: World = SINGLE) -> Loaders:
    """batch_size is per process. With several processes, a DistributedSampler gives each rank
    its share of one seeded permutation, so every image is seen once per epoch."""
    eval_transform = build_transform(augmentation, preprocessing, train=False)
    common = {"batch_size": batch_size, "num_workers": workers,
              "pin_memory": run.device.type == "cuda", "persistent_workers": workers > 0}
    train_images = ImageDataset(dataset.train,
                                build_transform(augmentation, preprocessing, train=True))
    sampler = EpochSampler(len(train_images), seed=seed, rank=world.rank,
                           replicas=world.size if world.launched else 1)
    # The loader's own generator (reseeded each epoch) seeds its worker processes, so that
    # making an iterator draws nothing from the global RNG a checkpoint restores.
    train = torch.utils.data.DataLoader(
        train_images, sampler=sampler, generator=torch.Generator().manual_seed(seed),
        # A last batch of one image breaks BatchNorm in training mode.
        drop_last=len(sampler) > batch_size, **common)
    val = torch.utils.data.DataLoader(ImageDataset(dataset.val, eval_transform), **common)
    train_eval = torch.utils.data.DataLoader(ImageDataset(dataset.train, eval_transform), **common)
    return Loaders(train=train, val=val, train_eval=train_eval, preprocessing=preprocessing)


@dataclass
class TrainingResult:
    final: Evaluation
    history: list[dict] = field(default_factory=list)
    best_val_accuracy: float = 0.0
    best_epoch: int = 0
    resumed_from_epoch: int | None = None
    resumed_from_step: int = 0  # optimizer steps into that epoch (a graceful mid-epoch stop)
    optimizer_steps: int = 0
    last_checkpoint: dict | None = None  # the pointer entry of the run's latest checkpoint
    stopped_early: bool = False
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    details: dict = field(default_factory=dict)
    planned_epochs: int = 1


class EarlyStopping:
    """Counts epochs without improvement of the watched metric by more than min_delta; says stop
    after `patience` of them, but not before `min_epochs` epochs (Auto's finalist:
    race.finalist_min_epochs)."""

    def __init__(self, settings: dict | None, min_epochs: int = 0):
        self.settings = settings
        self.min_epochs = min_epochs
        self.best: float | None = None
        self.bad_epochs = 0

    def update(self, evaluation: Evaluation, epoch: int) -> bool:
        """Record epoch `epoch` (counted from 1); True when training should stop."""
        if not self.settings:
            return False
        value = evaluation.accuracy if self.settings["metric"] == "ValAccuracy" else -evaluation.loss
        if self.best is None or value > self.best + self.settings["minDelta"]:
            self.best, self.bad_epochs = value, 0
        else:
            self.bad_epochs += 1
        return self.says_stop(epoch)

    def says_stop(self, epochs_done: int) -> bool:
        return (bool(self.settings) and self.bad_epochs >= self.settings["patience"]
                and epochs_done >= self.min_epochs)


def _better(evaluation: Evaluation, best: Evaluation | None) -> bool:
    """Higher accuracy, or the same accuracy at a lower loss (small validation splits tie)."""
    return best is None or (evaluation.accuracy, -evaluation.loss) > (best.accuracy, -best.loss)


class FineTuneRun:
    """One FineTune or FromScratch run in progress: model, optimizer and schedule for `epochs`
    epochs, trained an epoch at a time, so that the Auto race can give it a few epochs, rank it,
    and let the winner continue where it stopped. With early stopping the best epoch's weights
    are kept and restored by `finish`."""

    def __init__(self, model: nn.Module, loaders: Loaders, spec: dict, run: Device, *,
                 strategy: str, epochs: int, world: World = SINGLE):
        self.model, self.loaders, self.spec, self.run, self.world = model, loaders, spec, run, world
        self.strategy, self.epochs = strategy, epochs
        pretrained = strategy != "FromScratch"
        self.freeze = spec["freeze"] if pretrained else {"policy": "None", "batchNorm": "Trainable"}
        self.stages = policy.model_stages(model)
        model.to(run.device)
        if run.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = policy.build_optimizer(
            policy.parameter_groups(model, self.stages, spec["optimizer"], pretrained=pretrained),
            spec["optimizer"])
        self.steps_per_epoch = len(loaders.train)
        self.scheduler = policy.build_scheduler(self.optimizer, spec["schedule"],
                                                steps_per_epoch=self.steps_per_epoch,
                                                epochs=epochs)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=spec["labelSmoothing"])
        self.forward = torch.compile(model) if spec["compile"] else model
        self.early_stopping = EarlyStopping(budget.early_stopping(spec, epochs))
        self.result = TrainingResult(final=None)
        self.best: Evaluation | None = None
        self.best_state: dict | None = None  # weights of the best epoch, with early stopping
        self.epochs_done = 0
        self.stopped = False  # by early stopping
        # A graceful stop mid-epoch: the steps of the current epoch done and their statistics.
        self.step_in_epoch, self.partial_epoch = 0, None
        self.interrupted = False
        self.optimizer_steps = 0
        self._train_forward, self._wrapped_frozen_count = self.forward, None

    @property
    def keeps_best(self) -> bool:
        return self.early_stopping.settings is not None

    def state(self) -> dict:
        """What a checkpoint holds to continue this run."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epochs_done,
                "history": self.result.history, "bestValAccuracy": self.result.best_val_accuracy,
                "bestEpoch": self.result.best_epoch, "bestState": self.best_state,
                "bestLoss": self.best.loss if self.best else None,
                "trainSeconds": self.result.train_seconds,
                "earlyStopping": (self.early_stopping.best, self.early_stopping.bad_epochs),
                "stepInEpoch": self.step_in_epoch,
                "partialEpoch": vars(self.partial_epoch).copy() if self.partial_epoch else None,
                "optimizerSteps": self.optimizer_steps,
                "rng": rng_state(), "worldSize": self.world.size}

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.epochs_done = self.result.resumed_from_epoch = state["epoch"]
        self.result.history = list(state["history"])
        self.result.best_val_accuracy = state["bestValAccuracy"]
        self.result.best_epoch = state["bestEpoch"]
        self.best_state = state.get("bestState")
        if state.get("bestLoss") is not None:
            self.best = Evaluation(loss=state["bestLoss"], accuracy=state["bestValAccuracy"],
                                   targets=None, predictions=None)
        self.result.train_seconds = state["trainSeconds"]
        self.early_stopping.best, self.early_stopping.bad_epochs = state["earlyStopping"]
        # A checkpoint written where early stopping ended the run: it stays ended.
        self.stopped = self.early_stopping.says_stop(self.epochs_done)
        self.step_in_epoch = state.get("stepInEpoch", 0)
        partial = state.get("partialEpoch")
        self.partial_epoch = EpochStats(**partial) if partial else None
        self.optimizer_steps = state.get("optimizerSteps",
                                         self.epochs_done * self.steps_per_epoch)
        self.result.resumed_from_step = self.step_in_epoch

    def train_epoch(self, *, metrics: TrainerMetrics | None, log=print,
                    label: str = "", should_stop=None) -> bool:
        """Train and evaluate one epoch (the rest of it, after a mid-epoch resume); True when
        early stopping says to stop. When `should_stop()` says yes after a step, the epoch
        stops there unevaluated and `interrupted` is set."""
        epoch, spec, world = self.epochs_done, self.spec, self.world
        frozen_count = policy.frozen_stage_count(self.freeze, len(self.stages.stages), epoch)
        frozen_norms = policy.apply_freeze(self.model, self.stages, frozen_count,
                                           self.freeze["batchNorm"])
        # The same shuffle for an epoch whether or not the run was resumed before or in it.
        self.loaders.train.sampler.set_position(epoch, self.step_in_epoch * spec["batchSize"])
        self.loaders.train.generator.manual_seed(spec["seed"] + epoch)
        if world.launched:
            # DDP synchronises the parameters that train when it is built: build it again
            # when gradual unfreezing changes them.
            if frozen_count != self._wrapped_frozen_count:
                self._train_forward = distributed_model(self.model, self.run, spec["compile"])
                self._wrapped_frozen_count = frozen_count
        try:
            stats = train_one_epoch(self._train_forward, self.criterion, self.optimizer,
                                    self.scheduler, self.loaders.train, self.run,
                                    frozen_norms=frozen_norms, metrics=metrics,
                                    should_stop=should_stop)
        finally:
            self.loaders.train.sampler.set_position(epoch)  # len(loader) is a whole epoch again
        self.optimizer_steps += stats.steps
        if self.partial_epoch is not None:
            stats = self.partial_epoch.plus(stats)
        if stats.interrupted:
            self.step_in_epoch, self.partial_epoch, self.interrupted = stats.steps, stats, True
            return False
        self.step_in_epoch, self.partial_epoch = 0, None
        stats = distributed.sum_epoch_stats(world, stats)
        evaluation = evaluate(self.forward, self.criterion, self.loaders.val, self.run)
        result = self.result
        result.train_seconds += stats.seconds
        self.epochs_done = epoch + 1
        if _better(evaluation, self.best):
            self.best = evaluation
            result.best_val_accuracy, result.best_epoch = evaluation.accuracy, epoch + 1
            if self.keeps_best:
                self.best_state = {name: tensor.detach().to("cpu", copy=True)
                                   for name, tensor in self.model.state_dict().items()}
        result.history.append({
            "epoch": epoch + 1, "trainLoss": stats.loss, "valLoss": evaluation.loss,
            "valAccuracy": evaluation.accuracy, "frozenStages": frozen_count,
            "learningRates": policy.group_learning_rates(self.optimizer),
            "imagesPerSecond": stats.images_per_second, "seconds": stats.seconds,
            "dataWaitSeconds": stats.data_wait_seconds})
        if metrics is not None:
            metrics.epoch_done(epoch=epoch + 1, train_loss=stats.loss,
                               val_accuracy=evaluation.accuracy,
                               best_val_accuracy=result.best_val_accuracy,
                               images_per_second=stats.images_per_second)
        log(f"{label}epoch {epoch + 1}/{self.epochs}  train loss {stats.loss:.4f}  val loss "
            f"{evaluation.loss:.4f}  val accuracy {evaluation.accuracy:.4f}  "
            f"{stats.images_per_second:.1f} images/s")
        result.final = evaluation
        self.stopped = distributed.broadcast_value(
            world, self.early_stopping.update(evaluation, epoch + 1))
        return self.stopped

    def train_at_least(self, epochs: int) -> None:
        """Early stopping may end this run only after `epochs` epochs."""
        self.early_stopping.min_epochs = min(epochs, self.epochs)
        self.stopped = self.early_stopping.says_stop(self.epochs_done)

    def finish(self) -> TrainingResult:
        """The result, with the best epoch's weights put back when early stopping keeps them."""
        result = self.result
        if self.keeps_best and self.best_state is not None and \
                result.best_epoch != self.epochs_done:
            self.model.load_state_dict(self.best_state)
            result.final = None
        if result.final is None:  # restored weights, or every epoch done before a restart
            result.final = evaluate(self.forward, self.criterion, self.loaders.val, self.run)
        trained_images = sum(h["imagesPerSecond"] * h["seconds"] for h in result.history)
        result.images_per_second = (trained_images / result.train_seconds
                                    if result.train_seconds else 0)
        result.stopped_early = self.stopped
        result.planned_epochs = self.epochs
        result.optimizer_steps = self.optimizer_steps
        return result


def fine_tune(model: nn.Module, loaders: Loaders, spec: dict, run: Device, *, strategy: str,
              reason: str, checkpoints: Checkpoints, classes: list[str],
              metrics: TrainerMetrics, log=print, world: World = SINGLE,
              trainee: FineTuneRun | None = None, extra_state: dict | None = None
              ) -> TrainingResult:
    """FineTune or FromScratch: the epoch loop with gradual unfreezing, checkpoints every
    spec.checkpoint.everyEpochs epochs, resume from the latest valid checkpoint, early stopping.
    `trainee`: a run already part-trained (the Auto race's winner) to continue; `extra_state`
    goes into its checkpoints."""
    if trainee is None:
        trainee = FineTuneRun(model, loaders, spec, run, strategy=strategy,
                              epochs=budget.planned_epochs(spec, len(loaders.train)), world=world)
    epochs = trainee.epochs
    loaded = checkpoints.load_latest()
    if loaded is not None:
        written_by = loaded.state.get("worldSize", 1)
        if written_by != world.size:
            raise TrainerError(
                ExitCode.INVALID_SPEC,
                f"checkpoint {loaded.uri} was written by {written_by} training "
                f"processes and this run has {world.size}: resuming with another world size "
                "would change the data order and the global batch; run with the same "
                "resources.workers and GPUs, or set checkpoint.uri to a new location",
                "spec.resources.workers")
        trainee.restore(loaded.state)
        log(f"resumed from {loaded.uri}: {trainee.epochs_done} of {epochs} epochs and "
            f"{trainee.step_in_epoch} steps of the next done")
    metrics.start(backbone=spec["model"]["backbone"], strategy=strategy, reason=reason,
                  planned_epochs=epochs, planned_steps=trainee.steps_per_epoch * epochs,
                  steps_done=trainee.optimizer_steps, epochs_done=trainee.epochs_done)
    stop_requested = stop_check(world)
    # A fresh run has nothing to save before its first step; the Auto finalist has its race.
    saved_at_step = trainee.optimizer_steps if loaded is not None else 0
    latest = loaded.entry if loaded is not None else None

    def save_checkpoint() -> None:
        nonlocal saved_at_step, latest
        saved_at_step = trainee.optimizer_steps
        if not world.is_main:
            return
        latest = checkpoints.save({**trainee.state(), "classes": classes, **(extra_state or {})},
                                  trainee.epochs_done, trainee.step_in_epoch)
        metrics.checkpoint_saved(latest)
        log(f"checkpoint {latest['uri']}")

    def preempted() -> None:
        """Checkpoint the step the run stopped at (unless nothing was trained since the last
        checkpoint), wait until it is written, and raise Preempted naming the checkpoint the
        next run resumes from."""
        fresh = saved_at_step != trainee.optimizer_steps
        if fresh:
            save_checkpoint()
        # Every rank names rank 0's checkpoint: each pod's termination message says where the
        # group resumes.
        stopped_at = distributed.broadcast_value(world, latest)
        where = (f"epoch {trainee.epochs_done + 1} step {trainee.step_in_epoch}"
                 if trainee.step_in_epoch else f"the end of epoch {trainee.epochs_done}")
        raise Preempted(where, stopped_at, fresh=fresh)

    while trainee.epochs_done < epochs and not trainee.stopped:
        if stop_requested():  # between epochs, or before the first step
            preempted()
        stop = trainee.train_epoch(metrics=metrics, log=log, should_stop=stop_requested)
        if trainee.interrupted:
            preempted()
        done = trainee.epochs_done
        checkpoint_due = done % spec["checkpoint"]["everyEpochs"] == 0
        if checkpoint_due or done == epochs or stop:
            save_checkpoint()
        distributed.barrier(world)
        if stop:
            log(f"early stopping: no improvement of "
                f"{trainee.early_stopping.settings['metric']} for "
                f"{trainee.early_stopping.bad_epochs} epochs; keeping epoch "
                f"{trainee.result.best_epoch}")
    result = trainee.finish()
    result.last_checkpoint = latest
    return result


def stop_check(world: World):
    """A function the training loop calls after each step: whether to stop now. With several
    processes they agree (one all-reduce), so that every rank stops at the same step."""
    if not world.launched:
        return lambda: STOP.requested
    return lambda: distributed.any_rank(world, STOP.requested)


def linear_probe(model: nn.Module, loaders: Loaders, spec: dict, run: Device, *,
                 cache_dir: Path | None, classes: list[str], metrics: TrainerMetrics,
                 reason: str, log=print, prefer_holdout: bool = False) -> TrainingResult:
    """Frozen features (cached by weights and images) and a cross-validated linear classifier,
    installed as the model's head."""
    metrics.start(backbone=spec["model"]["backbone"], strategy="LinearProbe", reason=reason,
                  planned_epochs=1, planned_steps=0)
    model.to(run.device)
    started = time.perf_counter()
    features = {}
    for split, loader in (("train", loaders.train_eval), ("val", loaders.val)):
        key = probe.features_cache_key(model, loader.dataset.samples,
                                       preprocessing=loaders.preprocessing)
        features[split] = probe.cached_features(
            cache_dir, key, lambda: probe.extract_features(model, loader, run.device,
                                                           run.autocast_dtype))
    feature_seconds = time.perf_counter() - started
    settings = spec["linearProbe"]
    fitted = probe.fit_linear_probe(*features["train"], *features["val"], num_classes=len(classes),
                                    classifier=settings["classifier"],
                                    cv_folds=settings["cvFolds"], seed=spec["seed"],
                                    prefer_holdout=prefer_holdout)
    probe.install_head(model, fitted.weight, fitted.bias)
    seconds = time.perf_counter() - started
    images = len(features["train"][1]) + len(features["val"][1])
    log(f"linear probe ({fitted.classifier}, C={fitted.c} by {fitted.selection}): val "
        f"accuracy {fitted.val_accuracy:.4f}")
    final = Evaluation(loss=float("nan"), accuracy=fitted.val_accuracy,
                       targets=features["val"][1], predictions=fitted.val_predictions)
    metrics.epoch_done(epoch=1, train_loss=float("nan"), val_accuracy=fitted.val_accuracy,
                       best_val_accuracy=fitted.val_accuracy,
                       images_per_second=images / feature_seconds if feature_seconds else 0)
    return TrainingResult(final=final, best_val_accuracy=fitted.val_accuracy, best_epoch=1,
                          train_seconds=seconds,
                          images_per_second=images / feature_seconds if feature_seconds else 0,
                          history=[{"epoch": 1, "valAccuracy": fitted.val_accuracy,
                                    "seconds": seconds}],
                          details={"linearProbe": probe.describe(fitted)})


@dataclass
class AutoOutcome:
    model: nn.Module  # the winner's
    result: TrainingResult
    strategy: str
    reason: str
    leaderboard: list[dict]
    race: dict


def auto_race(model: nn.Module, loaders: Loaders, spec: dict, run: Device, *, dataset,
              baseline_accuracy: float | None, checkpoints: Checkpoints, cache_dir: Path | None,
              metrics: TrainerMetrics, log=print, world: World = SINGLE) -> AutoOutcome:
    """strategy: Auto (race.py): the linear probe, then the fine-tune candidates by successive
    halving on the validation split, the finalist trained to its full length from its race
    state, and the better of finalist and probe returned. A restart after the race (a
    checkpoint that names the finalist) continues the finalist without racing again."""
    classes = dataset.classes
    probe_model = copy.deepcopy(model)
    probe_result = linear_probe(probe_model, loaders, spec, run, cache_dir=cache_dir,
                                classes=classes, metrics=metrics, reason="Auto race", log=log,
                                prefer_holdout=True)
    far = baseline_accuracy is not None and probe_result.best_val_accuracy <= baseline_accuracy
    candidates = race.fine_tune_candidates(
        stage_count=len(policy.model_stages(model).stages), train_images=len(dataset.train),
        far_from_pretraining=far)
    epochs = budget.planned_epochs(spec, len(loaders.train))
    plan = race.race_plan(len(candidates), epochs, steps_per_epoch=len(loaders.train))
    candidates = candidates[:plan.candidates]
    loaders_by_augmentation = {spec["augmentation"]: loaders}

    def trainee(candidate: race.Candidate) -> FineTuneRun:
        candidate_spec = candidate.spec(spec)
        augmentation = candidate_spec["augmentation"]
        if augmentation not in loaders_by_augmentation:
            loaders_by_augmentation[augmentation] = load_data(
                dataset, preprocessing=loaders.preprocessing, augmentation=augmentation,
                batch_size=spec["batchSize"], workers=spec["dataLoaderWorkers"], run=run,
                seed=spec["seed"], world=world)
        seed_everything(spec["seed"])  # each candidate starts from the same random state
        if candidate.strategy == "FromScratch":
            candidate_model = build_model(spec["model"], len(classes), load_weights=False)
        else:
            candidate_model = copy.deepcopy(model)
        return FineTuneRun(candidate_model, loaders_by_augmentation[augmentation],
                           candidate_spec, run, strategy=candidate.strategy, epochs=epochs,
                           world=world)

    def entry(candidate: race.Candidate, run_: FineTuneRun, outcome: str) -> dict:
        return race.leaderboard_entry(
            candidate.name, candidate.strategy, val_accuracy=run_.result.best_val_accuracy,
            epochs=run_.epochs_done, steps=run_.epochs_done * run_.steps_per_epoch,
            seconds=run_.result.train_seconds, settings=candidate.settings(spec), outcome=outcome)

    loaded = checkpoints.load_latest()
    stored = loaded.state.get("race") if loaded is not None else None
    stop_requested = stop_check(world)
    if stored is not None:
        finalist = next(c for c in candidates if c.name == stored["finalist"])
        alive, losers = [(finalist, trainee(finalist))], stored["losers"]
        log(f"race already run before a restart: continuing {finalist.name}")
    else:
        alive, losers = [(candidate, trainee(candidate)) for candidate in candidates], []
        metrics.start(backbone=spec["model"]["backbone"], strategy="Auto", reason="race",
                      planned_epochs=epochs, planned_steps=len(loaders.train) * (
                          plan.loser_epochs() + epochs))
        for rung, (rung_epochs, kept) in enumerate(plan.rungs, start=1):
            for candidate, run_ in alive:
                while run_.epochs_done < rung_epochs and not run_.stopped:
                    if stop_requested():
                        # The race keeps no checkpoints: the next run races again.
                        raise Preempted(f"race rung {rung}", None, fresh=False)
                    run_.train_epoch(metrics=metrics, log=log, label=f"[{candidate.name}] ")
            order = sorted(range(len(alive)), key=lambda i: -alive[i][1].result.best_val_accuracy)
            order = distributed.broadcast_value(world, order)
            alive = [alive[i] for i in order]
            losers += [entry(c, r, f"out after rung {rung}") for c, r in alive[kept:]]
            log(f"race rung {rung} ({rung_epochs} epochs): " + ", ".join(
                f"{c.name} {r.result.best_val_accuracy:.3f}" for c, r in alive))
            alive = alive[:kept]
    finalist, finalist_run = alive[0]
    finalist_run.train_at_least(race.finalist_min_epochs(
        sum(loser["epochs"] for loser in losers), epochs))
    result = fine_tune(finalist_run.model, finalist_run.loaders, finalist_run.spec, run,
                       strategy=finalist.strategy, reason=f"Auto race finalist {finalist.name}",
                       checkpoints=checkpoints, classes=classes, metrics=metrics, log=log,
                       world=world, trainee=finalist_run,
                       extra_state={"race": {"finalist": finalist.name, "losers": losers}})
    board = [race.leaderboard_entry("LinearProbe", "LinearProbe",
                                    val_accuracy=probe_result.best_val_accuracy, epochs=0, steps=0,
                                    seconds=probe_result.train_seconds,
                                    settings=probe_result.details["linearProbe"]),
             entry(finalist, finalist_run, "finalist, trained to completion"), *losers]
    if baseline_accuracy is not None:
        board.append(race.leaderboard_entry(
            "Baseline", "Baseline", val_accuracy=baseline_accuracy, epochs=0, steps=0,
            seconds=0.0, settings={"method": baseline_module.METHOD}, deployable=False))
    board = race.ranked(board)
    race_seconds = probe_result.train_seconds + sum(e["seconds"] for e in losers)
    cost_ratio = (race_seconds + result.train_seconds) / max(result.train_seconds, 1e-9)
    probe_won = probe_result.best_val_accuracy >= result.best_val_accuracy
    reason = race.race_reason(board, train_images=len(dataset.train),
                              val_images=len(dataset.val), cost_ratio=cost_ratio)
    summary = {"candidates": len(candidates) + 1, "plannedEpochs": epochs,
               "rungs": [{"epochs": e, "kept": k} for e, k in plan.rungs],
               "farFromPretraining": far, "finalist": finalist.name,
               "raceSeconds": race_seconds, "finalistSeconds": result.train_seconds,
               "costRatio": cost_ratio, "loserEpochs": sum(e["epochs"] for e in losers),
               "finalistMinEpochs": finalist_run.early_stopping.min_epochs}
    if probe_won:
        return AutoOutcome(probe_model, probe_result, "LinearProbe", reason, board, summary)
    return AutoOutcome(finalist_run.model, result, finalist.strategy, reason, board, summary)


def resolve_spec(manifest: dict, *, output_uri: str | None = None,
                 epochs: int | None = None) -> dict:
    """The validated spec with defaults, after command-line overrides."""
    document = copy.deepcopy(manifest)
    spec = document.get("spec", document) if isinstance(document, dict) else document
    if isinstance(spec, dict):
        if output_uri is not None:
            spec.setdefault("output", {})["uri"] = output_uri
        if epochs is not None:
            spec["epochs"] = epochs
    try:
        return validate_manifest(document)
    except SpecError as error:
        first_field, _, first_problem = error.problems[0].partition(": ")
        message = first_problem if len(error.problems) == 1 else "; ".join(error.problems)
        raise TrainerError(ExitCode.INVALID_SPEC, message, first_field) from error


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def scale_learning_rate(spec: dict, world: World) -> dict:
    """The spec with optimizer.learningRate scaled by optimizer.lrScaling for the global batch
    (batchSize per process times the world size); the report records both."""
    factor = distributed.lr_factor(spec["optimizer"].get("lrScaling", "None"), world.size)
    if factor == 1.0:
        return spec
    scaled = copy.deepcopy(spec)
    scaled["optimizer"]["learningRate"] = spec["optimizer"]["learningRate"] * factor
    return scaled


def main(manifest: dict, *, output_uri: str | None = None, epochs: int | None = None,
         cache_dir: Path | None = None, metrics: TrainerMetrics | None = None,
         log=print, world: World | None = None) -> dict[str, Any]:
    """Run one FineTuneJob manifest (or bare spec) to completion; returns the report. Under
    torchrun every rank runs this; only rank 0 logs and writes checkpoints and outputs."""
    started = time.perf_counter()
    world = world or distributed.world_from_env()
    if not world.is_main:
        def log(*_args):
            pass
    gpu = distributed.init_process_group(world)
    spec = resolve_spec(manifest, output_uri=output_uri, epochs=epochs)
    check_preflight(spec)
    preprocessing = resolve_preprocessing(spec["model"])
    spec["model"]["imageSize"] = preprocessing.input_size
    requested_lr = spec["optimizer"]["learningRate"]
    spec = scale_learning_rate(spec, world)
    metadata = manifest.get("metadata", {}) if "spec" in manifest else {}
    metrics = metrics or TrainerMetrics()
    identity = job_identity(metadata, spec)
    store = open_store(spec["dataset"].get("s3"))
    if world.is_main:
        check_output(store, spec["output"]["uri"], output_owner(metadata), log=log)
    seed_everything(spec["seed"])
    run = pick_device(spec["precision"], spec["channelsLast"])
    if gpu is not None:
        run.device = gpu
    cache_dir = Path(cache_dir) if cache_dir else None

    # One process per pod fills the pod's caches (dataset, downloaded weights); the others
    # then read them.
    if world.local_rank != 0:
        distributed.barrier(world)
    dataset = prepare_dataset(spec["dataset"], seed=spec["seed"],
                              cache_dir=cache_dir or Path.home() / ".cache" / "finetune",
                              store=store, image_size=preprocessing.input_size,
                              check_size=dataset_size_check(spec["model"]))
    data_seconds = time.perf_counter() - started
    strategy, reason = choose_strategy(spec["strategy"], weights=spec["model"]["weights"])
    log(f"{len(dataset.train)} training and {len(dataset.val)} validation images in "
        f"{len(dataset.classes)} classes; strategy {strategy} ({reason}); device "
        f"{run.device.type}, {'bf16' if run.autocast_dtype else 'fp32'}")
    model = build_model(spec["model"], len(dataset.classes), store=store,
                        load_weights=strategy != "FromScratch")
    if world.local_rank == 0:
        distributed.barrier(world)

    baseline_result = None
    if spec["baseline"]["enabled"] and world.is_main:
        baseline_result = baseline_module.pixel_baseline(dataset.train, dataset.val,
                                                         seed=spec["seed"])
        metrics.baseline_accuracy.set(baseline_result.accuracy)
        log(f"baseline ({baseline_result.method}): val accuracy {baseline_result.accuracy:.4f}")

    loaders = load_data(dataset, preprocessing=preprocessing, augmentation=spec["augmentation"],
                        batch_size=spec["batchSize"], workers=spec["dataLoaderWorkers"], run=run,
                        seed=spec["seed"], world=world)
    checkpoints = Checkpoints(store, checkpoint_uri(spec), identity,
                              keep=spec["checkpoint"]["keep"], log=log)
    race_report = {}
    if strategy == "Auto":
        outcome = auto_race(model, loaders, spec, run, dataset=dataset,
                            baseline_accuracy=distributed.broadcast_value(
                                world, baseline_result.accuracy if baseline_result else None),
                            checkpoints=checkpoints, cache_dir=cache_dir, metrics=metrics,
                            log=log, world=world)
        model, result, strategy, reason = (outcome.model, outcome.result, outcome.strategy,
                                           outcome.reason)
        race_report = {"leaderboard": outcome.leaderboard, "race": outcome.race}
        log(reason)
    elif strategy == "LinearProbe":
        result = linear_probe(model, loaders, spec, run, cache_dir=cache_dir,
                              classes=dataset.classes, metrics=metrics, reason=reason, log=log)
    else:
        result = fine_tune(model, loaders, spec, run, strategy=strategy, reason=reason,
                           checkpoints=checkpoints, classes=dataset.classes, metrics=metrics,
                           log=log, world=world)
    metrics.finished()

    report = {
        "status": "Running", "job": identity, "backbone": spec["model"]["backbone"],
        "library": spec["model"]["library"], "weights": spec["model"]["weights"],
        "imageSize": preprocessing.input_size, "preprocessing": preprocessing.describe(),
        "strategy": strategy, "strategyReason": reason, **race_report,
        "seed": spec["seed"], "device": run.device.type,
        "precision": "bf16" if run.autocast_dtype else "fp32",
        "dataset": {"uri": spec["dataset"]["uri"], "classes": dataset.classes,
                    "trainImages": len(dataset.train), "valImages": len(dataset.val),
                    "skippedImages": len(dataset.skipped),
                    "skipped": [list(item) for item in dataset.skipped[:20]]},
        "epochs": {"planned": result.planned_epochs, "completed": len(result.history)},
        "resumedFromEpoch": result.resumed_from_epoch,
        "resumedFrom": ({"epoch": result.resumed_from_epoch, "step": result.resumed_from_step}
                        if result.resumed_from_epoch is not None else None),
        "optimizerSteps": result.optimizer_steps, "stoppedEarly": result.stopped_early,
        "lastCheckpoint": ({key: result.last_checkpoint[key]
                            for key in ("uri", "epoch", "step", "time")}
                           if result.last_checkpoint else None),
        "history": result.history, "valAccuracy": result.final.accuracy,
        "bestValAccuracy": result.best_val_accuracy, "bestEpoch": result.best_epoch,
        **classification_summary(result.final.targets, result.final.predictions, dataset.classes),
        "baseline": ({"enabled": True, "accuracy": baseline_result.accuracy,
                      "method": baseline_result.method, "seconds": baseline_result.seconds}
                     if baseline_result else {"enabled": False}),
        "transferBeatBaseline": (result.final.accuracy > baseline_result.accuracy
                                 if baseline_result else None),
        "imagesPerSecond": result.images_per_second,
        "distributed": {"worldSize": world.size, "batchSizePerProcess": spec["batchSize"],
                        "globalBatchSize": spec["batchSize"] * world.size,
                        "lrScaling": spec["optimizer"].get("lrScaling", "None"),
                        "requestedLearningRate": requested_lr,
                        "learningRate": spec["optimizer"]["learningRate"],
                        "backend": (distributed.backend() if world.launched else None)},
        **result.details,
    }
    report["timings"] = {"dataSeconds": data_seconds, "trainSeconds": result.train_seconds,
                         "totalSeconds": time.perf_counter() - started}
    if not world.is_main:
        return report
    write_outputs(store, spec["output"]["uri"], model, classes=dataset.classes,
                  preprocessing=preprocessing, report=report, log=log)
    log(f"val accuracy {result.final.accuracy:.4f} (best {result.best_val_accuracy:.4f}"
        + (f", baseline {baseline_result.accuracy:.4f}" if baseline_result else "")
        + f"); model {report['outputs']['modelUri']}; report {report['outputs']['reportUri']}")
    return report
