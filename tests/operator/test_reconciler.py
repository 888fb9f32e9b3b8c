"""The Reconciler against an in-memory API that records every call: what one reconciliation
writes, what it reads, and how it ends on errors the API answers. The same behaviours run against
the real cluster in test_e2e_cluster.py; here the call counts are exact."""

import copy
import json
from datetime import datetime, timedelta, timezone

import pytest
from kubernetes.client.rest import ApiException

from finetune_api import contract
from finetune_operator import builders, reconciler as reconciler_module
from finetune_operator.config import OperatorConfig
from finetune_operator.kube import NotOurs
from finetune_operator.reconciler import Reconciler
from finetune_operator.view import ClusterView

from operator_factories import finetunejob, pod, running_state

CONFIG = OperatorConfig(trainer_image="trainer:1", default_s3_endpoint="http://s3.local:7070")


class FakeKube:
    """Answers as the API server does, on dicts; `calls` lists (verb, kind) in order."""

    def __init__(self, stored_finetunejob):
        self.finetunejob = copy.deepcopy(stored_finetunejob)
        self.version = 100
        self.children = {}
        self.calls = []
        self.refuse = {}  # kind -> ApiException raised on create
        self.failed_create_events = []
        self.fence = lambda: None

    def _bump(self, obj):
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        return copy.deepcopy(obj)

    def create_or_adopt(self, manifest, owner_uid):
        self.calls.append(("create", manifest["kind"]))
        if manifest["kind"] in self.refuse:
            raise self.refuse[manifest["kind"]]
        key = (manifest["kind"], manifest["metadata"]["name"])
        if key in self.children:
            existing = self.children[key]
            if not builders.is_owned_by(existing, owner_uid):
                raise NotOurs(existing)
            return copy.deepcopy(existing), False
        created = copy.deepcopy(manifest)
        created["metadata"]["uid"] = f"uid-{manifest['metadata']['name']}"
        created["metadata"]["creationTimestamp"] = "2026-11-28T10:00:01Z"
        created["status"] = {}
        self.children[key] = created
        return self._bump(created), True

    def ensure_network_policy(self, policy):
        self.calls.append(("get", "NetworkPolicy"))
        if "NetworkPolicy" in self.refuse:
            raise self.refuse["NetworkPolicy"]
        key = ("NetworkPolicy", policy["metadata"]["name"])
        existing = self.children.get(key)
        if existing is not None:
            if existing["metadata"].get("labels") != policy["metadata"]["labels"]:
                raise NotOurs(existing)
            if existing["spec"] == policy["spec"]:
                return False
        self.calls.append(("create" if existing is None else "patch", "NetworkPolicy"))
        self.children[key] = copy.deepcopy(policy)
        return True

    def get_job(self, namespace, name):
        self.calls.append(("get", "Job"))
        job = self.children.get(("Job", name))
        return copy.deepcopy(job) if job else None

    def patch_job(self, namespace, name, patch):
        self.calls.append(("patch", "Job"))
        job = self.children[("Job", name)]
        job["spec"].update(patch.get("spec") or {})
        return self._bump(job)

    def patch_finetunejob_status(self, namespace, name, status):
        self.calls.append(("patch", "FineTuneJob/status"))
        merged = {**(self.finetunejob.get("status") or {}), **status}
        self.finetunejob["status"] = {k: v for k, v in merged.items() if v is not None}
        return self._bump(self.finetunejob)

    def delete_finetunejob(self, namespace, name, uid):
        self.calls.append(("delete", "FineTuneJob"))

    def failed_creates(self, namespace, job_uid):
        self.calls.append(("list", "Event"))
        return self.failed_create_events

    def post_event(self, finetunejob, type_, reason, message):
        self.calls.append(("create", f"Event/{reason}"))


def setup(ftj, config=CONFIG):
    kube = FakeKube(ftj)
    view = ClusterView()
    view.put_finetunejob(ftj)
    return Reconciler(config, kube, view), kube, view


def writes(kube):
    return [call for call in kube.calls if call[0] in ("create", "patch", "delete")]


