import asyncio
import copy

from finetune_api import contract
from finetune_operator import builders
from finetune_operator.config import OperatorConfig
from finetune_operator.loops import memory_trim_loop, metrics_url, release_freed_memory
from finetune_operator.view import ClusterView

from operator_factories import (FTJ_UID, JOB_UID, finetunejob, job, pod, running_state,
                                terminated_state)


def test_metrics_url_is_pod_ip_and_the_metrics_container_port():
    running = pod(phase="Running", state=running_state(), pod_ip="10.1.2.3")
    assert metrics_url(running) == "http://10.1.2.3:9400/metrics"
    v6 = pod(phase="Running", state=running_state(), pod_ip="fd00::7")
    assert metrics_url(v6) == "http://[fd00::7]:9400/metrics"
    assert metrics_url(pod(phase="Pending", pod_ip="10.1.2.3")) is None
    assert metrics_url(pod(phase="Running", state=running_state())) is None


def test_view_keys_children_by_their_owners_and_ignores_strangers():
    view = ClusterView()
    assert view.put_job(job()) == ("team-a", "flowers")
    assert view.job("team-a", "flowers", FTJ_UID)["metadata"]["name"] == "flowers-trainer"
    assert view.job("team-a", "flowers", "another-uid") is None  # a FineTuneJob re-created with that name
    assert view.put_pod(pod()) == ("team-a", "flowers")
    assert [p["metadata"]["name"] for p in view.pods(job())] == ["flowers-trainer-abcde"]
    stranger = pod(name="x")
    stranger["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    view.put_pod(stranger)
    assert len(view.pods(job())) == 1
    view.put_pod(pod(), deleted=True)
    assert view.pods(job()) == []
    orphan = job()
    orphan["metadata"]["ownerReferences"] = []
    assert view.put_job(orphan) is None
    view.put_job(job(), deleted=True)
    assert view.job("team-a", "flowers", FTJ_UID) is None


def test_view_drops_what_status_derivation_does_not_read():
    view = ClusterView()
    body = pod(phase="Running", state=running_state(), pod_ip="10.0.0.1")
    body["metadata"]["managedFields"] = [{"manager": "kubelet"}] * 10
    body["spec"]["containers"][0]["env"] = [{"name": "X", "value": "y" * 1000}]
    view.put_pod(body)
    kept = view.pods(job())[0]
    assert "managedFields" not in kept["metadata"]
    assert kept["spec"]["containers"][0] == {"name": "trainer", "ports": body["spec"]["containers"][0]["ports"]}
    assert metrics_url(kept) == "http://10.0.0.1:9400/metrics"


def test_attempts_count_pods_that_started_even_after_they_are_deleted():
    view = ClusterView()
    first = pod(name="a", phase="Running", state=running_state())
    first["metadata"]["uid"] = "pod-a"
    view.put_pod(first)
    view.put_pod(first, deleted=True)  # evicted, gone before its successor starts
    second = pod(name="b")  # not started yet
    second["metadata"]["uid"] = "pod-b"
    view.put_pod(second)
    assert view.attempts(job()) == 1
    second = pod(name="b", phase="Running", state=running_state())
    second["metadata"]["uid"] = "pod-b"
    view.put_pod(second)
    view.put_pod(second)
    assert view.attempts(job()) == 2


def test_graceful_stops_are_remembered_after_their_pods_are_deleted_and_forgotten_with_the_job():
    view = ClusterView()
    said = contract.termination_message(
        reason="Preempted", message="stopped on SIGTERM at epoch 2 step 5",
        checkpoint={"uri": "s3://m/c/epoch-0001-step-00005.pt", "epoch": 1, "step": 5,
                    "time": "2026-11-28T10:04:59+00:00"})
    stopped = pod(name="a", phase="Failed", state=terminated_state(
        int(contract.ExitCode.PREEMPTED), said))
    crashed = pod(name="b", phase="Failed", state=terminated_state(1, "boom",
                                                                   finished="2026-11-28T10:06:00Z"))
    for body in (stopped, crashed):
        view.put_pod(body)
        view.put_pod(body, deleted=True)
    preemptions = view.preemptions(job())
    assert [p["checkpoint"]["step"] for p in preemptions] == [5]
    assert preemptions[0]["finishedAt"] == "2026-11-28T10:05:00Z"
    view.put_job(job(), deleted=True)
    assert view.preemptions(job()) == [] and view.attempts(job()) == 0


def test_disruptions_are_remembered_after_their_pods_are_deleted_and_forgotten_with_the_job():
    view = ClusterView()
    evicted = pod(name="a", phase="Running", state=running_state(), conditions=[
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
         "message": "Eviction API: evicting", "lastTransitionTime": "2026-11-28T10:05:00Z"}])
    evicted["metadata"]["uid"] = "pod-a"
    view.put_pod(evicted)
    view.put_pod(evicted, deleted=True)  # deleted within its grace period
    assert view.disruptions(job()) == [{"time": "2026-11-28T10:05:00Z", "pod": "a",
                                        "reason": "EvictionByEvictionAPI",
                                        "message": "Eviction API: evicting"}]
    view.put_pod(pod(name="b", phase="Running", state=running_state()))
    assert len(view.disruptions(job())) == 1
    view.put_job(job(), deleted=True)
    assert view.disruptions(job()) == []


