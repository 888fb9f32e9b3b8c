"""End-of-job metrics through a Pushgateway, for jobs shorter than a scrape interval.

Off unless FINETUNE_PUSHGATEWAY_URL is set (the operator passes its own setting to trainer
pods). One group per FineTuneJob:

    /metrics/job/finetune-trainer/namespace/<namespace>/finetunejob/<name>

so Prometheus (scraping the gateway with honor_labels) sees the final values with the same
`namespace` and `finetunejob` labels as the live scrape, under job="finetune-trainer". A run
deletes its job's group when it starts, so a re-run (or a retried pod) never shows the previous
run's final values as its own; the last run's group stays until the job is re-run or the group is
deleted (`curl -X DELETE <gateway>/metrics/job/finetune-trainer/namespace/NS/finetunejob/NAME`):
the Pushgateway has no TTL.
"""

from __future__ import annotations

import os
import time

import prometheus_client
from prometheus_client import CollectorRegistry, Gauge

from finetune_api import contract

JOB = "finetune-trainer"


def grouping_key(manifest: dict) -> dict[str, str]:
    metadata = manifest.get("metadata") or {}
    return {"namespace": metadata.get("namespace") or "default",
            "finetunejob": metadata.get("name") or "finetune"}


class PushedRun:
    """begin() at start (clears the job's stale group), push() at exit (the final values, the
    run's duration and whether it succeeded). Both do nothing when no gateway is configured, and
    a gateway that cannot be reached costs a log line, never the run."""

    def __init__(self, url: str | None, manifest: dict, log=print):
        self.url, self.key, self.log = url or None, grouping_key(manifest), log
        self.started = time.monotonic()

    @classmethod
    def begin(cls, manifest: dict, log=print) -> "PushedRun":
        run = cls(os.environ.get(contract.ENV_PUSHGATEWAY_URL), manifest, log)
        if run.url:
            run._call(prometheus_client.delete_from_gateway, run.url, job=JOB,
                      grouping_key=run.key)
        return run

    def push(self, registry, *, exit_code: int) -> None:
        """registry: what the trainer serves (TrainerMetrics' registry)."""
        if not self.url:
            return
        final = CollectorRegistry()
        Gauge(contract.METRIC_DURATION, "Seconds the run took, start to exit.",
              registry=final).set(time.monotonic() - self.started)
        Gauge(contract.METRIC_EXIT_CODE, "The trainer's exit code (0: succeeded).",
              registry=final).set(exit_code)
        final.register(_Collected(registry))
        self._call(prometheus_client.push_to_gateway, self.url, job=JOB, registry=final,
                   grouping_key=self.key)

    def _call(self, function, *args, **kwargs) -> None:
        try:
            function(*args, timeout=10, **kwargs)
        except OSError as error:
            self.log(f"pushgateway {self.url}: {function.__name__} failed: {error}")


class _Collected:
    """Another registry's metrics inside this one."""

    def __init__(self, registry):
        self.registry = registry

    def collect(self):
        return self.registry.collect()
