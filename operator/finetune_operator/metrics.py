"""The operator's own Prometheus metrics. The names are module constants: alert rules and the
dashboard (monitoring/) refer to them."""

from __future__ import annotations

from collections import Counter as Tally
from typing import Callable, Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from finetune_api.schema import PHASES

JOBS = "finetune_operator_jobs"  # gauge, label phase: FineTuneJobs by phase
RECONCILIATIONS = "finetune_operator_reconciliations_total"  # label result: success|retry|error
RECONCILE_ERRORS = "finetune_operator_reconcile_errors_total"  # label reason
RECONCILE_DURATION = "finetune_operator_reconcile_duration_seconds"  # histogram
JOB_CREATION_LATENCY = "finetune_operator_job_creation_latency_seconds"  # FineTuneJob -> Job
TIME_TO_RUNNING = "finetune_operator_time_to_running_seconds"  # FineTuneJob -> trainer running
PROGRESS_READS = "finetune_operator_progress_reads_total"  # label result: success|error
LEADER = "finetune_operator_leader"  # 1 on the replica that holds the Lease

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

reconciliations = Counter(RECONCILIATIONS, "FineTuneJob reconciliations by result.", ["result"])
reconcile_errors = Counter(RECONCILE_ERRORS, "Failed reconciliations by reason.", ["reason"])
reconcile_duration = Histogram(RECONCILE_DURATION, "Time spent in one reconciliation.",
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
job_creation_latency = Histogram(JOB_CREATION_LATENCY, "From FineTuneJob creation to its trainer "
                                 "Job being created.", buckets=LATENCY_BUCKETS)
time_to_running = Histogram(TIME_TO_RUNNING, "From FineTuneJob creation to its trainer running.",
                            buckets=LATENCY_BUCKETS)
progress_reads = Counter(PROGRESS_READS, "Reads of trainer /metrics endpoints by result.",
                         ["result"])
leader = Gauge(LEADER, "1 when this replica holds the leader Lease and acts.")


class JobsByPhase:
    """Counts phases at scrape time from the operator's view of its FineTuneJobs, so the gauge
    can never drift from what the watches saw."""

    def __init__(self, phases: Callable[[], Iterable[str]]):
        self._phases = phases

    def collect(self):
        family = GaugeMetricFamily(JOBS, "FineTuneJobs by phase.", labels=["phase"])
        counts = Tally(phase or "Pending" for phase in self._phases())
        for phase in PHASES:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


def serve(addr: str, port: int, phases: Callable[[], Iterable[str]]) -> None:
    REGISTRY.register(JobsByPhase(phases))
    start_http_server(port, addr=addr)
