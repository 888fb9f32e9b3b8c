"""Pure status derivation: a FineTuneJob's status from its trainer Job and that Job's pods.

`derive_status(finetunejob, job, pods, now)` is the only place that decides the phase; the
handlers feed it what the watches saw and patch what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from finetune_api import contract

from finetune_operator.builders import CONTAINER_NAME, worker_count
from finetune_operator.config import OperatorConfig

Manifest = dict[str, Any]

PENDING, QUEUED, RUNNING = "Pending", "Queued", "Running"
SUCCEEDED, FAILED, SUSPENDED = "Succeeded", "Failed", "Suspended"
TERMINAL_PHASES = (SUCCEEDED, FAILED)
# A container waiting reason that will not clear up by itself: the job fails at once with the
# reason on the FineTuneJob instead of sitting "Pending" forever.
FATAL_WAITING_REASONS = ("InvalidImageName",)
# Waiting reasons that may clear up (a registry hiccup, a Secret created a moment later): the job
# fails only when one lasts longer than the operator's start-error grace.
START_ERROR_REASONS = ("ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError",
                       "CreateContainerError")
DEFAULT_CONFIG = OperatorConfig()
CONDITION_ORDER = ("Valid", "Running", "Suspended", "Succeeded", "Failed", "SpecApplied")


def timestamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str,
                  message: str, generation: int | None, now: datetime) -> list[dict[str, Any]]:
    """Conditions keyed by type; lastTransitionTime moves only when the status flips."""
    status_text = "True" if status else "False"
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = (previous["lastTransitionTime"]
                  if previous and previous.get("status") == status_text
                  and previous.get("lastTransitionTime") else timestamp(now))
    condition = {"type": type_, "status": status_text, "reason": reason, "message": message,
                 "lastTransitionTime": transition}
    if generation is not None:
        condition["observedGeneration"] = generation
    others = [c for c in conditions if c.get("type") != type_]
    order = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(others + [condition], key=lambda c: order.get(c.get("type"), len(order)))


def remove_condition(conditions: list[dict[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [c for c in conditions if c.get("type") != type_]


@dataclass
class Verdict:
    """What the Job and its pods say, before it is written as status."""
    phase: str
    reason: str
    message: str
    failure: dict[str, Any] | None = None
    result: dict[str, Any] = field(default_factory=dict)  # the trainer's success message
    stop_job: bool = False  # the Job must be stopped (suspended) because the job failed
    start_error: dict[str, Any] | None = None  # status.startError while within its grace


@dataclass
class StatusUpdate:
    patch: dict[str, Any]  # merge patch for .status (empty: nothing changed)
    old_phase: str | None
    new_phase: str | None
    event: tuple[str, str, str] | None = None  # (type, reason, message) on a phase change
    stop_job: bool = False
    notices: list[tuple[str, str, str]] = field(default_factory=list)  # more Events to post

    @property
    def transitioned(self) -> bool:
        return self.old_phase != self.new_phase


def _container_status(pod: Manifest) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((s for s in statuses if s.get("name") == CONTAINER_NAME),
                statuses[0] if statuses else {})


def _terminated(pod: Manifest) -> dict[str, Any] | None:
    state = _container_status(pod).get("state") or {}
    return state.get("terminated")


def _waiting(pod: Manifest) -> dict[str, Any] | None:
    state = _container_status(pod).get("state") or {}
    return state.get("waiting")


def _pod_condition(pod: Manifest, type_: str) -> dict[str, Any] | None:
    return next((c for c in (pod.get("status") or {}).get("conditions") or []
                 if c.get("type") == type_), None)


def _is_running(pod: Manifest) -> bool:
    return ((pod.get("status") or {}).get("phase") == "Running"
            and "running" in (_container_status(pod).get("state") or {})
            and not pod["metadata"].get("deletionTimestamp"))


def _unschedulable(pod: Manifest) -> dict[str, Any] | None:
    condition = _pod_condition(pod, "PodScheduled")
    if condition and condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
        return condition
    return None


def _finished_at(pod: Manifest) -> str:
    terminated = _terminated(pod) or {}
    return terminated.get("finishedAt") or pod["metadata"].get("creationTimestamp") or ""


def trainer_failure(pod: Manifest) -> dict[str, Any] | None:
    """The failure one trainer pod reports: its termination message, exit code or OOM kill."""
    terminated = _terminated(pod)
    if not terminated or terminated.get("exitCode", 0) == 0:
        return None
    exit_code = int(terminated.get("exitCode"))
    said = contract.parse_termination_message(terminated.get("message"))
    if terminated.get("reason") == "OOMKilled":
        return {"reason": "OOMKilled", "exitCode": exit_code,
                "message": "the trainer was killed for exceeding its memory limit "
                           "(spec.resources.memory)"}
    try:
        default_reason = contract.ExitCode(exit_code).reason
    except ValueError:
        default_reason = "TrainerCrashed"
    message = said.get("message") or f"the trainer exited with code {exit_code}"
    if said.get("field"):
        message = f"{said['field']}: {message}"
    return {"reason": said.get("reason") or default_reason, "message": message,
            "exitCode": exit_code}


def disruption(pod: Manifest) -> dict[str, Any] | None:
    """When and why a pod was disrupted (evicted, preempted, its node lost), or None."""
    condition = _pod_condition(pod, "DisruptionTarget") or {}
    pod_status = pod.get("status") or {}
    if condition.get("status") != "True" and pod_status.get("reason") != "Evicted":
        return None
    return {"time": condition.get("lastTransitionTime") or _finished_at(pod),
            "pod": pod["metadata"]["name"],
            "reason": condition.get("reason") or pod_status.get("reason") or "Evicted",
            # The kubelet's eviction message is on the pod; the API server's on the condition.
            "message": (pod_status.get("message") or condition.get("message")
                        or "the pod was disrupted")}


def disruption_fields(status: dict[str, Any], disruptions: list[dict[str, Any]]
                      ) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """status.disruptions and lastDisruption, counting the disruptions after the last one
    counted (a pod seen twice, or pods of a group disrupted in the same second, once), and an
    Event for the count."""
    counted_until = parse_time((status.get("lastDisruption") or {}).get("time"))
    new = sorted((d for d in disruptions if counted_until is None
                  or parse_time(d["time"]) > counted_until),
                 key=lambda d: parse_time(d["time"]))
    if not new:
        return {}, []
    count = (status.get("disruptions") or 0) + len({parse_time(d["time"]) for d in new})
    last = new[-1]
    return {"disruptions": count, "lastDisruption": last}, [
        ("Warning", "Disrupted", f"disruption {count}: pod {last['pod']} "
                                 f"({last['reason']}): {last['message']}")]


def _job_condition(job: Manifest, *types: str) -> dict[str, Any] | None:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def judge(spec: dict[str, Any], status: dict[str, Any], job: Manifest | None,
          pods: list[Manifest], now: datetime, config: OperatorConfig,
          failed_create: str | None = None) -> Verdict:
    """The phase the Job and its pods put the FineTuneJob in; `status` is the FineTuneJob's
    with this observation's disruptions counted; `failed_create`: why the Job controller could
    not create the Job's pods lately (its FailedCreate Event), if it could not."""
    # Once the trainer has run, the gaps between its pods (one finishing before the Job says
    # Complete, one evicted and being replaced) are part of running, not a step back to Pending.
    has_run = bool(status.get("startTime")) or status.get("phase") == RUNNING
    if job is None:
        if status.get("jobName"):
            return Verdict(FAILED, "JobDeleted",
                           "the trainer Job was deleted outside the operator; delete and "
                           "re-create the FineTuneJob to run it again",
                           failure={"reason": "JobDeleted",
                                    "message": "the trainer Job was deleted outside the operator"})
        return Verdict(PENDING, "Creating", "creating the trainer Job")

    pods = sorted(pods, key=_finished_at)
    failures = [f for f in (trainer_failure(p) for p in pods) if f]
    last_failure = failures[-1] if failures else None

    if _job_condition(job, "Complete", "SuccessCriteriaMet"):
        # Several workers: only rank 0's pod (completion index 0) reports the result.
        results = [contract.parse_termination_message((_terminated(p) or {}).get("message"))
                   for p in pods if (p.get("status") or {}).get("phase") == "Succeeded"]
        result = next((r for r in reversed(results) if r), {})
        return Verdict(SUCCEEDED, "Completed", "training finished", result=result)

    failed = _job_condition(job, "Failed", "FailureTarget")
    if failed:
        job_reason = failed.get("reason") or "Failed"
        job_message = failed.get("message") or ""
        if job_reason == "PodFailurePolicy" and last_failure:
            failure = dict(last_failure)
        elif job_reason == "BackoffLimitExceeded":
            backoff = (job.get("spec") or {}).get("backoffLimit", spec.get("backoffLimit", 3))
            message = f"the trainer failed {backoff + 1} times (spec.backoffLimit={backoff})"
            if last_failure:
                message += f"; last: {last_failure['reason']}: {last_failure['message']}"
            # An OOM kill is retried (its exit code also means "killed"), but it is the cause
            # users need to see, not the retry count.
            reason = "OOMKilled" if last_failure and last_failure["reason"] == "OOMKilled" \
                else job_reason
            failure = {"reason": reason, "message": message}
            if last_failure:
                failure["exitCode"] = last_failure["exitCode"]
        elif job_reason == "DeadlineExceeded":
            deadline = (job.get("spec") or {}).get("activeDeadlineSeconds",
                                                   spec.get("activeDeadlineSeconds"))
            failure = {"reason": job_reason,
                       "message": f"the job ran longer than spec.activeDeadlineSeconds="
                                  f"{deadline}s"}
        else:
            failure = {"reason": job_reason, "message": job_message or "the trainer Job failed"}
            if last_failure:
                failure.update(last_failure)
        return Verdict(FAILED, failure["reason"], failure["message"], failure=failure)

    disruptions = status.get("disruptions") or 0
    if disruptions > config.max_disruptions:
        # The pod failure policy would retry forever; a pod that keeps filling its node's disk
        # would keep evicting its neighbours.
        last = status.get("lastDisruption") or {}
        message = (f"the trainer pod was disrupted {disruptions} times, more than the "
                   f"{config.max_disruptions} the operator retries; last: pod {last.get('pod')} "
                   f"({last.get('reason')}): {last.get('message')}")
        return Verdict(FAILED, "Evicted", message,
                       failure={"reason": "Evicted", "message": message}, stop_job=True)

    active_pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    start_error = None
    for pod in active_pods:
        waiting = _waiting(pod) or {}
        reason = waiting.get("reason")
        if reason in FATAL_WAITING_REASONS:
            message = waiting.get("message") or reason
            failure = {"reason": reason, "message": message}
            return Verdict(FAILED, reason, message, failure=failure, stop_job=True)
        if reason in START_ERROR_REASONS and start_error is None:
            start_error = {"reason": reason, "message": waiting.get("message") or reason}
    if start_error:
        return _judge_start_error(start_error, status, now, config, has_run)

    if (job.get("spec") or {}).get("suspend"):
        if spec.get("suspend"):
            return Verdict(SUSPENDED, "Suspended",
                           "suspended by spec.suspend; the last checkpoint is kept and the job "
                           "resumes from it when spec.suspend is false")
        if spec.get("queueName"):
            return Verdict(QUEUED, "WaitingForAdmission",
                           f"waiting for Kueue to admit the job in queue {spec['queueName']}")
        return Verdict(PENDING, "Resuming", "resuming the trainer Job")

    if any(_is_running(p) for p in active_pods):
        attempt = group_attempts(spec, len([p for p in pods if _started(p)]))
        message = "the trainer is running"
        if attempt > 1:
            message += f" (attempt {attempt}"
            message += f"; previous: {last_failure['reason']})" if last_failure else ")"
        return Verdict(RUNNING, "TrainerRunning", message)

    for pod in active_pods:
        condition = _unschedulable(pod)
        if condition:
            return Verdict(QUEUED, "Unschedulable",
                           condition.get("message") or "no node can run the trainer pod")

    if failed_create and not active_pods:
        # A quota, a ServiceAccount or a PriorityClass may still appear: the Job controller keeps
        # trying, so the job waits, saying why.
        return Verdict(QUEUED, "FailedCreate", failed_create)
    if last_failure:
        return Verdict(RUNNING, "Retrying",
                       f"retrying after {last_failure['reason']}: {last_failure['message']}")
    if has_run:
        if any((_terminated(p) or {}).get("exitCode") == 0 for p in pods):
            return Verdict(RUNNING, "Completing", "the trainer finished; completing the Job")
        return Verdict(RUNNING, "Restarting", "the trainer pod is being replaced")
    return Verdict(PENDING, "PodStarting", "waiting for the trainer pod to start")