def deliver(kube, view):
    """What the watches deliver after the writes: the stored FineTuneJob and children."""
    view.put_finetunejob(copy.deepcopy(kube.finetunejob))
    for (kind, _), child in kube.children.items():
        if kind == "Job":
            view.put_job(copy.deepcopy(child))


def test_a_new_job_costs_its_children_and_one_status_patch_and_nothing_after():
    ftj = finetunejob(suspend=True)
    reconciler, kube, view = setup(ftj)
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == [("create", "NetworkPolicy"), ("create", "Job"),
                            ("patch", "FineTuneJob/status")]
    # The namespace's trainer policy was read once (it did not exist); the job's own reads none.
    assert [c for c in kube.calls if c[0] == "get"] == [("get", "NetworkPolicy")]
    assert kube.finetunejob["status"]["phase"] == "Suspended"
    assert kube.finetunejob["status"]["jobName"] == "flowers-trainer"
    kube.calls.clear()
    deliver(kube, view)
    assert reconciler.sync("team-a", "flowers") is None
    assert kube.calls == []  # the watch events of its own writes change nothing


def test_the_namespaces_trainer_policy_is_made_once_and_checked_again_only_after_a_while(
        monkeypatch):
    reconciler, kube, view = setup(finetunejob(suspend=True))
    reconciler.sync("team-a", "flowers")
    second = finetunejob(name="tulips", suspend=True)
    second["metadata"]["uid"] = "uid-tulips"
    view.put_finetunejob(second)
    kube.finetunejob, kube.calls = copy.deepcopy(second), []
    reconciler.sync("team-a", "tulips")
    # The second job of the namespace costs its Job and its status, nothing for the policy.
    assert kube.calls == [("create", "Job"), ("patch", "FineTuneJob/status")]
    policy, = [c for (kind, _), c in kube.children.items() if kind == "NetworkPolicy"]
    assert "ownerReferences" not in policy["metadata"]
    # Edited by hand: put back as built when next checked (after the recheck interval).
    policy["spec"]["ingress"] = []
    monkeypatch.setattr(reconciler_module, "TRAINER_POLICY_RECHECK_SECONDS", 0)
    third = finetunejob(name="roses", suspend=True)
    third["metadata"]["uid"] = "uid-roses"
    view.put_finetunejob(third)
    kube.finetunejob, kube.calls = copy.deepcopy(third), []
    reconciler.sync("team-a", "roses")
    assert writes(kube) == [("patch", "NetworkPolicy"), ("create", "Job"),
                            ("patch", "FineTuneJob/status")]
    assert policy is not kube.children[("NetworkPolicy", builders.TRAINER_NETWORK_POLICY_NAME)]
    assert kube.children[("NetworkPolicy", builders.TRAINER_NETWORK_POLICY_NAME)] == \
        builders.build_trainer_network_policy("team-a", CONFIG)


def test_a_policy_of_that_name_not_made_by_the_operator_fails_the_job_and_no_job_is_made():
    reconciler, kube, view = setup(finetunejob())
    kube.children[("NetworkPolicy", builders.TRAINER_NETWORK_POLICY_NAME)] = {
        "kind": "NetworkPolicy", "metadata": {"name": builders.TRAINER_NETWORK_POLICY_NAME,
                                              "labels": {"team": "a"}}, "spec": {}}
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == [("patch", "FineTuneJob/status"), ("create", "Event/Failed")]
    status = kube.finetunejob["status"]
    assert status["phase"] == "Failed" and status["failure"]["reason"] == "NameConflict"
    assert status["failure"]["message"] == (
        f"NetworkPolicy {builders.TRAINER_NETWORK_POLICY_NAME} already exists and is owned by "
        "nobody")


def test_in_a_burst_the_status_waits_until_the_other_jobs_have_their_children():
    ftj = finetunejob(suspend=True)
    reconciler, kube, view = setup(ftj)
    waiting = [True]
    reconciler.creations_waiting = lambda: waiting[0]
    assert reconciler.sync("team-a", "flowers") == 0.0  # looked at again at once, behind them
    assert writes(kube) == [("create", "NetworkPolicy"), ("create", "Job")]
    assert view.awaits_children(("team-a", "flowers")) is False  # its Job is in the view
    kube.calls.clear()
    waiting[0] = False
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == [("patch", "FineTuneJob/status")]
    assert kube.finetunejob["status"]["jobName"] == "flowers-trainer"


