"""What the operator has observed: FineTuneJobs, their trainer Jobs, the Jobs' pods and the
trainers' latest progress readings, as slim records (only the fields the reconciliation reads).

Filled by the kopf event handlers on the event loop and by the reconcile workers with the objects
their writes return; read by the reconcile workers (threads) and the metrics collector; hence the
lock, held only to swap records. Records are never mutated in place. Nothing is kept for objects
that are gone, except what a Job's deleted pods said, until the Job itself is deleted.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from finetune_api import contract

from finetune_operator import builders
from finetune_operator.builders import ANNOTATION_FINETUNEJOB, ANNOTATION_SPEC, CONTAINER_NAME
from finetune_operator.status import TERMINAL_PHASES, disruption

Manifest = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)


def _controller(obj: Manifest, kind: str) -> dict[str, Any] | None:
    return next((ref for ref in obj.get("metadata", {}).get("ownerReferences") or []
                 if ref.get("kind") == kind and ref.get("controller")), None)


def _container(pod: Manifest) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == CONTAINER_NAME), {})


def _resource_version(obj: Manifest | None) -> int | None:
    try:
        return int((obj or {}).get("metadata", {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return None


def is_new(candidate: Manifest, known: Manifest | None) -> bool:
    """The candidate tells more than the version known: another object, or a later version of
    it. Not new: the same version (the watch echoing the operator's own write) or an older one
    (delivered after that write returned a newer one). Resource versions are compared as etcd's
    revisions; one that is not a number always counts as new."""
    if not known or known["metadata"].get("uid") != candidate["metadata"].get("uid"):
        return True
    mine, theirs = _resource_version(candidate), _resource_version(known)
    return mine is None or theirs is None or mine > theirs


def _slim(obj: Manifest) -> Manifest:
    """Keep what the reconciliation reads; drop managedFields, labels and most of the spec."""
    meta = obj.get("metadata", {})
    slim_meta = {k: meta[k] for k in ("name", "namespace", "uid", "generation",
                                      "creationTimestamp", "deletionTimestamp", "resourceVersion")
                 if k in meta}
    controllers = [ref for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
    if controllers:
        slim_meta["ownerReferences"] = controllers
    kind = obj.get("kind")
    slim = {"apiVersion": obj.get("apiVersion"), "kind": kind, "metadata": slim_meta,
            "status": obj.get("status") or {}}
    spec = obj.get("spec") or {}
    if kind == "Pod":
        annotations = meta.get("annotations") or {}
        if ANNOTATION_FINETUNEJOB in annotations:
            slim_meta["annotations"] = {ANNOTATION_FINETUNEJOB: annotations[ANNOTATION_FINETUNEJOB]}
        container = next((c for c in spec.get("containers") or []
                          if c.get("name") == CONTAINER_NAME), {})
        slim["spec"] = {"containers": [{"name": container.get("name"),
                                        "ports": container.get("ports") or []}]}
    elif kind == "Job":
        slim["spec"] = {k: spec[k] for k in ("suspend", "backoffLimit", "activeDeadlineSeconds")
                        if k in spec}
        template_annotations = ((spec.get("template") or {}).get("metadata") or {}).get(
            "annotations") or {}
        if ANNOTATION_SPEC in template_annotations:
            slim["spec"]["template"] = {"metadata": {"annotations": {
                ANNOTATION_SPEC: template_annotations[ANNOTATION_SPEC]}}}
    else:
        slim["spec"] = spec
        # kopf's bookkeeping of earlier operator versions is not read.
        slim["status"] = {k: v for k, v in slim["status"].items() if k != "kopf"}
    return slim


class ClusterView:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finetunejobs: dict[Key, Manifest] = {}
        self._jobs: dict[Key, Manifest] = {}  # by (namespace, FineTuneJob name)
        self._pods: dict[Key, dict[str, Manifest]] = {}  # by (namespace, Job name)
        # uids of the pods of each Job (by Job uid) seen running or finished, kept after the
        # pods are deleted: a replaced pod is gone before its successor starts.
        self._started: dict[str, set[str]] = {}
        # Termination messages of the pods of each Job (by Job uid) that stopped gracefully
        # (exit code PREEMPTED), by pod uid, kept after the pods are deleted.
        self._preempted: dict[str, dict[str, dict[str, Any]]] = {}
        # Disruptions of the pods of each Job (by Job uid), by pod uid, kept after the pods are
        # deleted: an evicted pod is gone within its grace period, and a status refresh that
        # failed meanwhile must still count it when it is retried.
        self._disrupted: dict[str, dict[str, dict[str, Any]]] = {}
        # The latest reading of each running trainer's /metrics, parsed, by FineTuneJob.
        self._progress: dict[Key, dict[str, Any]] = {}
        # What of its FineTuneJob's spec each Job's trainer does not run, by Job uid, with the
        # versions it was worked out for: (hash of the Job's spec annotation, generation).
        self._unapplied: dict[str, tuple[tuple[int, Any], tuple[str, ...]]] = {}
        # How many FineTuneJobs and Jobs were forgotten (deleted) so far: their memory can go.
        self.forgotten = 0
        # The verdict on each FineTuneJob's spec, by (namespace, name): (uid, generation, the
        # problems found); the spec changes only with the generation.
        self._verdicts: dict[Key, tuple[str, Any, tuple[str, ...]]] = {}

    # FineTuneJobs
    def put_finetunejob(self, body: Manifest) -> Key | None:
        """Returns the FineTuneJob's key when the view learnt something from it; None for a
        version it already has (the event of the operator's own write) or an older one."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            if not is_new(body, self._finetunejobs.get(key)):
                return None
        slim = _slim(body)
        with self._lock:
            if not is_new(slim, self._finetunejobs.get(key)):
                return None
            self._finetunejobs[key] = slim
        return key

    def awaits_children(self, key: Key) -> bool:
        """The FineTuneJob has no trainer Job yet and should get one (a fresh one, in a burst:
        its key goes into the work queue's first lane)."""
        with self._lock:
            body = self._finetunejobs.get(key)
            if body is None or body["metadata"].get("deletionTimestamp") or key in self._jobs:
                return False
        status = body.get("status") or {}
        return not status.get("jobName") and status.get("phase") not in TERMINAL_PHASES

    def finetunejob_versions(self) -> dict[Key, int]:
        """(namespace, name) -> the resourceVersion last delivered or written."""
        with self._lock:
            return {key: _resource_version(body) or 0 for key, body in self._finetunejobs.items()}

    def finetunejob(self, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._finetunejobs.get((namespace, name))

    def finetunejobs(self) -> list[Manifest]:
        with self._lock:
            return list(self._finetunejobs.values())

    def phases(self) -> Iterator[str]:
        return iter([(f.get("status") or {}).get("phase") or "Pending"
                     for f in self.finetunejobs()])

    # Jobs
    def put_job(self, body: Manifest, deleted: bool = False) -> Key | None:
        """Returns the owning FineTuneJob's key when the view learnt something from it; None
        for a Job no FineTuneJob controls, or a version the view already has (the operator's
        own write) or an older one."""
        owner = _controller(body, "FineTuneJob")
        if owner is None:
            return None
        key = (body["metadata"]["namespace"], owner["name"])
        with self._lock:
            current = self._jobs.get(key)
            if deleted:
                if current and current["metadata"]["uid"] == body["metadata"]["uid"]:
                    self._jobs.pop(key, None)
                    self.forgotten += 1
                self._started.pop(body["metadata"]["uid"], None)
                self._preempted.pop(body["metadata"]["uid"], None)
                self._disrupted.pop(body["metadata"]["uid"], None)
                self._unapplied.pop(body["metadata"]["uid"], None)
            elif is_new(body, current):
                self._jobs[key] = _slim(body)
            else:
                return None
        return key

    def job(self, namespace: str, finetunejob_name: str, owner_uid: str) -> Manifest | None:
        with self._lock:
            job = self._jobs.get((namespace, finetunejob_name))
        if job and (_controller(job, "FineTuneJob") or {}).get("uid") == owner_uid:
            return job
        return None

    # Pods
    def put_pod(self, body: Manifest, deleted: bool = False) -> Key | None:
        """Returns the owning FineTuneJob's key, from the annotation the Job's template sets."""
        owner = _controller(body, "Job")
        finetunejob = (body["metadata"].get("annotations") or {}).get(ANNOTATION_FINETUNEJOB)
        if owner is None or not finetunejob:
            return None
        namespace = body["metadata"]["namespace"]
        with self._lock:
            pods = self._pods.setdefault((namespace, owner["name"]), {})
            if deleted:
                pods.pop(body["metadata"]["name"], None)
                if not pods:
                    self._pods.pop((namespace, owner["name"]), None)
            else:
                pods[body["metadata"]["name"]] = _slim(body)
            state = (_container(body).get("state") or {})
            if "running" in state or "terminated" in state:
                self._started.setdefault(owner["uid"], set()).add(body["metadata"]["uid"])
            terminated = state.get("terminated") or {}
            if terminated.get("exitCode") == contract.ExitCode.PREEMPTED:
                self._preempted.setdefault(owner["uid"], {})[body["metadata"]["uid"]] = {
                    **contract.parse_termination_message(terminated.get("message")),
                    "finishedAt": terminated.get("finishedAt") or ""}
            disrupted = disruption(body)
            if disrupted:
                self._disrupted.setdefault(owner["uid"], {})[body["metadata"]["uid"]] = disrupted
        return (namespace, finetunejob)

    def preemptions(self, job: Manifest) -> list[dict[str, Any]]:
        """What the trainer pods of this Job that stopped gracefully said, oldest first."""
        with self._lock:
            said = list(self._preempted.get(job["metadata"]["uid"], {}).values())
        return sorted(said, key=lambda message: message["finishedAt"])

    def disruptions(self, job: Manifest) -> list[dict[str, Any]]:
        """When and why pods of this Job were disrupted, deleted ones included."""
        with self._lock:
            return list(self._disrupted.get(job["metadata"]["uid"], {}).values())

    def attempts(self, job: Manifest) -> int:
        """Trainer pods of this Job seen started, deleted ones included."""
        with self._lock:
            return len(self._started.get(job["metadata"]["uid"], ()))

    def pods(self, job: Manifest) -> list[Manifest]:
        meta = job["metadata"]
        with self._lock:
            pods = list(self._pods.get((meta["namespace"], meta["name"]), {}).values())
        return [p for p in pods if (_controller(p, "Job") or {}).get("uid") == meta["uid"]]

    # Progress readings
    def put_progress(self, namespace: str, name: str, samples: dict[str, Any]) -> None:
        with self._lock:
            if (namespace, name) in self._finetunejobs:
                self._progress[(namespace, name)] = samples

    def progress(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._progress.get((namespace, name))

    # Derived once per version
    def unapplied_changes(self, job: Manifest, finetunejob: Manifest) -> list[str]:
        """builders.unapplied_spec_changes: the FineTuneJob's spec against the spec the Job's
        trainer runs, worked out once per Job version of it and FineTuneJob generation (parsing
        the Job's annotation costs more than the rest of a reconciliation)."""
        text = builders.spec_annotation_of(job)
        version = (hash(text), finetunejob["metadata"].get("generation"))
        with self._lock:
            known = self._unapplied.get(job["metadata"].get("uid", ""))
        if known is not None and known[0] == version:
            return list(known[1])
        changes = builders.unapplied_spec_changes(finetunejob.get("spec") or {},
                                                  builders.parse_spec_annotation(text))
        self._remember_unapplied(job, version, changes)
        return changes

    def mark_applied(self, job: Manifest, finetunejob: Manifest) -> None:
        """The Job was just built from this FineTuneJob's spec: nothing is unapplied."""
        version = (hash(builders.spec_annotation_of(job)),
                   finetunejob["metadata"].get("generation"))
        self._remember_unapplied(job, version, [])

    def _remember_unapplied(self, job: Manifest, version: tuple[int, Any],
                            changes: list[str]) -> None:
        uid = job["metadata"].get("uid", "")
        owner = _controller(job, "FineTuneJob")
        key = (job["metadata"].get("namespace"), (owner or {}).get("name"))
        with self._lock:  # only for a Job the view holds: forgotten with it
            if (self._jobs.get(key) or {}).get("metadata", {}).get("uid") == uid:
                self._unapplied[uid] = (version, tuple(changes))

    def spec_problems(self, finetunejob: Manifest, check: Any) -> tuple[str, ...]:
        """check(spec) -> problems, asked once per FineTuneJob generation."""
        meta = finetunejob["metadata"]
        key = (meta["namespace"], meta["name"])
        version = (meta.get("uid"), meta.get("generation"))
        with self._lock:
            known = self._verdicts.get(key)
        if known is not None and known[:2] == version:
            return known[2]
        problems = tuple(check(finetunejob.get("spec")))
        with self._lock:
            if key in self._finetunejobs:
                self._verdicts[key] = (*version, problems)
        return problems

    def forget(self, namespace: str, finetunejob_name: str) -> None:
        """The FineTuneJob is gone: its Job and pods go with it (their own deletions are
        observed too), its progress reading and spec verdict here."""
        with self._lock:
            if self._finetunejobs.pop((namespace, finetunejob_name), None) is not None:
                self.forgotten += 1
            self._progress.pop((namespace, finetunejob_name), None)
            self._verdicts.pop((namespace, finetunejob_name), None)
