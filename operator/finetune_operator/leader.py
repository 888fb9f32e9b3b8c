"""Lease-based leader election (coordination.k8s.io/v1), the same protocol as client-go's
leaderelection: whoever holds an unexpired Lease acts; the others wait. A replica that cannot
renew before its own deadline exits at once, so two replicas never both act."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)


def _micro(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.fromisoformat(str(text).replace("Z", "+00:00"))


@dataclass
class LeaseState:
    holder: str | None
    renew_time: datetime | None
    duration_seconds: int
    transitions: int


def may_take(state: LeaseState, identity: str, now: datetime) -> bool:
    """Pure rule: the Lease is ours to take or keep when we hold it, nobody does, or the
    holder's term ran out."""
    if state.holder in (None, identity):
        return True
    if state.renew_time is None:
        return True
    return now >= state.renew_time + timedelta(seconds=state.duration_seconds)


class LeaseElector:
    """`kube` needs get_lease(namespace, name), create_lease(lease), replace_lease(lease), on
    camelCase dicts (finetune_operator.kube.Kube)."""

    def __init__(self, kube: Any, namespace: str, name: str, identity: str,
                 duration_seconds: int = 15, clock: Callable[[], datetime] | None = None):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration_seconds = duration_seconds
        # client-go's default ratios: retry every 2/15 of a term, give up after 10/15 of it.
        self.retry_seconds = max(1.0, duration_seconds * 2 / 15)
        self.renew_deadline_seconds = duration_seconds * 10 / 15
        self.clock = clock or (lambda: datetime.now(timezone.utc))

    def _lease(self, spec: dict[str, Any], resource_version: str | None = None
               ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            # A compare-and-swap: of two candidates replacing the same version, one wins.
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": spec}

    def try_acquire_or_renew(self) -> bool:
        now = self.clock()
        lease = self.kube.get_lease(self.namespace, self.name)
        if lease is None:
            spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_seconds,
                    "acquireTime": _micro(now), "renewTime": _micro(now), "leaseTransitions": 0}
            try:
                self.kube.create_lease(self._lease(spec))
            except ApiException as error:
                if error.status == 409:
                    return False
                raise
            log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
            return True
        spec = lease.get("spec") or {}
        state = LeaseState(holder=spec.get("holderIdentity") or None,
                           renew_time=_parse(spec.get("renewTime")),
                           duration_seconds=int(spec.get("leaseDurationSeconds") or 0),
                           transitions=int(spec.get("leaseTransitions") or 0))
        if not may_take(state, self.identity, now):
            return False
        ours = state.holder == self.identity
        new_spec = {"holderIdentity": self.identity,
                    "leaseDurationSeconds": self.duration_seconds,
                    "acquireTime": spec.get("acquireTime") if ours else _micro(now),
                    "renewTime": _micro(now),
                    "leaseTransitions": state.transitions if ours else state.transitions + 1}
        try:
            self.kube.replace_lease(self._lease(new_spec, lease["metadata"]["resourceVersion"]))
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        if not ours:
            log.info("acquired Lease %s/%s as %s", self.namespace, self.name, self.identity)
        return True

    def acquire(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Block until this replica leads."""
        log.info("waiting to acquire Lease %s/%s as %s", self.namespace, self.name, self.identity)
        while True:
            try:
                if self.try_acquire_or_renew():
                    return
            except Exception as error:  # API not reachable yet: keep waiting
                log.warning("leader election: %s", error)
            sleep(self.retry_seconds)

    def release(self) -> None:
        """On a clean shutdown, let the next replica take over without waiting a full term."""
        try:
            lease = self.kube.get_lease(self.namespace, self.name)
            spec = (lease or {}).get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            released = {"leaseDurationSeconds": 1, "renewTime": _micro(self.clock()),
                        "acquireTime": spec.get("acquireTime"),
                        "leaseTransitions": spec.get("leaseTransitions") or 0}
            self.kube.replace_lease(self._lease(released, lease["metadata"]["resourceVersion"]))
            log.info("released Lease %s/%s", self.namespace, self.name)
        except Exception as error:
            log.warning("could not release the Lease: %s", error)