def test_only_a_finetunejob_without_a_job_awaits_children():
    view = ClusterView()
    assert view.awaits_children(("team-a", "flowers")) is False  # unknown
    view.put_finetunejob(finetunejob())
    assert view.awaits_children(("team-a", "flowers")) is True
    view.put_finetunejob(finetunejob(status={"phase": "Queued", "jobName": "flowers-trainer"}))
    assert view.awaits_children(("team-a", "flowers")) is False
    view.put_finetunejob(finetunejob(status={"phase": "Failed"}))
    assert view.awaits_children(("team-a", "flowers")) is False


def test_a_watch_event_older_than_the_operators_own_write_is_ignored():
    ftj = finetunejob(suspend=True)
    reconciler, kube, view = setup(ftj)
    stale = copy.deepcopy(ftj)
    stale["metadata"]["resourceVersion"] = "50"
    reconciler.sync("team-a", "flowers")
    view.put_finetunejob(stale)  # delivered late: before the status patch
    assert view.finetunejob("team-a", "flowers")["status"]["phase"] == "Suspended"
    kube.calls.clear()
    view.put_job(copy.deepcopy(kube.children[("Job", "flowers-trainer")]))
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == []


@pytest.mark.parametrize("status,reason", [(422, "JobRejected"), (403, "Forbidden")])
def test_a_child_the_api_refuses_for_good_fails_the_job_with_the_apis_message(status, reason):
    ftj = finetunejob()
    reconciler, kube, view = setup(ftj)
    message = ('Job.batch "flowers-trainer" is invalid: spec.template.spec.tolerations[0].'
               'operator: Invalid value: "Sometimes"')
    kube.refuse["Job"] = ApiException(status=status, reason="Invalid")
    kube.refuse["Job"].body = json.dumps({"kind": "Status", "message": message})
    assert reconciler.sync("team-a", "flowers") is None  # no retry
    status_written = kube.finetunejob["status"]
    assert status_written["phase"] == "Failed"
    assert status_written["failure"]["reason"] == reason
    assert "spec.template.spec.tolerations[0].operator" in status_written["failure"]["message"]


@pytest.mark.parametrize("message", [
    'jobs.batch "x" is forbidden: exceeded quota: q, requested: count/jobs.batch=1',
    'jobs.batch "x" is forbidden: status unknown for quota: q, resources: count/jobs.batch',
    # The API server's resource mapping does not know the CRD yet (installed moments ago).
    'jobs.batch "x" is forbidden: cannot set blockOwnerDeletion in this case because cannot find '
    'RESTMapping for APIVersion finetune.dev/v1alpha1 Kind FineTuneJob: no matches for kind '
    '"FineTuneJob" in version "finetune.dev/v1alpha1"'])
def test_a_403_that_clears_by_itself_on_the_job_is_retried_not_failed(message):
    reconciler, kube, view = setup(finetunejob())
    kube.refuse["Job"] = ApiException(status=403, reason="Forbidden")
    kube.refuse["Job"].body = json.dumps({"message": message})
    with pytest.raises(ApiException):
        reconciler.sync("team-a", "flowers")
    assert "phase" not in kube.finetunejob["status"]
    del kube.refuse["Job"]
    reconciler.sync("team-a", "flowers")  # the retry
    assert kube.finetunejob["status"]["jobName"] == "flowers-trainer"


