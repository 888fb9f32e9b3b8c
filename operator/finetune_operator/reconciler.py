"""Reconciliation, level-triggered: `sync(namespace, name)` looks at what is observed now (the
FineTuneJob, its trainer Job, the Job's pods, the trainer's latest progress reading, all from
the ClusterView), makes the children that should exist, and writes the status in one patch when
it changed. It is the only writer of status.

It runs in the operator's bounded pool of reconcile workers, one key at a time (WorkQueue), so
no two workers ever act on one FineTuneJob. Reads come from the view, not the API: a create
costs the API the children it creates and one status patch. The decisions themselves are in the
pure modules `builders`, `status`, `progress`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

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

# API answers to a create that no retry will change: the child as built is invalid (400, 422) or
# the operator may not create it (403). The job fails, with the API's message naming the field.
PERMANENT_CREATE_ERRORS = (400, 403, 422)
# How often a Job whose pods the Job controller could not create is looked at again, and how
# old a FailedCreate Event may be to still count.
FAILED_CREATE_POLL_SECONDS = 5
FAILED_CREATE_MAX_AGE_SECONDS = 600
# A Job younger than this has not had its pods created yet, whatever the reason.
POD_CREATION_GRACE_SECONDS = 2
TRAINER_POLICY_RECHECK_SECONDS = 300


class RetryLater(Exception):
    """Not yet possible (a leftover child still being deleted, an API hiccup): try again."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


def _now() -> datetime:
    return datetime.now(timezone.utc)


def spec_problems(spec: Any) -> list[str]:
    try:
        validate_spec(spec)
    except SpecError as error:
        return error.problems
    return []


def api_message(error: ApiException) -> str:
    """The API server's own message (it names the invalid field), else the HTTP reason."""
    try:
        return json.loads(error.body or "{}").get("message") or str(error.reason)
    except (ValueError, AttributeError):
        return str(error.reason)


# 403s that clear by themselves: a quota other jobs use up, or one the quota controller has not
# counted yet; the OwnerReferencesPermissionEnforcement admission plugin before the API server's
# resource mapping knows a CRD installed moments ago (it refreshes every 30 s): the operator's
# first Job after installing the chart and the CRD together.
TRANSIENT_FORBIDDEN = ("exceeded quota", "status unknown for quota", "cannot find RESTMapping")


