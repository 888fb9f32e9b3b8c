"""Live training metrics for Prometheus, on a dedicated registry served by the trainer while it
runs. Names come from finetune_api.contract; the FineTuneJob's name and namespace are added by the
scrape as target labels."""

from __future__ import annotations

from datetime import datetime

import prometheus_client
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from finetune_api import contract


def _name(metric: str) -> str:
    # prometheus_client appends _total to counters itself.
    return metric.removesuffix("_total")


class _RankLabelled:
    """A registry view that adds rank="<n>" to every sample: each process of a data-parallel
    group serves its own /metrics, and a scrape of one pod must tell its ranks apart."""

    def __init__(self, registry: CollectorRegistry, rank: int):
        self.registry, self.rank = registry, str(rank)

    def collect(self):
        for family in self.registry.collect():
            family.samples = [sample._replace(labels={**sample.labels, "rank": self.rank})
                              for sample in family.samples]
            yield family


class TrainerMetrics:
    def __init__(self, rank: int | None = None):
        """rank: set in a distributed run (also rank 0), None when the trainer runs alone."""
        self.registry = CollectorRegistry()
        self.exported = self.registry if rank is None else _RankLabelled(self.registry, rank)
        r = self.registry
        self.epoch = Gauge(contract.METRIC_EPOCH, "Epochs completed.", registry=r)
        self.planned_epochs = Gauge(contract.METRIC_PLANNED_EPOCHS, "Epochs planned.", registry=r)
        self.steps = Counter(_name(contract.METRIC_STEPS), "Optimizer steps completed.", registry=r)
        self.planned_steps = Gauge(contract.METRIC_PLANNED_STEPS, "Optimizer steps planned.",
                                   registry=r)
        self.train_loss = Gauge(contract.METRIC_TRAIN_LOSS, "Mean training loss of the last "
                                "epoch.", registry=r)
        self.val_accuracy = Gauge(contract.METRIC_VAL_ACCURACY, "Validation accuracy (0..1) of "
                                  "the last epoch.", registry=r)
        self.best_val_accuracy = Gauge(contract.METRIC_BEST_VAL_ACCURACY, "Best validation "
                                       "accuracy (0..1) so far.", registry=r)
        self.baseline_accuracy = Gauge(contract.METRIC_BASELINE_ACCURACY, "Validation accuracy "
                                       "of the non-deep baseline.", registry=r)
        self.learning_rate = Gauge(contract.METRIC_LEARNING_RATE, "Current learning rate.",
                                   ["group"], registry=r)
        self.images_per_second = Gauge(contract.METRIC_IMAGES_PER_SECOND, "Training images per "
                                       "second over the last epoch.", registry=r)
        self.data_wait = Counter(_name(contract.METRIC_DATA_WAIT), "Seconds the training loop "
                                 "waited for data.", registry=r)
        self.eta = Gauge(contract.METRIC_ETA, "Estimated seconds until training ends.", registry=r)
        self.checkpoint_epoch = Gauge(contract.METRIC_CHECKPOINT_EPOCH, "Epochs in the latest "
                                      "checkpoint.", registry=r)
        self.checkpoint_step = Gauge(contract.METRIC_CHECKPOINT_STEP, "Optimizer steps into the "
                                     "next epoch in the latest checkpoint.", registry=r)
        self.checkpoint_time = Gauge(contract.METRIC_CHECKPOINT_TIME, "When the latest "
                                     "checkpoint was complete (Unix time).", registry=r)
        self.gpu_memory = Gauge(contract.METRIC_GPU_MEMORY, "Peak GPU memory allocated by the "
                                "trainer.", registry=r)
        self.info = Gauge(contract.METRIC_INFO, "Constant 1; labels describe the run.",
                          ["backbone", "strategy", "reason"], registry=r)
        self._step_seconds: list[float] = []
        self._steps_done = 0
        self._planned_steps = 0

    def serve(self, address: str, port: int):
        """Start the /metrics HTTP server in a thread; returns (server, thread)."""
        return prometheus_client.start_http_server(port, addr=address, registry=self.exported)

    def start(self, *, backbone: str, strategy: str, reason: str, planned_epochs: int,
              planned_steps: int, steps_done: int = 0, epochs_done: int = 0) -> None:
        self.info.labels(backbone=backbone, strategy=strategy, reason=reason).set(1)
        self.planned_epochs.set(planned_epochs)
        self.planned_steps.set(planned_steps)
        self.epoch.set(epochs_done)
        if steps_done:
            self.steps.inc(steps_done)
        self._steps_done, self._planned_steps = steps_done, planned_steps

    def step_done(self, *, seconds: float, data_wait_seconds: float,
                  learning_rates: dict[str, float]) -> None:
        self.steps.inc()
        self.data_wait.inc(data_wait_seconds)
        self._steps_done += 1
        self._step_seconds = (self._step_seconds + [seconds])[-50:]
        average = sum(self._step_seconds) / len(self._step_seconds)
        self.eta.set(max(0, self._planned_steps - self._steps_done) * average)
        for group, lr in learning_rates.items():
            self.learning_rate.labels(group=group).set(lr)
        if torch.cuda.is_available():
            self.gpu_memory.set(torch.cuda.max_memory_allocated())

    def epoch_done(self, *, epoch: int, train_loss: float, val_accuracy: float,
                   best_val_accuracy: float, images_per_second: float) -> None:
        self.epoch.set(epoch)
        self.train_loss.set(train_loss)
        self.val_accuracy.set(val_accuracy)
        self.best_val_accuracy.set(best_val_accuracy)
        self.images_per_second.set(images_per_second)

    def checkpoint_saved(self, entry: dict) -> None:
        """`entry`: checkpoint.Checkpoints.save's pointer entry."""
        self.checkpoint_epoch.set(entry["epoch"])
        self.checkpoint_step.set(entry.get("step", 0))
        self.checkpoint_time.set(datetime.fromisoformat(entry["time"]).timestamp())

    def finished(self) -> None:
        self.eta.set(0)

    def push(self, gateway_url: str, job: str) -> None:
        """One push of the final values (FINETUNE_PUSHGATEWAY_URL), for scrapes that would miss a
        short job."""
        prometheus_client.push_to_gateway(gateway_url, job=job, registry=self.exported)