def _judge_start_error(start_error: dict[str, Any], status: dict[str, Any], now: datetime,
                       config: OperatorConfig, has_run: bool) -> Verdict:
    """A container that cannot start yet: waiting within the grace, which runs from when the
    operator first saw it (kept in status, so that a restarted operator keeps the clock)."""
    since = parse_time((status.get("startError") or {}).get("since")) or now
    grace = config.start_error_grace_seconds
    waited = (now - since).total_seconds()
    if waited >= grace:
        message = (f"{start_error['message']} (the trainer container could not start for "
                   f"{waited:.0f} s, the operator's grace is {grace} s)")
        return Verdict(FAILED, start_error["reason"], message,
                       failure={"reason": start_error["reason"], "message": message},
                       stop_job=True)
    deadline = timestamp(since + timedelta(seconds=grace))
    return Verdict(RUNNING if has_run else PENDING, start_error["reason"],
                   f"{start_error['message']} (the job fails at {deadline} unless the trainer "
                   "container starts)",
                   start_error={**start_error, "since": timestamp(since)})


def group_attempts(spec: dict[str, Any], pods: int) -> int:
    """Attempts of the whole group: a multi-worker job starts (and restarts) all its pods."""
    return -(-pods // max(1, worker_count(spec)))


def _started(pod: Manifest) -> bool:
    return bool(_terminated(pod)) or _is_running(pod)


def _result_fields(result: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """Status fields from the trainer's success message."""
    fields: dict[str, Any] = {}
    metrics = {key: result[name] for key, name in (
        ("valAccuracy", "valAccuracy"), ("bestValAccuracy", "bestValAccuracy"),
        ("baselineAccuracy", "baselineAccuracy"), ("trainLoss", "trainLoss"))
        if isinstance(result.get(name), (int, float))}
    if metrics:
        fields["metrics"] = metrics
    output = {key: result[key] for key in ("modelUri", "reportUri") if result.get(key)}
    if output:
        fields["output"] = output
    checkpoint = said_checkpoint(spec, result)  # the last one, written after the last scrape
    if checkpoint:
        fields["lastCheckpoint"] = checkpoint
    if result.get("strategy"):
        fields["resolvedStrategy"] = result["strategy"]
    if result.get("strategyReason"):
        fields["strategyReason"] = result["strategyReason"]
    if isinstance(result.get("leaderboard"), list):  # Auto: the top of the race
        fields["leaderboard"] = result["leaderboard"]
    # A LinearProbe plans one pass whatever spec.epochs says; the trainer states what it planned.
    total = result.get("plannedEpochs") or spec.get("epochs")
    epochs = result.get("epochs", total)
    if isinstance(epochs, int):
        fields["progress"] = {"epoch": epochs, "totalEpochs": total or epochs,
                              "epochProgress": f"{epochs}/{total or epochs}", "percent": 100.0,
                              "etaSeconds": 0}
    return fields


def checkpoint_status(uri: str, epoch: int, step: int, time: str) -> dict[str, Any]:
    return {"uri": uri, "epoch": int(epoch), "step": int(step), "time": time}


def said_checkpoint(spec: dict[str, Any], said: dict[str, Any]) -> dict[str, Any] | None:
    """status.lastCheckpoint from the checkpoint a trainer's termination message names."""
    checkpoint = said.get("checkpoint") or {}
    if not checkpoint.get("time"):
        return None
    return checkpoint_status(checkpoint_prefix(spec), checkpoint.get("epoch", 0),
                             checkpoint.get("step", 0), timestamp(parse_time(checkpoint["time"])))


def newer_checkpoint(candidate: dict[str, Any] | None, known: dict[str, Any] | None) -> bool:
    if not candidate:
        return False
    if not known:
        return True
    later = parse_time(candidate.get("time")) or datetime.min.replace(tzinfo=timezone.utc)
    earlier = parse_time(known.get("time")) or datetime.min.replace(tzinfo=timezone.utc)
    return later > earlier or (later == earlier and candidate != known)


def preemption_fields(spec: dict[str, Any], status: dict[str, Any],
                      preempted: list[dict[str, Any]]) -> tuple[dict[str, Any], list]:
    """status.preemptions and lastCheckpoint from what the gracefully stopped pods said, and an
    Event for each preemption not counted before."""
    count = group_attempts(spec, len(preempted))
    known = status.get("preemptions") or 0
    if count <= known:
        return {}, []
    fields: dict[str, Any] = {"preemptions": count}
    # The pods of a group stop together; the newest message that names a checkpoint says where.
    said = next((m for m in reversed(preempted) if m.get("checkpoint")), preempted[-1])
    checkpoint = said_checkpoint(spec, said)
    if newer_checkpoint(checkpoint, status.get("lastCheckpoint")):  # False for None
        fields["lastCheckpoint"] = checkpoint
    message = said.get("message") or "the trainer stopped gracefully"
    return fields, [("Normal", "Preempted", f"preemption {count}: {message}")]


def checkpoint_prefix(spec: dict[str, Any]) -> str:
    checkpoint_uri = (spec.get("checkpoint") or {}).get("uri")
    if checkpoint_uri:
        return checkpoint_uri
    return (spec.get("output") or {}).get("uri", "").rstrip("/") + "/checkpoints/"


def derive_status(finetunejob: Manifest, job: Manifest | None, pods: list[Manifest],
                  now: datetime, pods_started: int = 0,
                  preempted: list[dict[str, Any]] = (),
                  config: OperatorConfig = DEFAULT_CONFIG,
                  disrupted: list[dict[str, Any]] = (),
                  failed_create: str | None = None) -> StatusUpdate:
    """The status patch for `finetunejob` given its trainer Job (None: not there) and the Job's
    pods. `preempted`: what the Job's pods that stopped gracefully said; `disrupted`: the
    disruptions of its pods (ClusterView keeps both after the pods are gone). `config`: the
    operator's limits on disruptions and start errors. A finished job stays finished: later
    observations may only fill in details."""
    meta = finetunejob["metadata"]
    spec = finetunejob.get("spec") or {}
    status = finetunejob.get("status") or {}
    generation = meta.get("generation")
    old_phase = status.get("phase")
    disruption_counts, disruption_notices = disruption_fields(
        status, [*disrupted, *filter(None, map(disruption, pods))])
    verdict = judge(spec, {**status, **disruption_counts}, job, pods, now, config, failed_create)

    if old_phase in TERMINAL_PHASES:
        # Watches of the Job and of its pods are separate streams: the Job may report Complete
        # before the pod's termination message is seen. Fill in what was missing, change nothing.
        if verdict.phase != old_phase:
            return StatusUpdate({}, old_phase, old_phase)
        patch = {k: v for k, v in _result_fields(verdict.result, spec).items()
                 if not status.get(k)}
        known_failure = status.get("failure") or {}
        if (verdict.failure and verdict.failure.get("exitCode") is not None
                and known_failure.get("exitCode") is None):
            patch["failure"] = verdict.failure
        return StatusUpdate(patch, old_phase, old_phase)

    conditions = list(status.get("conditions") or [])
    phase = verdict.phase
    conditions = set_condition(conditions, "Running", phase == RUNNING, verdict.reason,
                               verdict.message, generation, now)
    conditions = set_condition(conditions, "Suspended", phase == SUSPENDED,
                               verdict.reason if phase == SUSPENDED else "NotSuspended",
                               verdict.message if phase == SUSPENDED else "", generation, now)
    new: dict[str, Any] = {"phase": phase, "observedGeneration": generation}
    preemption, notices = preemption_fields(spec, status, list(preempted))
    new.update(preemption)
    new.update(disruption_counts)
    notices += disruption_notices
    new["startError"] = verdict.start_error  # None removes it once the container starts
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
        job_counts = (job.get("status") or {})
        attempts = max(status.get("attempts") or 0, group_attempts(spec, max(
            pods_started, sum(1 for p in pods if _started(p)),
            (job_counts.get("failed") or 0) + (job_counts.get("succeeded") or 0))))
        if attempts:
            new["attempts"] = attempts
    if phase == RUNNING and not status.get("startTime"):
        new["startTime"] = (job or {}).get("status", {}).get("startTime") or timestamp(now)

    if phase in TERMINAL_PHASES:
        new["completionTime"] = ((job or {}).get("status", {}).get("completionTime")
                                 if phase == SUCCEEDED else None) or timestamp(now)
        if not status.get("startTime"):
            new["startTime"] = (job or {}).get("status", {}).get("startTime") or new["completionTime"]
        conditions = set_condition(conditions, phase, True, verdict.reason, verdict.message,
                                   generation, now)
    if phase == SUCCEEDED:
        new.update(_result_fields(verdict.result, spec))
    if verdict.failure:
        new["failure"] = verdict.failure
    new["conditions"] = conditions

    patch = {k: v for k, v in new.items() if status.get(k) != v}
    event = None
    # The first status of a job that has not started is no news: no Event (a write) for it.
    if phase != old_phase and (old_phase or phase in (RUNNING, *TERMINAL_PHASES)):
        kind = "Warning" if phase == FAILED else "Normal"
        event = (kind, phase, verdict.message)
    return StatusUpdate(patch, old_phase, phase, event=event,
                        stop_job=verdict.stop_job and phase == FAILED, notices=notices)


def validity_conditions(finetunejob: Manifest, problems: list[str], now: datetime
                        ) -> list[dict[str, Any]]:
    status = finetunejob.get("status") or {}
    generation = finetunejob["metadata"].get("generation")
    conditions = list(status.get("conditions") or [])
    if problems:
        return set_condition(conditions, "Valid", False, "InvalidSpec", "; ".join(problems),
                             generation, now)
    return set_condition(conditions, "Valid", True, "SpecValid", "the spec is valid",
                         generation, now)


def spec_applied_conditions(finetunejob: Manifest, unapplied: list[str], now: datetime
                            ) -> list[dict[str, Any]]:
    status = finetunejob.get("status") or {}
    generation = finetunejob["metadata"].get("generation")
    conditions = list(status.get("conditions") or [])
    if unapplied:
        return set_condition(
            conditions, "SpecApplied", False, "ChangeNotApplied",
            f"{', '.join(unapplied)} changed after the trainer Job was created and cannot "
            "apply to it; the trainer keeps running the spec it started with. Delete and "
            "re-create the FineTuneJob to use the new values", generation, now)
    return set_condition(conditions, "SpecApplied", True, "Applied",
                         "the trainer Job runs the current spec", generation, now)