def is_permanent(error: ApiException) -> bool:
    if error.status not in PERMANENT_CREATE_ERRORS:
        return False
    message = api_message(error)
    return error.status != 403 or not any(part in message for part in TRANSIENT_FORBIDDEN)


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube, view: ClusterView,
                 creations_waiting: Callable[[], bool] = lambda: False):
        self.config = config
        self.kube = kube
        self.view = view
        # Other FineTuneJobs wait for their trainer Jobs (WorkQueue.creations_waiting).
        self.creations_waiting = creations_waiting
        # namespace -> when its trainer NetworkPolicy was last seen as built (monotonic), and a
        # lock per namespace: in a burst, one worker makes it while the others wait for it.
        self._trainer_policies: dict[str, float] = {}
        self._policy_locks: dict[str, threading.Lock] = {}
        self._policy_locks_lock = threading.Lock()

    def sync(self, namespace: str, name: str) -> float | None:
        """Reconcile one FineTuneJob; returns in how many seconds it must be looked at again
        without any watch event (a deadline, a Job waiting for its pods), or None."""
        started = time.monotonic()
        try:
            requeue = self._sync(namespace, name)
        except RetryLater as error:
            metrics.reconciliations.labels("retry").inc()
            metrics.reconcile_errors.labels(type(error.__cause__ or error).__name__).inc()
            log.info("%s/%s: %s", namespace, name, error)
            return error.delay
        except ApiException as error:
            metrics.reconciliations.labels("error").inc()
            metrics.reconcile_errors.labels(f"Api{error.status}").inc()
            raise
        except Exception as error:
            metrics.reconciliations.labels("error").inc()
            metrics.reconcile_errors.labels(type(error).__name__).inc()
            raise
        else:
            metrics.reconciliations.labels("success").inc()
            return requeue
        finally:
            metrics.reconcile_duration.observe(time.monotonic() - started)

    def _sync(self, namespace: str, name: str) -> float | None:
        finetunejob = self.view.finetunejob(namespace, name)
        if finetunejob is None or finetunejob["metadata"].get("deletionTimestamp"):
            return None
        status = finetunejob.get("status") or {}
        now = _now()
        if status.get("phase") in TERMINAL_PHASES:
            # Finished is final: never re-create a Job (e.g. after a TTL or a restart); later
            # observations only fill in details.
            return self._observe(finetunejob, now)

        problems = self.view.spec_problems(finetunejob, spec_problems)
        if problems:
            self._fail(finetunejob, "InvalidSpec", "; ".join(problems), now,
                       validity_conditions(finetunejob, list(problems), now))
            return None
        conditions = validity_conditions(finetunejob, [], now)
        finetunejob = {**finetunejob, "status": {**status, "conditions": conditions}}

        job = self._job(finetunejob)
        if job is None and not status.get("jobName"):
            forbidden = tenancy.violations(finetunejob["spec"], self.config.tenancy)
            if forbidden:
                self._fail(finetunejob, "PolicyViolation", "; ".join(forbidden), now, conditions)
                return None
            try:
                job = self._create_children(finetunejob)
            except NotOurs as conflict:
                if conflict.being_replaced:
                    raise RetryLater(f"waiting for the previous {conflict}", delay=3) from conflict
                self._fail(finetunejob, "NameConflict", str(conflict), now, conditions)
                return None
            except ApiException as error:
                if not is_permanent(error):
                    raise
                kind = getattr(error, "kind", "child")
                reason = "Forbidden" if error.status == 403 else f"{kind}Rejected"
                self._fail(finetunejob, reason, f"the API server refused the trainer's {kind}: "
                                                f"{api_message(error)}", now, conditions)
                return None
            if self.creations_waiting():
                # A burst: the Jobs of the FineTuneJobs queued behind this one come before this
                # status; it is written when they are made (the key is queued again at once,
                # behind them).
                return 0.0

        if job is not None:
            job_patch = builders.job_spec_patch(finetunejob["spec"], job)
            if job_patch:
                job = self.kube.patch_job(namespace, job["metadata"]["name"], job_patch)
                self.view.put_job(job)
                log.info("patched Job %s/%s: %s", namespace, job["metadata"]["name"], job_patch)
            unapplied = self.view.unapplied_changes(job, finetunejob)
            if unapplied or any(c.get("type") == "SpecApplied" for c in conditions):
                finetunejob["status"]["conditions"] = spec_applied_conditions(
                    finetunejob, unapplied, now)
        return self._observe(finetunejob, now, job, written=status)

    def _job(self, finetunejob: Manifest) -> Manifest | None:
        meta = finetunejob["metadata"]
        job = self.view.job(meta["namespace"], meta["name"], meta["uid"])
        job_name = (finetunejob.get("status") or {}).get("jobName")
        if job is None and job_name:
            # Known by status but not (yet) by the Job watch, e.g. just after a restart: ask.
            job = self.kube.get_job(meta["namespace"], job_name)
            if job is not None and builders.is_owned_by(job, meta["uid"]):
                self.view.put_job(job)
            else:
                job = None
        return job

    def _ensure_trainer_policy(self, namespace: str) -> None:
        """The namespace's trainer NetworkPolicy exists as built; asked of the API at most once
        per TRAINER_POLICY_RECHECK_SECONDS (it is changed by hand, or the operator's
        configuration changed, rarely; a Job is created often)."""
        policy = builders.build_trainer_network_policy(namespace, self.config)
        if policy is None:
            return
        with self._policy_locks_lock:
            lock = self._policy_locks.setdefault(namespace, threading.Lock())
        with lock:
            checked = self._trainer_policies.get(namespace)
            if checked is not None and \
                    time.monotonic() - checked < TRAINER_POLICY_RECHECK_SECONDS:
                return
            try:
                if self.kube.ensure_network_policy(policy):
                    log.info("wrote NetworkPolicy %s/%s", namespace, policy["metadata"]["name"])
            except ApiException as error:
                error.kind = "NetworkPolicy"  # for the failure's message
                raise
            self._trainer_policies[namespace] = time.monotonic()

    def _create_children(self, finetunejob: Manifest) -> Manifest:
        meta = finetunejob["metadata"]
        # Before the Job: its pods never run unprotected where a CNI enforces the policies.
        self._ensure_trainer_policy(meta["namespace"])
        children = [builders.build_rendezvous_service(finetunejob),
                    builders.build_peers_network_policy(finetunejob, self.config),
                    builders.build_trainer_job(finetunejob, self.config)]
        job: Manifest = {}
        for child in filter(None, children):
            try:
                created, fresh = self.kube.create_or_adopt(child, meta["uid"])
            except ApiException as error:
                error.kind = child["kind"]  # for the failure's message
                raise
            if child["kind"] == "Job":
                job = created
                self.view.put_job(job)
                if fresh:
                    self.view.mark_applied(job, finetunejob)
                    created_at = parse_time(meta.get("creationTimestamp"))
                    if created_at:
                        metrics.job_creation_latency.observe(
                            max(0.0, (_now() - created_at).total_seconds()))
                    log.info("created Job %s/%s", meta["namespace"], job["metadata"]["name"])
        return job

    def _observe(self, finetunejob: Manifest, now: datetime, job: Manifest | None = None,
                 written: dict[str, Any] | None = None) -> float | None:
        """Write the status the Job, its pods and the trainer's progress say, where it differs
        from the status `written` (default: the FineTuneJob's)."""
        meta = finetunejob["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        status = finetunejob.get("status") or {}
        written = status if written is None else written
        if job is None:
            job = self._job(finetunejob)
        pods = self.view.pods(job) if job is not None else []
        awaiting_pods = job is not None and self._awaiting_pods(job, pods)
        failed_create = self._failed_create(job, now) if awaiting_pods else None
        update = derive_status(
            finetunejob, job, pods, now, self.view.attempts(job) if job is not None else 0,
            self.view.preemptions(job) if job is not None else [], self.config,
            self.view.disruptions(job) if job is not None else [], failed_create)
        if status.get("phase") not in TERMINAL_PHASES:
            update.patch.setdefault("conditions", status.get("conditions"))
            update.patch["observedGeneration"] = meta.get("generation")
        samples = self.view.progress(namespace, name)
        if samples is not None and update.new_phase == RUNNING:
            update.patch.update(progress_patch(samples, finetunejob.get("spec") or {},
                                               {**status, **update.patch}, now))
        update.patch = {k: v for k, v in update.patch.items() if written.get(k) != v}
        unapplied = conditions_message(update.patch.get("conditions") or [], "SpecApplied",
                                       status="False")
        if unapplied and unapplied != conditions_message(written.get("conditions") or [],
                                                         "SpecApplied", status="False"):
            update.notices.append(("Warning", "ChangeNotApplied", unapplied))
        self._apply(finetunejob, update)
        return self._requeue_after(finetunejob, update, awaiting_pods, now)

    @staticmethod
    def _awaiting_pods(job: Manifest, pods: list[Manifest]) -> bool:
        """The Job should have pods and has none: nothing will be watched if it cannot make
        them (quota, ServiceAccount, PriorityClass), so it is looked at again until it does."""
        job_status = job.get("status") or {}
        return not ((job.get("spec") or {}).get("suspend") or job_status.get("active")
                    or any(not p["metadata"].get("deletionTimestamp") for p in pods)
                    or any(c.get("status") == "True"
                           for c in job_status.get("conditions") or []))

    def _failed_create(self, job: Manifest, now: datetime) -> str | None:
        """The newest recent FailedCreate message of a Job that has no pods."""
        created = parse_time(job["metadata"].get("creationTimestamp")) or now
        if (now - created).total_seconds() < POD_CREATION_GRACE_SECONDS:
            return None
        events = self.kube.failed_creates(job["metadata"]["namespace"], job["metadata"]["uid"])
        recent = [e for e in events
                  if (now - (parse_time(e.get("lastTimestamp") or e.get("eventTime"))
                             or created)).total_seconds() <= FAILED_CREATE_MAX_AGE_SECONDS]
        newest = max(recent, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "",
                     default=None)
        return newest.get("message") if newest else None

    def _requeue_after(self, finetunejob: Manifest, update: StatusUpdate,
                       awaiting_pods: bool, now: datetime) -> float | None:
        """When this job needs looking at again with nothing to watch: a start error's grace
        running out, a Job that has no pods yet, a finished job's TTL."""
        status = {**(finetunejob.get("status") or {}), **update.patch}
        if status.get("phase") in TERMINAL_PHASES:
            return self._expire_when_due({**finetunejob, "status": status}, now)
        waits = []
        since = parse_time((status.get("startError") or {}).get("since"))
        if since is not None:
            deadline = since + timedelta(seconds=self.config.start_error_grace_seconds)
            waits.append((deadline - now).total_seconds())
        if awaiting_pods:
            waits.append(FAILED_CREATE_POLL_SECONDS)
        return max(0.1, min(waits)) if waits else None

    def _expire_when_due(self, finetunejob: Manifest, now: datetime) -> float | None:
        """Delete a finished FineTuneJob once ttlSecondsAfterFinished has passed; until then,
        the seconds left."""
        status = finetunejob.get("status") or {}
        ttl = (finetunejob.get("spec") or {}).get("ttlSecondsAfterFinished")
        finished = parse_time(status.get("completionTime"))
        if ttl is None or finished is None:
            return None
        left = ttl - (now - finished).total_seconds()
        if left > 0:
            return left
        meta = finetunejob["metadata"]
        log.info("deleting %s/%s: ttlSecondsAfterFinished has passed", meta["namespace"],
                 meta["name"])
        self.kube.delete_finetunejob(meta["namespace"], meta["name"], meta["uid"])
        return None

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

    def _apply(self, finetunejob: Manifest, update: StatusUpdate) -> None:
        meta = finetunejob["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if update.stop_job:
            # Before the status says Failed: a failed job is final and never looked at again, so
            # a stop that did not happen would leave its pods running.
            self._stop_job(finetunejob)
        if update.patch:
            written = self.kube.patch_finetunejob_status(namespace, name, update.patch)
            self.view.put_finetunejob(written)
        if update.transitioned:
            failure = update.patch.get("failure") or {}
            log.info("%s/%s: %s -> %s%s", namespace, name, update.old_phase, update.new_phase,
                     f" ({failure.get('reason')}: {failure.get('message')})" if failure else "")
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


def conditions_message(conditions: list[dict[str, Any]], type_: str, status: str | None = None
                       ) -> str:
    return next((c.get("message", "") for c in conditions if c.get("type") == type_
                 and (status is None or c.get("status") == status)), "")
