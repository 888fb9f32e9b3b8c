"""Lease-based leader election (coordination.k8s.io/v1), the same protocol as client-go's
leaderelection: whoever holds an unexpired Lease acts; the others wait. As in client-go, another
holder's term is judged by this replica's own clock (from when it saw the Lease last change), not
by the renewTime another machine wrote, so clock skew between nodes cannot hand over early.

The LeaseKeeper renews in a thread of its own, which nothing else runs in, and bounds each
renewal call by the time left before its deadline. Every write of the operator first asks the
keeper (`fence`), so a replica that was frozen past its deadline (SIGSTOP, a long GC, a paused
VM) writes nothing when it wakes, and exits."""

from __future__ import annotations

import logging
import os
import threading
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


class NotLeader(Exception):
    """This replica no longer holds the Lease: it must not write."""


def may_take(holder: str | None, identity: str, observed_at: float, duration_seconds: float,
             now: float) -> bool:
    """Pure rule: the Lease is ours to take or keep when we hold it, nobody does, or the
    holder's term ran out, counted on our own clock from when we last saw the Lease change."""
    if holder in (None, identity):
        return True
    return now >= observed_at + duration_seconds


class LeaseElector:
    """`kube` needs get_lease(namespace, name), create_lease(lease), replace_lease(lease), on
    camelCase dicts (finetune_operator.kube.Kube)."""

    def __init__(self, kube: Any, namespace: str, name: str, identity: str,
                 duration_seconds: int = 15, clock: Callable[[], datetime] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration_seconds = duration_seconds
        # client-go's default ratios: retry every 2/15 of a term, give up after 10/15 of it.
        self.retry_seconds = max(1.0, duration_seconds * 2 / 15)
        self.renew_deadline_seconds = duration_seconds * 10 / 15
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.monotonic = monotonic
        # The Lease record as last seen, and when (our clock).
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    def _lease(self, spec: dict[str, Any], resource_version: str | None = None
               ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if resource_version:
            # A compare-and-swap: of two candidates replacing the same version, one wins.
            metadata["resourceVersion"] = resource_version
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata,
                "spec": spec}

    def try_acquire_or_renew(self, timeout: float = 10) -> bool:
        """One round of the protocol; each API call is bounded by `timeout` seconds."""
        now = self.clock()
        lease = self.kube.get_lease(self.namespace, self.name, timeout=timeout)
        if lease is None:
            spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_seconds,
                    "acquireTime": _micro(now), "renewTime": _micro(now), "leaseTransitions": 0}
            try:
                self.kube.create_lease(self._lease(spec), timeout=timeout)
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
        record = (state.holder, spec.get("renewTime"), state.duration_seconds,
                  state.transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, self.monotonic()
        if not may_take(state.holder, self.identity, self._observed_at,
                        state.duration_seconds, self.monotonic()):
            return False
        ours = state.holder == self.identity
        new_spec = {"holderIdentity": self.identity,
                    "leaseDurationSeconds": self.duration_seconds,
                    "acquireTime": spec.get("acquireTime") if ours else _micro(now),
                    "renewTime": _micro(now),
                    "leaseTransitions": state.transitions if ours else state.transitions + 1}
        try:
            self.kube.replace_lease(self._lease(new_spec, lease["metadata"]["resourceVersion"]),
                                    timeout=timeout)
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


class LeaseKeeper:
    """Renews the Lease every `retry_seconds` in a dedicated daemon thread. A renewal that has
    not succeeded by the renew deadline (10/15 of a term after the last success) ends the
    process: the other replicas may take over one full term after the last renewal they saw,
    which is later than our deadline."""

    def __init__(self, elector: LeaseElector, on_lost: Callable[[str], None] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.elector = elector
        self.monotonic = monotonic
        self.on_lost = on_lost or _exit_lost
        self.renewed_at = monotonic()  # call after acquiring
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self.renewed_at = self.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def time_left(self) -> float:
        return self.renewed_at + self.elector.renew_deadline_seconds - self.monotonic()

    def fence(self) -> None:
        """Raise NotLeader unless this replica renewed within its deadline."""
        if self.time_left() <= 0:
            raise NotLeader("the leader Lease was not renewed in time")

    def renew_once(self) -> bool:
        left = self.time_left()
        if left <= 0:
            return False
        attempt_started = self.monotonic()
        try:
            renewed = self.elector.try_acquire_or_renew(timeout=max(0.1, left))
        except Exception as error:  # API unreachable: keep trying until the deadline
            log.warning("renewing the leader Lease: %s", error)
            return True
        if renewed:
            # Counted from before the call: the term the others see began no earlier.
            self.renewed_at = attempt_started
            return True
        return False  # another replica holds it

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.renew_once() or self.time_left() <= 0:
                if self._stop.is_set():
                    return
                self.on_lost("the leader Lease was not renewed before its deadline"
                             if self.time_left() <= 0 else "another replica holds the Lease")
                return
            self._stop.wait(self.elector.retry_seconds)


EXIT_LOST_LEASE = 3


def _exit_lost(reason: str) -> None:
    log.error("lost the leader Lease (%s); exiting so that only one replica acts", reason)
    logging.shutdown()
    os._exit(EXIT_LOST_LEASE)