def _versioned(body, version):
    body = copy.deepcopy(body)
    body["metadata"]["resourceVersion"] = str(version)
    return body


def test_an_event_of_a_version_the_view_has_queues_no_reconciliation():
    """The watch echoes the operator's own writes (their results are in the view already):
    such an event, or an older one, tells nothing new; a later version does."""
    view = ClusterView()
    assert view.put_finetunejob(_versioned(finetunejob(), 10)) == ("team-a", "flowers")
    assert view.put_finetunejob(_versioned(finetunejob(), 10)) is None
    assert view.put_finetunejob(_versioned(finetunejob(), 9)) is None
    assert view.put_finetunejob(_versioned(finetunejob(), 11)) == ("team-a", "flowers")
    assert view.put_job(_versioned(job(), 20)) == ("team-a", "flowers")
    assert view.put_job(_versioned(job(), 20)) is None
    assert view.put_job(_versioned(job(), 19)) is None
    assert view.put_job(_versioned(job(), 21)) == ("team-a", "flowers")
    assert view.put_job(_versioned(job(), 21), deleted=True) == ("team-a", "flowers")


def test_a_spec_is_checked_once_per_generation_and_forgotten_with_its_finetunejob():
    view = ClusterView()
    body = finetunejob()
    view.put_finetunejob(body)
    checked = []

    def check(spec):
        checked.append(spec)
        return ["spec.epochs: too many"] if spec["epochs"] > 100 else []

    assert view.spec_problems(body, check) == ()
    assert view.spec_problems(body, check) == ()
    assert len(checked) == 1
    edited = copy.deepcopy(body)
    edited["metadata"]["generation"] = 2
    edited["spec"]["epochs"] = 500
    view.put_finetunejob(edited)
    assert view.spec_problems(edited, check) == ("spec.epochs: too many",)
    assert len(checked) == 2
    view.forget("team-a", "flowers")
    assert view._verdicts == {}


def test_unapplied_changes_are_worked_out_once_per_job_and_generation(monkeypatch):
    view = ClusterView()
    ftj = finetunejob()
    built = builders.build_trainer_job(ftj, OperatorConfig())
    body = {**built, "metadata": {**built["metadata"], "uid": JOB_UID,
                                  "ownerReferences": job()["metadata"]["ownerReferences"]}}
    view.put_job(body)
    slim = view.job("team-a", "flowers", FTJ_UID)
    parsed = []
    real_parse = builders.parse_spec_annotation
    monkeypatch.setattr(builders, "parse_spec_annotation",
                        lambda text: parsed.append(1) or real_parse(text))
    assert view.unapplied_changes(slim, ftj) == []
    assert view.unapplied_changes(slim, ftj) == []
    assert len(parsed) == 1
    edited = copy.deepcopy(ftj)
    edited["metadata"]["generation"] = 2
    edited["spec"]["epochs"] = 20
    assert view.unapplied_changes(slim, edited) == ["spec.epochs"]
    assert view.unapplied_changes(slim, edited) == ["spec.epochs"]
    assert len(parsed) == 2
    view.put_job(body, deleted=True)
    assert view._unapplied == {}
    # A Job the view does not hold: worked out, not kept.
    assert view.unapplied_changes(body, ftj) == []
    assert view._unapplied == {}
    # One the operator just built from the spec is known to run it, unparsed.
    view.put_job(body)
    view.mark_applied(body, ftj)
    assert view.unapplied_changes(view.job("team-a", "flowers", FTJ_UID), ftj) == []
    assert len(parsed) == 3


def test_memory_is_released_after_objects_are_forgotten_and_only_then():
    async def scenario():
        view = ClusterView()
        view.put_finetunejob(finetunejob())
        view.put_job(job())
        released = []
        trim = asyncio.create_task(memory_trim_loop(view, None, interval=0.01,
                                                    release=lambda: released.append(1)))
        await asyncio.sleep(0.05)
        assert released == []  # nothing deleted, nothing to release
        view.forget("team-a", "flowers")
        view.put_job(job(), deleted=True)
        await asyncio.sleep(0.05)
        assert released == [1]  # once for both
        view.forget("team-a", "flowers")  # already gone: nothing new
        await asyncio.sleep(0.05)
        assert released == [1]
        trim.cancel()

    asyncio.run(scenario())
    assert release_freed_memory() in (True, False)
