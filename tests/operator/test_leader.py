"""Lease election rules against an in-memory Lease store that behaves like the API server
(resourceVersion compare-and-swap, 409 on a stale write or a second create)."""

import copy
from datetime import datetime, timedelta, timezone

from kubernetes.client.rest import ApiException

import pytest

from finetune_operator.leader import LeaseElector, LeaseKeeper, NotLeader


class LeaseStore:
    def __init__(self):
        self.lease = None
        self.version = 0

    def get_lease(self, namespace, name, timeout=None):
        return copy.deepcopy(self.lease)

    def create_lease(self, lease, timeout=None):
        if self.lease is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.version += 1
        self.lease = {**copy.deepcopy(lease), "metadata": {**lease["metadata"],
                                                           "resourceVersion": str(self.version)}}
        return self.lease

    def replace_lease(self, lease, timeout=None):
        if lease["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self.version += 1
        self.lease = {**copy.deepcopy(lease), "metadata": {**lease["metadata"],
                                                           "resourceVersion": str(self.version)}}
        return self.lease


class Clock:
    def __init__(self):
        self.now = datetime(2026, 11, 28, 10, 0, tzinfo=timezone.utc)

    def __call__(self):
        return self.now


    def monotonic(self):
        return self.now.timestamp()


def electors(store, clock):
    return (LeaseElector(store, "finetune-system", "finetune-operator", "a", 15, clock,
                         clock.monotonic),
            LeaseElector(store, "finetune-system", "finetune-operator", "b", 15, clock,
                         clock.monotonic))


def test_only_one_replica_leads_until_its_term_runs_out():
    store, clock = LeaseStore(), Clock()
    a, b = electors(store, clock)
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += timedelta(seconds=10)
    assert a.try_acquire_or_renew()  # renewal
    assert not b.try_acquire_or_renew()  # b sees the renewal
    clock.now += timedelta(seconds=14)
    assert not b.try_acquire_or_renew()  # a renewed 14 s ago: still a's
    clock.now += timedelta(seconds=2)
    assert b.try_acquire_or_renew()  # a stopped renewing: b takes over
    assert store.lease["spec"]["holderIdentity"] == "b"
    assert store.lease["spec"]["leaseTransitions"] == 1
    assert not a.try_acquire_or_renew()


def test_a_stale_write_loses_the_race():
    store, clock = LeaseStore(), Clock()
    a, b = electors(store, clock)
    a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    clock.now += timedelta(seconds=20)
    stale = store.get_lease("finetune-system", "finetune-operator")
    assert b.try_acquire_or_renew()
    original_get = store.get_lease
    store.get_lease = lambda *_, **__: copy.deepcopy(stale)  # a read the old version before b wrote
    assert not a.try_acquire_or_renew()
    store.get_lease = original_get
    assert store.lease["spec"]["holderIdentity"] == "b"


def test_release_hands_over_at_once():
    store, clock = LeaseStore(), Clock()
    a, b = electors(store, clock)
    a.try_acquire_or_renew()
    a.release()
    assert b.try_acquire_or_renew()
    b.release()
    a.release()  # not the holder: leaves b's release alone
    assert store.lease["spec"].get("holderIdentity") is None


def test_another_holders_term_is_judged_by_our_own_clock_not_by_the_renew_time_it_wrote():
    store, clock = LeaseStore(), Clock()
    a, b = electors(store, clock)
    a.clock = lambda: clock.now - timedelta(hours=1)  # a's node clock is an hour behind
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()  # by the renewTime written, a's term ended long ago
    clock.now += timedelta(seconds=14)
    assert not b.try_acquire_or_renew()
    clock.now += timedelta(seconds=2)
    assert b.try_acquire_or_renew()  # 16 s on b's clock without a change: a's term is over


def test_the_keeper_fences_writes_once_its_renew_deadline_has_passed():
    store, clock = LeaseStore(), Clock()
    a, b = electors(store, clock)
    assert a.try_acquire_or_renew()
    lost = []
    keeper = LeaseKeeper(a, on_lost=lost.append, monotonic=clock.monotonic)
    keeper.renewed_at = clock.monotonic()
    keeper.fence()
    clock.now += timedelta(seconds=9)
    assert keeper.renew_once()
    clock.now += timedelta(seconds=9)
    keeper.fence()  # renewed 9 s ago, deadline 10 s
    clock.now += timedelta(seconds=30)  # frozen (SIGSTOP) past the whole term
    with pytest.raises(NotLeader):
        keeper.fence()
    assert not keeper.renew_once()  # does not even try: its deadline is gone
    assert b.try_acquire_or_renew() is False  # b saw nothing change yet ...
    clock.now += timedelta(seconds=16)
    assert b.try_acquire_or_renew()  # ... and takes over a term after it last saw a change
