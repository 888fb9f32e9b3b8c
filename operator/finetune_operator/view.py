"""What the operator's watches have seen: FineTuneJobs, their trainer Jobs and the Jobs' pods.

Filled by the kopf event handlers (which run in a thread pool), read by the status refresh, the
progress poller, the TTL sweeper and the metrics collector; hence the lock.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from finetune_api import contract

from finetune_operator.builders import ANNOTATION_FINETUNEJOB, CONTAINER_NAME
from finetune_operator.status import disruption

Manifest = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)


def _controller(obj: Manifest, kind: str) -> dict[str, Any] | None:
    return next((ref for ref in obj.get("metadata", {}).get("ownerReferences") or []
                 if ref.get("kind") == kind and ref.get("controller")), None)


def _container(pod: Manifest) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return next((c for c in statuses if c.get("name") == CONTAINER_NAME), {})


def _slim(obj: Manifest) -> Manifest:
    """Keep what the status derivation reads; drop managedFields and the pod spec."""
    meta = obj.get("metadata", {})
    slim_meta = {k: meta[k] for k in ("name", "namespace", "uid", "generation",
                                      "creationTimestamp", "deletionTimestamp", "ownerReferences",
                                      "annotations", "labels", "resourceVersion") if k in meta}
    slim = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": slim_meta,
            "status": obj.get("status") or {}}
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        container = next((c for c in spec.get("containers") or []
                          if c.get("name") == CONTAINER_NAME), {})
        slim["spec"] = {"containers": [{"name": container.get("name"),
                                        "ports": container.get("ports") or []}]}
    elif obj.get("kind") == "Job":
        slim["spec"] = {k: spec[k] for k in ("suspend", "backoffLimit", "activeDeadlineSeconds")
                        if k in spec}
    else:
        slim["spec"] = spec
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

    # FineTuneJobs
    def put_finetunejob(self, body: Manifest, deleted: bool = False) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            if deleted:
                self._finetunejobs.pop(key, None)
            else:
                self._finetunejobs[key] = _slim(body)

    def finetunejobs(self) -> list[Manifest]:
        with self._lock:
            return list(self._finetunejobs.values())

    def phases(self) -> Iterator[str]:
        return iter([(f.get("status") or {}).get("phase") or "Pending"
                     for f in self.finetunejobs()])

    # Jobs
    def put_job(self, body: Manifest, deleted: bool = False) -> Key | None:
        """Returns the owning FineTuneJob's key (None: not a FineTuneJob's Job)."""
        owner = _controller(body, "FineTuneJob")
        if owner is None:
            return None
        key = (body["metadata"]["namespace"], owner["name"])
        with self._lock:
            current = self._jobs.get(key)
            if deleted:
                if current and current["metadata"]["uid"] == body["metadata"]["uid"]:
                    self._jobs.pop(key, None)
                self._started.pop(body["metadata"]["uid"], None)
                self._preempted.pop(body["metadata"]["uid"], None)
                self._disrupted.pop(body["metadata"]["uid"], None)
            else:
                self._jobs[key] = _slim(body)
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

    def forget(self, namespace: str, finetunejob_name: str) -> None:
        with self._lock:
            self._finetunejobs.pop((namespace, finetunejob_name), None)