def test_a_job_that_cannot_make_its_pods_is_queued_with_the_job_controllers_message(
        monkeypatch):
    reconciler, kube, view = setup(finetunejob())
    reconciler.sync("team-a", "flowers")
    deliver(kube, view)
    now = datetime(2026, 11, 28, 10, 0, 30, tzinfo=timezone.utc)
    monkeypatch.setattr(reconciler_module, "_now", lambda: now)
    message = ('pods "flowers-trainer-x" is forbidden: exceeded quota: gpus, requested: '
               'requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: '
               'requests.nvidia.com/gpu=4')
    kube.failed_create_events = [{"reason": "FailedCreate", "message": "an old one",
                                  "lastTimestamp": "2026-11-28T09:00:00Z"},
                                 {"reason": "FailedCreate", "message": message,
                                  "lastTimestamp": "2026-11-28T10:00:25Z"}]
    again = reconciler.sync("team-a", "flowers")
    status_written = kube.finetunejob["status"]
    assert status_written["phase"] == "Queued"
    running = next(c for c in status_written["conditions"] if c["type"] == "Running")
    assert (running["reason"], running["message"]) == ("FailedCreate", message)
    assert again == reconciler_module.FAILED_CREATE_POLL_SECONDS  # looked at until it clears
    # The quota clears: the pod appears, and the job is no longer queued.
    created = pod()
    created["metadata"]["ownerReferences"][0]["uid"] = "uid-flowers-trainer"
    view.put_pod(created)
    kube.calls.clear()
    assert reconciler.sync("team-a", "flowers") is None
    assert ("list", "Event") not in kube.calls
    assert kube.finetunejob["status"]["phase"] == "Pending"


def test_a_finished_job_is_deleted_when_its_ttl_has_passed_and_not_before(monkeypatch):
    done = {"phase": "Succeeded", "completionTime": "2026-11-28T11:59:50Z",
            "jobName": "flowers-trainer"}
    reconciler, kube, view = setup(finetunejob(status=done, ttlSecondsAfterFinished=30))
    kube.children[("Job", "flowers-trainer")] = None
    now = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
    monkeypatch.setattr(reconciler_module, "_now", lambda: now)
    assert reconciler.sync("team-a", "flowers") == pytest.approx(20)
    assert ("delete", "FineTuneJob") not in kube.calls
    now += timedelta(seconds=20)
    assert reconciler.sync("team-a", "flowers") is None
    assert ("delete", "FineTuneJob") in kube.calls


def test_a_start_error_is_looked_at_again_when_its_grace_runs_out(monkeypatch):
    config = OperatorConfig(trainer_image="trainer:1", start_error_grace_seconds=60)
    reconciler, kube, view = setup(finetunejob(), config)
    reconciler.sync("team-a", "flowers")
    deliver(kube, view)
    job_uid = "uid-flowers-trainer"
    waiting = pod()
    waiting["metadata"]["ownerReferences"][0]["uid"] = job_uid
    waiting["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {
        "reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'}}}]
    view.put_pod(waiting)
    now = datetime(2026, 11, 28, 10, 1, tzinfo=timezone.utc)
    monkeypatch.setattr(reconciler_module, "_now", lambda: now)
    assert reconciler.sync("team-a", "flowers") == pytest.approx(60)
    now += timedelta(seconds=60)
    reconciler.sync("team-a", "flowers")
    assert kube.finetunejob["status"]["phase"] == "Failed"


def test_progress_is_one_patch_with_the_status_and_none_when_the_reading_is_the_same(
        monkeypatch):
    reconciler, kube, view = setup(finetunejob())
    reconciler.sync("team-a", "flowers")
    deliver(kube, view)
    trainer = pod(phase="Running", state=running_state(), pod_ip="10.0.0.9")
    trainer["metadata"]["ownerReferences"][0]["uid"] = "uid-flowers-trainer"
    view.put_pod(trainer)
    view.put_progress("team-a", "flowers", {contract.METRIC_EPOCH: 2.0,
                                            contract.METRIC_PLANNED_EPOCHS: 10.0})
    kube.calls.clear()
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == [("create", "Event/Running"), ("patch", "FineTuneJob/status")] or \
        writes(kube) == [("patch", "FineTuneJob/status"), ("create", "Event/Running")]
    assert kube.finetunejob["status"]["phase"] == "Running"
    assert kube.finetunejob["status"]["progress"]["epochProgress"] == "2/10"
    deliver(kube, view)
    kube.calls.clear()
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == []
    # A restarted trainer serving zeroed gauges does not set progress back.
    view.put_progress("team-a", "flowers", {contract.METRIC_EPOCH: 0.0,
                                            contract.METRIC_PLANNED_EPOCHS: 10.0})
    reconciler.sync("team-a", "flowers")
    assert writes(kube) == []
    assert kube.finetunejob["status"]["progress"]["epoch"] == 2
