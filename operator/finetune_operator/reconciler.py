"""Reconciliation: makes the children a FineTuneJob needs exist and writes its status.

Every write for one FineTuneJob happens under that job's lock and starts from a fresh read of it,
so the kopf handlers, the progress poller and the TTL sweeper never overwrite each other's
conditions. The decisions themselves are in the pure modules `builders`, `status`, `progress`.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

from kubernetes.client.rest import ApiException

from finetune_api import contract, tenancy
from finetune_api.validation import SpecError, validate_spec

from finetune_operator import builders, metrics
from finetune_operator.config import OperatorConfig
from finetune_operator.kube import Kube, NotOurs
from finetune_operator.progress import progress_patch
from finetune_operator.status import (FAILED, RUNNING, TERMINAL_PHASES, StatusUpdate,
                                      derive_status, parse_time, set_condition,
                                      spec_applied_conditions, timestamp, validity_conditions)
from finetune_operator.view import ClusterView

Manifest = dict[str, Any]
log = logging.getLogger(__name__)


class RetryLater(Exception):
    """Not yet possible (a leftover child still being deleted, an API hiccup): try again."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube, view: ClusterView):
        self.config = config
        self.kube = kube
        self.view = view
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._failed_refreshes: set[tuple[str, str]] = set()

    @contextmanager
    def _locked(self, namespace: str, name: str) -> Iterator[None]:
        with self._locks_guard:
            lock = self._locks.setdefault((namespace, name), threading.Lock())
        with lock:
            yield

    def forget(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._locks.pop((namespace, name), None)
        self.view.forget(namespace, name)

    def _current(self, namespace: str, name: str, uid: str) -> Manifest | None:
        """The FineTuneJob as it is now, or None when it is gone, replaced or being deleted."""
        finetunejob = self.kube.get_finetunejob(namespace, name)
        if finetunejob is None or finetunejob["metadata"]["uid"] != uid:
            return None
        if finetunejob["metadata"].get("deletionTimestamp"):
            return None
        return finetunejob

    # create / resume / spec update
    def reconcile(self, body: Manifest) -> None:
        started = time.monotonic()
        meta = body["metadata"]
        try:
            with self._locked(meta["namespace"], meta["name"]):
                self._reconcile(meta["namespace"], meta["name"], meta["uid"])
        except RetryLater as error:
            metrics.reconciliations.labels("retry").inc()
            metrics.reconcile_errors.labels(type(error.__cause__ or error).__name__).inc()
            raise
        except ApiException as error:
            metrics.reconciliations.labels("error").inc()
            metrics.reconcile_errors.labels(f"Api{error.status}").inc()
            raise RetryLater(f"API error {error.status}: {error.reason}") from error
        except Exception as error:
            metrics.reconciliations.labels("error").inc()
            metrics.reconcile_errors.labels(type(error).__name__).inc()
            raise
        else:
            metrics.reconciliations.labels("success").inc()
        finally:
            metrics.reconcile_duration.observe(time.monotonic() - started)

    def _reconcile(self, namespace: str, name: str, uid: str) -> None:
        finetunejob = self._current(namespace, name, uid)
        if finetunejob is None:
            return
        status = finetunejob.get("status") or {}
        if status.get("phase") in TERMINAL_PHASES:
            return  # finished is final: never re-create a Job (e.g. after a TTL or a restart)
        now = _now()

        try:
            validate_spec(finetunejob.get("spec"))
        except SpecError as error:
            self._fail_invalid(finetunejob, error.problems, now)
            return
        conditions = validity_conditions(finetunejob, [], now)
        if not status.get("jobName"):  # before anything is created for it
            forbidden = tenancy.violations(finetunejob["spec"], self.config.tenancy)
            if forbidden:
                self._fail(finetunejob, "PolicyViolation", "; ".join(forbidden), now, conditions)
                return

        try:
            configmap, _ = self.kube.create_or_adopt(builders.build_spec_configmap(finetunejob),
                                                     uid)
            service = builders.build_rendezvous_service(finetunejob)
            if service is not None:
                self.kube.create_or_adopt(service, uid)
            # Before the Job: its pods never run unprotected where a CNI enforces them.
            for policy in builders.build_network_policies(finetunejob, self.config):
                self.kube.create_or_adopt(policy, uid)
            job = self.kube.get_job(namespace, builders.trainer_job_name(name))
            if job is not None and not builders.is_owned_by(job, uid):
                raise NotOurs(job)
            if job is None and not status.get("jobName"):
                job, created = self.kube.create_or_adopt(
                    builders.build_trainer_job(finetunejob, self.config), uid)
                if created:
                    created_at = parse_time(finetunejob["metadata"].get("creationTimestamp"))
                    if created_at:
                        metrics.job_creation_latency.observe(
                            max(0.0, (_now() - created_at).total_seconds()))
                    log.info("created Job %s/%s", namespace, job["metadata"]["name"])
        except NotOurs as conflict:
            if conflict.being_replaced:
                raise RetryLater(f"waiting for the previous {conflict}", delay=3) from conflict
            self._fail(finetunejob, "NameConflict", str(conflict), now)
            return

        if job is not None:
            job_patch = builders.job_spec_patch(finetunejob["spec"], job)
            if job_patch:
                job = self.kube.patch_job(namespace, job["metadata"]["name"], job_patch)
                log.info("patched Job %s/%s: %s", namespace, job["metadata"]["name"], job_patch)

        unapplied = builders.unapplied_spec_changes(finetunejob["spec"],
                                                    builders.applied_spec(configmap))
        with_conditions = {**finetunejob, "status": {**status, "conditions": conditions}}
        if unapplied or any(c.get("type") == "SpecApplied" for c in conditions):
            conditions = spec_applied_conditions(with_conditions, unapplied, now)
            with_conditions["status"]["conditions"] = conditions
        if unapplied:
            self.kube.post_event(finetunejob, "Warning", "ChangeNotApplied",
                                 conditions_message(conditions, "SpecApplied"))

        pods = self.view.pods(job) if job is not None else []
        update = derive_status(with_conditions, job, pods, now,
                               self.view.attempts(job) if job is not None else 0,
                               config=self.config,
                               disrupted=self.view.disruptions(job) if job is not None else [])
        update.patch.setdefault("conditions", conditions)
        update.patch["observedGeneration"] = finetunejob["metadata"].get("generation")
        self._apply(finetunejob, update)

    def _fail_invalid(self, finetunejob: Manifest, problems: list[str], now: datetime) -> None:
        conditions = validity_conditions(finetunejob, problems, now)
        self._fail(finetunejob, "InvalidSpec", "; ".join(problems), now, conditions)

    def _fail(self, finetunejob: Manifest, reason: str, message: str, now: datetime,
              conditions: list[dict[str, Any]] | None = None) -> None:
        generation = finetunejob["metadata"].get("generation")
        conditions = conditions or list((finetunejob.get("status") or {}).get("conditions") or [])
        conditions = set_condition(conditions, "Running", False, reason, message, generation, now)
        conditions = set_condition(conditions, FAILED, True, reason, message, generation, now)
        old_phase = (finetunejob.get("status") or {}).get("phase")
        update = StatusUpdate(
            {"phase": FAILED, "conditions": conditions, "observedGeneration": generation,
             "completionTime": timestamp(now), "failure": {"reason": reason, "message": message}},
            old_phase, FAILED, event=("Warning", FAILED, f"{reason}: {message}"))
        self._apply(finetunejob, update)

    # Job / pod observed
    def refresh(self, namespace: str, name: str) -> None:
        with self._locked(namespace, name):
            finetunejob = self.kube.get_finetunejob(namespace, name)
            if finetunejob is None or finetunejob["metadata"].get("deletionTimestamp"):
                return
            uid = finetunejob["metadata"]["uid"]
            status = finetunejob.get("status") or {}
            job = self.view.job(namespace, name, uid)
            if job is None and not status.get("jobName"):
                return  # not created yet: the create handler will
            if job is None and self.kube.get_job(namespace, status["jobName"]) is not None:
                return  # the watch has not delivered it yet
            pods = self.view.pods(job) if job is not None else []
            self._apply(finetunejob, derive_status(
                finetunejob, job, pods, _now(), self.view.attempts(job) if job is not None else 0,
                self.view.preemptions(job) if job is not None else [], self.config,
                self.view.disruptions(job) if job is not None else []))

    def refresh_or_defer(self, namespace: str, name: str) -> None:
        """For watch events, which kopf does not retry: a failed refresh is queued for the
        retry loop instead of being lost."""
        try:
            self.refresh(namespace, name)
        except Exception as error:
            metrics.reconcile_errors.labels(type(error).__name__).inc()
            log.warning("status refresh of %s/%s failed, will retry: %s", namespace, name, error)
            self.mark_refresh_failed(namespace, name)

    def mark_refresh_failed(self, namespace: str, name: str) -> None:
        with self._locks_guard:
            self._failed_refreshes.add((namespace, name))

    def take_failed_refreshes(self) -> list[tuple[str, str]]:
        with self._locks_guard:
            failed, self._failed_refreshes = list(self._failed_refreshes), set()
        return failed

    def _apply(self, finetunejob: Manifest, update: StatusUpdate) -> None:
        meta = finetunejob["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if update.stop_job:
            # Before the status says Failed: a failed job is final and never looked at again, so
            # a stop that did not happen would leave its pods running.
            self._stop_job(finetunejob)
        if update.patch:
            self.kube.patch_finetunejob_status(namespace, name, update.patch)
            self.view.put_finetunejob({**finetunejob, "status": {
                **(finetunejob.get("status") or {}), **update.patch}})
        if update.transitioned:
            log.info("%s/%s: %s -> %s", namespace, name, update.old_phase, update.new_phase)
            if update.new_phase == RUNNING and not (finetunejob.get("status") or {}).get(
                    "startTime"):
                created_at = parse_time(meta.get("creationTimestamp"))
                if created_at:
                    metrics.time_to_running.observe(max(0.0, (_now() - created_at).total_seconds()))
        if update.event:
            self.kube.post_event(finetunejob, *update.event)
        for notice in update.notices:
            self.kube.post_event(finetunejob, *notice)
        if "lastCheckpoint" in update.patch:
            self._annotate_checkpoint(finetunejob, update.patch["lastCheckpoint"])

    def _stop_job(self, finetunejob: Manifest) -> None:
        """Suspend the trainer Job of a failed job: Kubernetes deletes its pods (which would
        retry a bad image, a missing Secret or an eviction forever, holding a GPU); the Job, the
        failed pods and the checkpoints stay for inspection."""
        meta = finetunejob["metadata"]
        job_name = (finetunejob.get("status") or {}).get("jobName") or \
            builders.trainer_job_name(meta["name"])
        try:
            self.kube.patch_job(meta["namespace"], job_name, {"spec": {"suspend": True}})
        except ApiException as error:
            if error.status != 404:
                raise

    # Progress and TTL
    def record_progress(self, namespace: str, name: str, samples: dict[str, Any]) -> None:
        with self._locked(namespace, name):
            finetunejob = self.kube.get_finetunejob(namespace, name)
            if finetunejob is None or (finetunejob.get("status") or {}).get("phase") != RUNNING:
                return
            patch = progress_patch(samples, finetunejob.get("spec") or {},
                                   finetunejob.get("status") or {}, _now())
            self.kube.patch_finetunejob_status(namespace, name, patch)
            if "lastCheckpoint" in patch:
                self._annotate_checkpoint(finetunejob, patch["lastCheckpoint"])

    def _annotate_checkpoint(self, finetunejob: Manifest, checkpoint: dict[str, Any]) -> None:
        """The latest checkpoint's time on the trainer Job too, where a queueing system (or a
        person choosing what to preempt) looks: the job that checkpointed last loses least."""
        meta = finetunejob["metadata"]
        job_name = (finetunejob.get("status") or {}).get("jobName") or \
            builders.trainer_job_name(meta["name"])
        try:
            self.kube.patch_job(meta["namespace"], job_name, {"metadata": {"annotations": {
                contract.ANNOTATION_LAST_CHECKPOINT_TIME: checkpoint["time"]}}})
        except ApiException as error:
            if error.status != 404:
                raise

    def expire(self, finetunejob: Manifest) -> None:
        meta = finetunejob["metadata"]
        log.info("deleting %s/%s: ttlSecondsAfterFinished has passed", meta["namespace"],
                 meta["name"])
        self.kube.delete_finetunejob(meta["namespace"], meta["name"], meta["uid"])


def conditions_message(conditions: list[dict[str, Any]], type_: str) -> str:
    return next((c.get("message", "") for c in conditions if c.get("type") == type_), "")
