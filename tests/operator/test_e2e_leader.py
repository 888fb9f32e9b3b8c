"""Leader election end to end: a leader frozen (SIGSTOP) past its Lease, as in a long GC pause,
a paused VM or a stalled node, is replaced, and when it wakes it writes nothing: every write
checks the Lease keeper's deadline on the replica's own clock first, and the keeper exits."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from e2e_support import apply, finetunejob, ftj, wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]

LEASE_SECONDS = 6


def container_pid(pod: dict) -> int:
    """The host PID of the pod's operator process: the process whose cgroup names the
    container's id (the kubelet and containerd run on this machine)."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if container_id in (proc / "cgroup").read_text():
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"finetune_operator" in cmdline or b"finetune-operator" in cmdline:
                    pids.append(int(proc.name))
        except OSError:
            continue
    assert pids, f"no process of container {container_id} found"
    return min(pids)


def lease_holder(kubectl, namespace: str, name: str) -> str | None:
    lease = json.loads(kubectl("get", "lease", name, "-n", namespace, "-o", "json"))
    return lease["spec"].get("holderIdentity")


def managers(kubectl, namespace: str, name: str) -> set[str]:
    """The field managers that wrote the FineTuneJob (its status included)."""
    body = json.loads(kubectl("get", "ftj", name, "-n", namespace, "-o", "json",
                              "--show-managed-fields"))
    return {entry["manager"] for entry in body["metadata"].get("managedFields") or []}


def test_a_leader_frozen_past_its_lease_is_replaced_and_writes_nothing_when_it_wakes(
        kubectl, namespace, operator_factory):
    operator = operator_factory([namespace], replicas=2,
                                FINETUNE_LEASE_DURATION_SECONDS=str(LEASE_SECONDS)).wait_leader()
    follower, = wait_for(operator.followers, timeout=120,
                         message="the second replica to serve metrics as a follower")
    leader = operator.leader()
    lease_name = operator.fullname
    frozen_identity = lease_holder(kubectl, namespace, lease_name)
    assert frozen_identity.startswith(leader["metadata"]["name"])
    pid = container_pid(leader)

    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: lease_holder(kubectl, namespace, lease_name) not in (None,
                                                                              frozen_identity),
                 timeout=120, message="the follower to take the Lease over")
        successor = lease_holder(kubectl, namespace, lease_name)
        # Work that arrives while the old leader is frozen: it will see it when it wakes.
        apply(kubectl, finetunejob("after-takeover", namespace, "s3://datasets/x/",
                                   suspend=True))
        wait_phase(kubectl, namespace, "after-takeover", "Suspended", timeout=60)
    finally:
        os.kill(pid, signal.SIGCONT)

    # Woken, the old leader finds its deadline gone: it exits (the Deployment restarts it as a
    # follower) and makes no write in between.
    wait_for(lambda: any(p["metadata"]["name"] == leader["metadata"]["name"]
                         and p["status"]["containerStatuses"][0].get("restartCount", 0) >= 1
                         for p in operator.pods(include_terminating=True)),
             timeout=120, message="the frozen replica to exit once resumed")
    assert lease_holder(kubectl, namespace, lease_name) == successor
    assert frozen_identity not in managers(kubectl, namespace, "after-takeover")
    assert successor in managers(kubectl, namespace, "after-takeover")
    last = ftj(kubectl, namespace, "after-takeover")["status"]
    assert last["phase"] == "Suspended"
    terminated = next(p for p in operator.pods(include_terminating=True)
                      if p["metadata"]["name"] == leader["metadata"]["name"]
                      )["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert terminated["exitCode"] == 3  # EXIT_LOST_LEASE
