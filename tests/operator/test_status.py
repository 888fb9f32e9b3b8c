from datetime import datetime, timedelta, timezone

from finetune_api import contract
from finetune_operator.config import OperatorConfig
from finetune_operator.status import derive_status, set_condition

from operator_factories import (finetunejob, job, job_condition, pod, running_state,
                                terminated_state)

NOW = datetime(2026, 11, 28, 10, 10, tzinfo=timezone.utc)
CREATED = {"phase": "Pending", "jobName": "flowers-trainer"}


def conditions(update):
    return {c["type"]: c for c in update.patch.get("conditions", [])}


def unschedulable(message):
    return [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": message}]


def test_before_the_job_exists_the_job_is_pending():
    update = derive_status(finetunejob(), None, [], NOW)
    assert update.patch["phase"] == "Pending"
    # The first status of a job that has not started is no news: no Event, one write less.
    assert update.event is None


def test_job_without_pods_yet_is_pending():
    update = derive_status(finetunejob(status=CREATED), job(), [], NOW)
    assert update.new_phase == "Pending"
    assert conditions(update)["Running"]["status"] == "False"


def test_unschedulable_pod_queues_the_job_with_the_scheduler_message():
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    update = derive_status(finetunejob(status=CREATED), job(),
                           [pod(conditions=unschedulable(message))], NOW)
    assert update.patch["phase"] == "Queued"
    running = conditions(update)["Running"]
    assert (running["status"], running["reason"], running["message"]) == \
        ("False", "Unschedulable", message)
    assert update.event == ("Normal", "Queued", message)


def test_job_suspended_by_the_user_is_suspended():
    update = derive_status(finetunejob(status=CREATED, suspend=True), job(suspend=True), [], NOW)
    assert update.patch["phase"] == "Suspended"
    assert conditions(update)["Suspended"]["status"] == "True"
    assert "checkpoint" in conditions(update)["Suspended"]["message"]


def test_job_held_by_kueue_is_queued():
    update = derive_status(finetunejob(status=CREATED, queueName="gpus"), job(suspend=True), [],
                           NOW)
    assert update.patch["phase"] == "Queued"
    assert conditions(update)["Running"]["reason"] == "WaitingForAdmission"
    assert "gpus" in conditions(update)["Running"]["message"]


def test_running_pod_makes_the_job_running():
    update = derive_status(finetunejob(status=CREATED), job(startTime="2026-11-28T10:00:06Z"),
                           [pod(phase="Running", state=running_state(), pod_ip="127.0.0.5")],
                           NOW)
    assert update.patch["phase"] == "Running"
    assert update.patch["startTime"] == "2026-11-28T10:00:06Z"
    assert update.patch["attempts"] == 1
    assert conditions(update)["Running"]["status"] == "True"
    assert update.event[:2] == ("Normal", "Running")


def completed_with(message: str):
    """The status of a running job whose Job completed and whose pod left this message."""
    done = pod(phase="Succeeded", state=terminated_state(0, message, reason="Completed"))
    return derive_status(
        finetunejob(status={**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z"}),
        job(conditions=[job_condition("Complete")], completionTime="2026-11-28T10:09:00Z",
            succeeded=1),
        [done], NOW)


def test_success_reports_accuracy_outputs_and_strategy_from_the_termination_message():
    message = contract.termination_message(
        valAccuracy=0.91, bestValAccuracy=0.93, strategy="FineTune",
        strategyReason="enough images per class", modelUri="s3://models/flowers/model.safetensors",
        reportUri="s3://models/flowers/report.json", epochs=10,
        checkpoint={"uri": "s3://models/flowers/checkpoints/epoch-0010.pt", "epoch": 10,
                    "step": 0, "time": "2026-11-28T10:08:55.5+00:00"})
    update = completed_with(message)
    patch = update.patch
    # The final checkpoint, written after the operator's last reading of the trainer's metrics.
    assert patch["lastCheckpoint"] == {"uri": "s3://models/flowers/checkpoints/", "epoch": 10,
                                       "step": 0, "time": "2026-11-28T10:08:55Z"}
    assert patch["phase"] == "Succeeded"
    assert patch["metrics"] == {"valAccuracy": 0.91, "bestValAccuracy": 0.93}
    assert patch["output"] == {"modelUri": "s3://models/flowers/model.safetensors",
                               "reportUri": "s3://models/flowers/report.json"}
    assert patch["resolvedStrategy"] == "FineTune"
    assert patch["strategyReason"] == "enough images per class"
    assert patch["completionTime"] == "2026-11-28T10:09:00Z"
    assert patch["progress"]["epochProgress"] == "10/10"
    assert conditions(update)["Succeeded"]["status"] == "True"
    assert conditions(update)["Running"]["status"] == "False"
    assert update.event[:2] == ("Normal", "Succeeded")


def test_a_linear_probe_shows_its_one_planned_pass_not_spec_epochs():
    message = contract.termination_message(valAccuracy=0.73, strategy="LinearProbe",
                                           epochs=1, plannedEpochs=1)
    update = completed_with(message)
    assert update.patch["progress"]["epochProgress"] == "1/1"


def test_do_not_retry_exit_code_fails_with_the_trainers_cause():
    message = contract.termination_message(reason="InvalidData", field="spec.dataset.uri",
                                           message="found 1 class (cats); need at least 2")
    failed = pod(phase="Failed", state=terminated_state(int(contract.ExitCode.INVALID_DATA),
                                                        message))
    update = derive_status(
        finetunejob(status={**CREATED, "phase": "Running"}),
        job(conditions=[job_condition("Failed", "PodFailurePolicy",
                                      "Container trainer for pod x failed with exit code 3")],
            failed=1),
        [failed], NOW)
    assert update.patch["phase"] == "Failed"
    assert update.patch["failure"] == {
        "reason": "InvalidData", "exitCode": 3,
        "message": "spec.dataset.uri: found 1 class (cats); need at least 2"}
    assert conditions(update)["Failed"]["reason"] == "InvalidData"
    assert update.event[0] == "Warning"


def test_an_output_another_job_owns_fails_at_once_as_output_in_use():
    code = int(contract.ExitCode.OUTPUT_IN_USE)
    assert code in contract.NON_RETRYABLE_EXIT_CODES  # podFailurePolicy: FailJob, no retry
    said = contract.termination_message(
        reason="OutputInUse", field="spec.output.uri",
        message="s3://out/ belongs to FineTuneJob team-a/flowers (uid u-1)")
    for message in (said, ""):  # the reason also follows from the exit code alone
        failed = pod(phase="Failed", state=terminated_state(code, message))
        update = derive_status(
            finetunejob(status={**CREATED, "phase": "Running"}),
            job(conditions=[job_condition("Failed", "PodFailurePolicy")], failed=1), [failed],
            NOW)
        assert update.patch["phase"] == "Failed"
        assert update.patch["failure"]["reason"] == "OutputInUse"
        assert conditions(update)["Failed"]["reason"] == "OutputInUse"
        if message:
            assert "team-a/flowers (uid u-1)" in update.patch["failure"]["message"]


def test_failure_target_counts_as_failed_before_the_pods_are_gone():
    failed = pod(phase="Failed", state=terminated_state(4, contract.termination_message(
        reason="AccessDenied", message="bucket datasets: access denied")))
    update = derive_status(finetunejob(status=CREATED),
                           job(conditions=[job_condition("FailureTarget", "PodFailurePolicy")]),
                           [failed], NOW)
    assert update.patch["failure"]["reason"] == "AccessDenied"


def test_backoff_limit_exceeded_names_the_last_failure():
    pods = [pod(name=f"p{i}", phase="Failed",
                state=terminated_state(1, "Traceback ...\nRuntimeError: CUDA error",
                                       finished=f"2026-11-28T10:0{i}:00Z")) for i in range(4)]
    update = derive_status(finetunejob(status=CREATED, backoffLimit=3),
                           job(conditions=[job_condition("Failed", "BackoffLimitExceeded")],
                               failed=4), pods, NOW)
    failure = update.patch["failure"]
    assert failure["reason"] == "BackoffLimitExceeded"
    assert failure["exitCode"] == 1
    assert "failed 4 times" in failure["message"]
    assert "RuntimeError: CUDA error" in failure["message"]
    assert update.patch["attempts"] == 4


def test_oom_kills_report_oomkilled():
    pods = [pod(phase="Failed", state=terminated_state(137, "", reason="OOMKilled"))]
    update = derive_status(finetunejob(status=CREATED, backoffLimit=0),
                           job(conditions=[job_condition("Failed", "BackoffLimitExceeded")],
                               backoff_limit=0), pods, NOW)
    assert update.patch["failure"]["reason"] == "OOMKilled"
    assert "memory" in update.patch["failure"]["message"]


def test_deadline_exceeded():
    update = derive_status(finetunejob(status=CREATED, activeDeadlineSeconds=60),
                           job(conditions=[job_condition("Failed", "DeadlineExceeded",
                                                         "Job was active longer than specified")]),
                           [], NOW)
    assert update.patch["failure"]["reason"] == "DeadlineExceeded"
    assert "60" in update.patch["failure"]["message"]


def pull_error(reason="ErrImagePull"):
    return {"waiting": {"reason": reason,
                        "message": 'Back-off pulling image "registry.local/nope:1"'}}


def test_an_image_pull_error_is_waited_out_for_the_grace_then_fails_and_stops_the_job():
    first = derive_status(finetunejob(status=CREATED), job(), [pod(state=pull_error())], NOW)
    assert first.new_phase == "Pending" and not first.stop_job
    assert first.patch["startError"] == {
        "reason": "ErrImagePull", "message": 'Back-off pulling image "registry.local/nope:1"',
        "since": "2026-11-28T10:10:00Z"}
    running = conditions(first)["Running"]
    assert running["reason"] == "ErrImagePull"
    assert "registry.local/nope:1" in running["message"]
    assert "fails at 2026-11-28T10:15:00Z" in running["message"]  # the default grace: 300 s
    # Later (the kubelet backing off), and after an operator restart: the clock runs from the
    # first sight, kept in status.
    seen = {**CREATED, **first.patch}
    later = derive_status(finetunejob(status=seen), job(), [pod(state=pull_error(
        "ImagePullBackOff"))], NOW + timedelta(seconds=299))
    assert later.new_phase == "Pending" and not later.stop_job
    assert later.patch["startError"]["since"] == "2026-11-28T10:10:00Z"
    assert later.patch["startError"]["reason"] == "ImagePullBackOff"
    overdue = derive_status(finetunejob(status={**seen, **later.patch}), job(),
                            [pod(state=pull_error("ImagePullBackOff"))],
                            NOW + timedelta(seconds=300))
    assert overdue.patch["phase"] == "Failed" and overdue.stop_job
    assert overdue.patch["failure"]["reason"] == "ImagePullBackOff"
    assert "registry.local/nope:1" in overdue.patch["failure"]["message"]
    assert "300 s" in overdue.patch["failure"]["message"]
    assert overdue.patch["startError"] is None


def test_a_missing_secret_created_within_the_grace_lets_the_job_run():
    waiting = {"waiting": {"reason": "CreateContainerConfigError",
                           "message": 'secret "s3-creds" not found'}}
    first = derive_status(finetunejob(status=CREATED), job(), [pod(state=waiting)], NOW)
    assert first.new_phase == "Pending" and not first.stop_job
    assert first.patch["startError"]["reason"] == "CreateContainerConfigError"
    assert 'secret "s3-creds" not found' in conditions(first)["Running"]["message"]
    started = derive_status(finetunejob(status={**CREATED, **first.patch}), job(active=1),
                            [pod(phase="Running", state=running_state())],
                            NOW + timedelta(seconds=20))
    assert started.new_phase == "Running"
    assert started.patch["startError"] is None  # merge patch: removed


def test_the_start_error_grace_is_the_operators():
    waiting = {"waiting": {"reason": "CreateContainerConfigError",
                           "message": 'secret "s3-creds" not found'}}
    at_once = derive_status(finetunejob(status=CREATED), job(), [pod(state=waiting)], NOW,
                            config=OperatorConfig(start_error_grace_seconds=0))
    assert at_once.patch["failure"]["reason"] == "CreateContainerConfigError"
    assert at_once.stop_job
    short = OperatorConfig(start_error_grace_seconds=20)
    first = derive_status(finetunejob(status=CREATED), job(), [pod(state=waiting)], NOW,
                          config=short)
    assert "fails at 2026-11-28T10:10:20Z" in conditions(first)["Running"]["message"]


def test_an_invalid_image_name_fails_at_once():
    waiting = {"waiting": {"reason": "InvalidImageName",
                           "message": 'invalid reference format: "Registry/UPPER:1"'}}
    update = derive_status(finetunejob(status=CREATED), job(), [pod(state=waiting)], NOW)
    assert update.patch["failure"]["reason"] == "InvalidImageName"
    assert update.stop_job


def test_ordinary_waiting_is_still_pending():
    waiting = {"waiting": {"reason": "ContainerCreating"}}
    update = derive_status(finetunejob(status=CREATED), job(), [pod(state=waiting)], NOW)
    assert update.new_phase == "Pending" and not update.stop_job


def test_between_retries_the_job_stays_running_with_the_cause():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z", "attempts": 1}
    crashed = pod(phase="Failed", state=terminated_state(10, contract.termination_message(
        reason="TransientError", message="S3 endpoint unreachable")))
    update = derive_status(finetunejob(status=status), job(failed=1, active=1), [crashed], NOW)
    assert update.new_phase == "Running"
    running = conditions(update)["Running"]
    assert running["reason"] == "Retrying" and "S3 endpoint unreachable" in running["message"]
    assert update.event is None


def test_attempts_include_pods_already_deleted():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z", "attempts": 1}
    replacement = pod(name="b", phase="Running", state=running_state())
    update = derive_status(finetunejob(status=status), job(active=1), [replacement], NOW,
                           pods_started=2)
    assert update.patch["attempts"] == 2


def test_a_disrupted_pod_is_replaced_and_counted_as_an_attempt():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z", "attempts": 1}
    evicted = pod(name="a", phase="Failed", state=terminated_state(143, ""),
                  conditions=[{"type": "DisruptionTarget", "status": "True"}])
    replacement = pod(name="b", phase="Running", state=running_state(), pod_ip="127.0.0.9")
    update = derive_status(finetunejob(status=status), job(active=1), [evicted, replacement], NOW)
    assert update.new_phase == "Running"
    assert update.patch["attempts"] == 2
    assert "attempt 2" in conditions(update)["Running"]["message"]


def test_deleted_job_of_an_unfinished_job_is_reported_not_recreated():
    update = derive_status(finetunejob(status={**CREATED, "phase": "Running"}), None, [], NOW)
    assert update.patch["phase"] == "Failed"
    assert update.patch["failure"]["reason"] == "JobDeleted"


def test_finished_jobs_stay_finished():
    done = {**CREATED, "phase": "Succeeded", "metrics": {"valAccuracy": 0.9},
            "output": {"modelUri": "s3://m/model.safetensors"}}
    for job_now, pods in ((None, []), (job(), [pod(phase="Running", state=running_state())])):
        update = derive_status(finetunejob(status=done), job_now, pods, NOW)
        assert update.patch == {} and update.event is None and not update.transitioned


def test_a_late_termination_message_fills_in_a_finished_job():
    succeeded = {**CREATED, "phase": "Succeeded"}
    message = contract.termination_message(valAccuracy=0.8, bestValAccuracy=0.85,
                                           modelUri="s3://m/model.safetensors",
                                           reportUri="s3://m/report.json", strategy="LinearProbe")
    update = derive_status(finetunejob(status=succeeded),
                           job(conditions=[job_condition("Complete")]),
                           [pod(phase="Succeeded", state=terminated_state(0, message))], NOW)
    assert update.patch["metrics"]["valAccuracy"] == 0.8
    assert update.patch["output"]["reportUri"] == "s3://m/report.json"
    assert "phase" not in update.patch and update.event is None


def test_condition_transition_time_moves_only_when_status_flips():
    earlier = NOW - timedelta(minutes=5)
    first = set_condition([], "Running", True, "TrainerRunning", "a", 1, earlier)
    same = set_condition(first, "Running", True, "TrainerRunning", "b", 2, NOW)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["message"] == "b" and same[0]["observedGeneration"] == 2
    flipped = set_condition(same, "Running", False, "Completed", "c", 2, NOW)
    assert flipped[0]["lastTransitionTime"] == "2026-11-28T10:10:00Z"


def test_no_patch_when_nothing_changed():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z"}
    pods = [pod(phase="Running", state=running_state())]
    first = derive_status(finetunejob(status=status), job(), pods, NOW)
    settled = {**status, **first.patch}
    again = derive_status(finetunejob(status=settled), job(), pods, NOW + timedelta(seconds=30))
    assert again.patch == {} and again.event is None


def test_a_pod_being_replaced_or_finishing_does_not_send_a_running_job_back_to_pending():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z"}
    evicting = pod(phase="Running", state=running_state(), deleting=True)
    update = derive_status(finetunejob(status=status), job(active=1), [evicting], NOW)
    assert update.new_phase == "Running" and conditions(update)["Running"]["reason"] == "Restarting"
    finished = pod(phase="Succeeded", state=terminated_state(0, "{}", reason="Completed"))
    update = derive_status(finetunejob(status=status), job(), [finished], NOW)
    assert update.new_phase == "Running" and conditions(update)["Running"]["reason"] == "Completing"
    # Before the trainer ever ran, a pod that is not running yet is still Pending.
    update = derive_status(finetunejob(status=CREATED), job(), [pod()], NOW)
    assert update.new_phase == "Pending"


def test_several_workers_report_rank_zeros_result_and_count_group_attempts():
    # Only rank 0 (pod index 0) writes the termination message; index 1 may finish last.
    message = contract.termination_message(valAccuracy=0.8, epochs=2,
                                           reportUri="s3://models/flowers/report.json")
    rank_zero = pod("flowers-trainer-0-abcde", phase="Succeeded", state=terminated_state(
        0, message, reason="Completed", finished="2026-11-28T10:05:00Z"))
    rank_one = pod("flowers-trainer-1-fghij", phase="Succeeded", state=terminated_state(
        0, "", reason="Completed", finished="2026-11-28T10:05:02Z"))
    update = derive_status(
        finetunejob(status={**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z"},
                    resources={"gpus": 1, "workers": 2}),
        job(conditions=[job_condition("Complete")], succeeded=2, failed=2),
        [rank_zero, rank_one], NOW)
    assert update.patch["metrics"] == {"valAccuracy": 0.8}
    assert update.patch["output"] == {"reportUri": "s3://models/flowers/report.json"}
    # Four pods started: the group of two, twice.
    assert update.patch["attempts"] == 2


def test_a_graceful_stop_counts_a_preemption_updates_the_checkpoint_and_posts_an_event():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z", "attempts": 1,
              "lastCheckpoint": {"uri": "s3://models/flowers/checkpoints/", "epoch": 1,
                                 "step": 0, "time": "2026-11-28T10:03:00Z"}}
    said = {"reason": "Preempted", "message": "stopped on SIGTERM at epoch 2 step 5; checkpoint "
            "s3://models/flowers/checkpoints/epoch-0001-step-00005.pt",
            "checkpoint": {"uri": "s3://models/flowers/checkpoints/epoch-0001-step-00005.pt",
                           "epoch": 1, "step": 5, "time": "2026-11-28T10:04:59.123+00:00"},
            "finishedAt": "2026-11-28T10:05:00Z"}
    stopped = pod(name="a", phase="Failed", state=terminated_state(
        int(contract.ExitCode.PREEMPTED), contract.termination_message(**said)))
    update = derive_status(finetunejob(status=status), job(active=0), [stopped], NOW,
                           preempted=[said])
    assert update.new_phase == "Running"
    assert update.patch["preemptions"] == 1
    assert update.patch["lastCheckpoint"] == {"uri": "s3://models/flowers/checkpoints/",
                                              "epoch": 1, "step": 5,
                                              "time": "2026-11-28T10:04:59Z"}
    assert update.notices == [("Normal", "Preempted", f"preemption 1: {said['message']}")]
    assert "Preempted" in conditions(update)["Running"]["message"]
    # Seen again (another watch event): counted once, no second Event.
    again = derive_status(finetunejob(status={**status, **update.patch}), job(active=0),
                          [stopped], NOW, preempted=[said])
    assert "preemptions" not in again.patch and again.notices == []


def test_a_two_worker_group_stopping_together_is_one_preemption():
    status = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z", "attempts": 1}
    said = {"reason": "Preempted", "message": "stopped", "finishedAt": "2026-11-28T10:05:00Z"}
    update = derive_status(finetunejob(status=status, resources={"workers": 2}), job(active=0),
                           [], NOW, preempted=[said, said])
    assert update.patch["preemptions"] == 1


DISK_PRESSURE = ("The node was low on resource: ephemeral-storage. Threshold quantity: 10Gi, "
                 "available: 9Gi. Container trainer was using 31Gi, request is 20Gi, has larger "
                 "consumption of ephemeral-storage.")
RUNNING_STATUS = {**CREATED, "phase": "Running", "startTime": "2026-11-28T10:00:06Z",
                  "attempts": 1}


def evicted(name, at, by_kubelet=True):
    """A pod the kubelet evicted (its message on the pod) or the Eviction API (on the
    condition)."""
    condition = {"type": "DisruptionTarget", "status": "True", "lastTransitionTime": at,
                 "reason": "TerminationByKubelet" if by_kubelet else "EvictionByEvictionAPI",
                 "message": "" if by_kubelet else "Eviction API: evicting"}
    evicted_pod = pod(name=name, phase="Failed", state=terminated_state(137, reason="Error"),
                      conditions=[condition])
    if by_kubelet:
        evicted_pod["status"].update({"reason": "Evicted", "message": DISK_PRESSURE})
    return evicted_pod


def test_each_disruption_is_counted_once_with_its_message_and_retried_up_to_the_limit():
    first = derive_status(finetunejob(status=RUNNING_STATUS), job(active=0),
                          [evicted("a", "2026-11-28T10:05:00Z")], NOW)
    assert first.new_phase == "Running" and not first.stop_job
    assert first.patch["disruptions"] == 1
    assert first.patch["lastDisruption"] == {
        "time": "2026-11-28T10:05:00Z", "pod": "a", "reason": "TerminationByKubelet",
        "message": DISK_PRESSURE}
    assert first.notices == [("Warning", "Disrupted",
                              f"disruption 1: pod a (TerminationByKubelet): {DISK_PRESSURE}")]
    # Seen again: not counted again.
    status = {**RUNNING_STATUS, **first.patch}
    again = derive_status(finetunejob(status=status), job(active=1),
                          [evicted("a", "2026-11-28T10:05:00Z"),
                           pod(name="b", phase="Running", state=running_state())], NOW)
    assert "disruptions" not in again.patch and again.notices == []
    # An Eviction API eviction (a drain) has its message on the condition; the evicted pod is
    # gone by the time a later one is seen, but the count is in status.
    second = derive_status(finetunejob(status=status), job(active=0),
                           [evicted("b", "2026-11-28T10:08:00Z", by_kubelet=False)], NOW)
    assert second.new_phase == "Running"
    assert second.patch["disruptions"] == 2
    assert second.patch["lastDisruption"]["message"] == "Eviction API: evicting"


def test_past_the_limit_a_disrupted_job_fails_evicted_with_the_kubelets_message_and_stops():
    status = {**RUNNING_STATUS, "disruptions": 1, "lastDisruption": {
        "time": "2026-11-28T10:05:00Z", "pod": "a", "reason": "TerminationByKubelet",
        "message": DISK_PRESSURE}}
    one_allowed = OperatorConfig(max_disruptions=1)
    update = derive_status(finetunejob(status=status), job(active=0),
                           [evicted("b", "2026-11-28T10:08:00Z")], NOW, config=one_allowed)
    assert update.patch["phase"] == "Failed" and update.stop_job
    assert update.patch["disruptions"] == 2
    assert update.patch["failure"]["reason"] == "Evicted"
    assert DISK_PRESSURE in update.patch["failure"]["message"]
    assert "2 times" in update.patch["failure"]["message"]
    assert conditions(update)["Failed"]["reason"] == "Evicted"
    # Within the limit the same observation is a retry.
    within = derive_status(finetunejob(status=status), job(active=0),
                           [evicted("b", "2026-11-28T10:08:00Z")], NOW,
                           config=OperatorConfig(max_disruptions=2))
    assert within.new_phase == "Running" and not within.stop_job


def test_a_disruption_whose_pod_is_gone_is_counted_from_what_the_view_remembers():
    # The refresh that saw the evicted pod failed; when it is retried the pod is deleted.
    remembered = {"time": "2026-11-28T10:05:00Z", "pod": "a", "reason": "EvictionByEvictionAPI",
                  "message": "Eviction API: evicting"}
    update = derive_status(finetunejob(status=RUNNING_STATUS), job(active=0), [], NOW,
                           disrupted=[remembered])
    assert update.patch["disruptions"] == 1
    assert update.patch["lastDisruption"] == remembered
    # The same pod both remembered and still listed counts once.
    status = {**RUNNING_STATUS, **update.patch}
    again = derive_status(finetunejob(status=RUNNING_STATUS), job(active=0),
                          [evicted("a", "2026-11-28T10:05:00Z", by_kubelet=False)], NOW,
                          disrupted=[remembered])
    assert again.patch["disruptions"] == 1
    later = derive_status(finetunejob(status=status), job(active=0), [], NOW,
                          disrupted=[remembered])
    assert "disruptions" not in later.patch


def test_pods_of_a_group_disrupted_in_the_same_second_count_once():
    update = derive_status(finetunejob(status=RUNNING_STATUS, resources={"workers": 2}),
                           job(active=0), [evicted("a", "2026-11-28T10:05:00Z"),
                                           evicted("b", "2026-11-28T10:05:00Z")], NOW)
    assert update.patch["disruptions"] == 1


def test_a_graceful_stop_without_a_disruption_is_not_a_disruption():
    # kubectl delete pod, a suspend: SIGTERM and exit 11, but no DisruptionTarget condition.
    stopped = pod(name="a", phase="Failed", state=terminated_state(
        int(contract.ExitCode.PREEMPTED), contract.termination_message(reason="Preempted")))
    update = derive_status(finetunejob(status=RUNNING_STATUS), job(active=0), [stopped], NOW)
    assert "disruptions" not in update.patch
