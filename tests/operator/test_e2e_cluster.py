"""The operator end to end on the local cluster: real API server (RBAC, CEL, the Job and garbage
collector controllers, the scheduler), a real kubelet running the trainer's pods in containers from
the project's image, versitygw S3. The operator runs as the Helm chart's Deployment from its image,
with the chart's RBAC only (chart_operator)."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from finetune_api.validation import SpecError, validate_manifest
from finetune_operator import builders
from finetune_operator.config import OperatorConfig

from e2e_support import (SECRET, apply, condition, events, finetunejob,
                         ftj, get, graceful_stop, objects, s3_json, s3_keys, s3_secret, status,
                         wait_checkpoint, wait_for, wait_phase)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


# A job the test interrupts (eviction, suspension, an operator restart) and that must then finish
# by itself: slowed on purpose by a CPU limit the kernel enforces, so that its 12 epochs leave the
# test many epochs of margin after the first checkpoint on any machine.
INTERRUPTIBLE = {"epochs": 12, "resources": {"gpus": 0, "cpu": "250m"},
                 "model": {"backbone": "test_resnet", "weights": "None", "imageSize": 64}}
# Stopped mid-epoch: batches of 4, so that an epoch of the 100 images is 25 optimizer steps.
# backoffLimit 0: the stopped pod's exit must not count as a failure, or the job fails.
PREEMPTIBLE = {**INTERRUPTIBLE, "epochs": 6, "batchSize": 4, "backoffLimit": 0}


# --- tests ------------------------------------------------------------------------------

def test_example_succeeds_with_accuracy_in_kubectl_and_the_model_in_s3(
        kubectl, namespace, ftj_operator, datasets, s3_client, cluster_env):
    # The example's output prefix is fixed: another namespace's run of it (the chart's test, an
    # earlier session on the same cluster) holds it, and the trainer would refuse it.
    s3_client.delete_object(Bucket="models", Key="fashion-mnist/.finetune-owner.json")
    kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "fashion-mnist.yaml"))
    wait_phase(kubectl, namespace, "fashion-mnist", "Succeeded", "Failed", timeout=600)
    # What a user (or a CI pipeline) waits on:
    kubectl("wait", "-n", namespace, "--for=condition=Succeeded", "ftj/fashion-mnist",
            "--timeout=30s")
    current = status(kubectl, namespace, "fashion-mnist")
    assert current["phase"] == "Succeeded"
    assert 0.0 <= current["metrics"]["valAccuracy"] <= 1.0
    assert current["resolvedStrategy"] == "FineTune"
    assert current["progress"]["epochProgress"] == "2/2"
    assert current["completionTime"] >= current["startTime"]
    row = kubectl("get", "ftj", "fashion-mnist", "-n", namespace, "--no-headers").split()
    assert row[1] == "Succeeded" and row[2] == "resnet18" and row[3] == "FineTune"
    assert row[4] == "2/2" and 0.0 <= float(row[5]) <= 1.0
    assert row[6][-1] in "smhd" and row[6][:-1].isdigit()  # CHECKPOINTED: the final one's age
    model_uri = current["output"]["modelUri"]
    assert model_uri.startswith("s3://models/fashion-mnist/")
    assert model_uri.removeprefix("s3://models/") in s3_keys(s3_client, "s3://models/fashion-mnist/")
    report = s3_json(s3_client, current["output"]["reportUri"])
    assert report["valAccuracy"] == current["metrics"]["valAccuracy"]

    # Scheduled as a GPU pod, owned through the Job, with the spec from its annotation.
    job, = objects(kubectl, "jobs", namespace)
    assert job["metadata"]["ownerReferences"][0]["uid"] == ftj(kubectl, namespace,
                                                                "fashion-mnist")["metadata"]["uid"]
    pod, = objects(kubectl, "pods", namespace)
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # ... on the real node, in a container of the project's trainer image.
    assert pod["spec"]["nodeName"] == cluster_env["FINETUNE_NODE_NAME"]
    trainer, = pod["status"]["containerStatuses"]
    assert trainer["image"].endswith(cluster_env["FINETUNE_TRAINER_IMAGE"].split("/", 1)[1])
    assert trainer["containerID"].startswith("containerd://")
    assert trainer["state"]["terminated"]["exitCode"] == 0
    # Nothing a GitOps tool owns was written: no finalizers, no operator annotations.
    meta = ftj(kubectl, namespace, "fashion-mnist")["metadata"]
    assert not meta.get("finalizers")
    assert set(meta.get("annotations") or {}) <= {"kubectl.kubernetes.io/last-applied-configuration"}
    assert {e["reason"] for e in events(kubectl, namespace, "fashion-mnist")} >= {"Succeeded"}
    assert ftj_operator.metric("finetune_operator_jobs", phase="Succeeded") == 1
    assert ftj_operator.metric("finetune_operator_job_creation_latency_seconds_count") == 1
    assert ftj_operator.metric("finetune_operator_time_to_running_seconds_count") == 1


INVALID = sorted((EXAMPLES / "invalid").glob("*.yaml"))


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifests_are_rejected_by_the_api_server_naming_the_field(kubectl, namespace,
                                                                          path):
    field = path.read_text().splitlines()[0].removeprefix("# expect: ").strip()
    with pytest.raises(AssertionError) as refused:
        kubectl("apply", "-n", namespace, "-f", str(path))
    assert field in str(refused.value), str(refused.value)
    assert "Invalid" in str(refused.value)
    with pytest.raises(SpecError) as local:  # the local validator refuses it too
        validate_manifest(yaml.safe_load(path.read_text()))
    leaf = field.rpartition(".")[2]
    assert any(leaf in problem for problem in local.value.problems)
    assert ftj(kubectl, namespace, "invalid") is None


def test_immutable_fields_are_refused_on_update(kubectl, namespace, datasets):
    manifest = finetunejob("immutable", namespace, datasets["fashion-mnist"], suspend=True)
    apply(kubectl, manifest)
    manifest["spec"]["model"]["backbone"] = "resnet50"
    with pytest.raises(AssertionError, match=r"spec\.model.*immutable"):
        apply(kubectl, manifest)
    manifest["spec"]["model"]["backbone"] = "test_resnet"
    manifest["spec"]["backoffLimit"] = 1  # mutable
    apply(kubectl, manifest)


def test_unschedulable_gpu_request_is_queued_with_the_schedulers_reason(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("big", namespace, datasets["fashion-mnist"],
                               resources={"gpus": 16}))
    current = wait_phase(kubectl, namespace, "big", "Queued", timeout=60)
    running = condition(current, "Running")
    assert running["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in running["message"]
    assert ftj_operator.metric("finetune_operator_jobs", phase="Queued") == 1


def test_do_not_retry_exit_code_fails_at_once_with_the_trainers_cause(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("one-class", namespace, datasets["one-class"], backoffLimit=3))
    current = wait_phase(kubectl, namespace, "one-class", "Failed", timeout=240)
    assert current["failure"]["reason"] == "InvalidData"
    assert current["failure"]["exitCode"] == 3
    assert "class" in current["failure"]["message"]
    assert condition(current, "Failed")["status"] == "True"
    job, = objects(kubectl, "jobs", namespace)
    assert any(c["reason"] == "PodFailurePolicy" for c in job["status"].get("conditions", []))
    assert len(objects(kubectl, "pods", namespace)) == 1  # not retried
    assert current["attempts"] == 1
    assert "Warning" in {e["type"] for e in events(kubectl, namespace, "one-class")}


def test_missing_secret_fails_with_a_clear_reason_and_no_cross_namespace_access(
        kubectl, namespace, operator_factory, datasets, cluster_env, api_client):
    from kubernetes import client

    other = f"{namespace[:50]}-b"
    client.CoreV1Api(api_client).create_namespace(client.V1Namespace(
        metadata=client.V1ObjectMeta(name=other, labels={"finetune.dev/test": "true"})))
    try:
        wait_for(lambda: get(kubectl, "serviceaccount", "default", other), timeout=30)
        s3_secret(kubectl, namespace, cluster_env)  # the Secret exists in namespace A only
        # A short start-error grace: the Secret will never appear in namespace B.
        operator_factory([namespace, other], FINETUNE_START_ERROR_GRACE_SECONDS="5").wait_leader()
        apply(kubectl, finetunejob("borrower", other, datasets["fashion-mnist"]))
        current = wait_phase(kubectl, other, "borrower", "Failed", timeout=120)
        assert current["failure"]["reason"] == "CreateContainerConfigError"
        assert SECRET in current["failure"]["message"]
        # Stopped, not left retrying: the Job is suspended and its pod gone.
        wait_for(lambda: not objects(kubectl, "pods", other), timeout=60, message="pods gone")
        job, = objects(kubectl, "jobs", other)
        assert job["spec"]["suspend"] is True
    finally:
        kubectl("delete", "namespace", other, "--wait=false", check=False)


def evict(api_client, pod: dict) -> None:
    """The Eviction API, as a node drain uses it."""
    from kubernetes import client

    meta = pod["metadata"]
    client.CoreV1Api(api_client).create_namespaced_pod_eviction(
        meta["name"], meta["namespace"], client.V1Eviction(metadata=client.V1ObjectMeta(
            name=meta["name"], namespace=meta["namespace"])))


@pytest.mark.parametrize("how", ["evicted", "deleted"])
def test_a_pod_stopped_mid_epoch_checkpoints_its_step_and_the_job_resumes_there(
        how, kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client, api_client):
    s3_secret(kubectl, namespace, cluster_env)
    manifest = finetunejob(how, namespace, datasets["fashion-mnist"], **PREEMPTIBLE)
    apply(kubectl, manifest)
    wait_phase(kubectl, namespace, how, "Running", timeout=120)
    wait_checkpoint(s3_client, manifest["spec"]["output"]["uri"])
    pod, = objects(kubectl, "pods", namespace)
    stopped_at = time.time()
    if how == "evicted":  # as a node drain or a preemption does it
        evict(api_client, pod)
    else:
        kubectl("delete", "pod", pod["metadata"]["name"], "-n", namespace, "--wait=false")
    checkpoint = graceful_stop(kubectl, namespace, how)
    key = manifest["spec"]["output"]["uri"].removeprefix("s3://models/") + \
        "checkpoints/" + checkpoint["file"]
    written = s3_client.head_object(Bucket="models", Key=key)["LastModified"].timestamp()
    grace = 60  # spec.checkpoint.preemptionGraceSeconds' default
    print(f"{how}: SIGTERM at epoch {checkpoint['epoch'] + 1} step {checkpoint['step']}; "
          f"its checkpoint complete {written - stopped_at:.1f} s after the request")
    assert written - stopped_at < grace + 1  # LastModified has whole seconds

    current = wait_phase(kubectl, namespace, how, "Succeeded", "Failed", timeout=600)
    assert current["phase"] == "Succeeded", current
    assert current["attempts"] >= 2 and current["preemptions"] >= 1
    report = s3_json(s3_client, current["output"]["reportUri"])
    assert report["resumedFrom"] == {"epoch": checkpoint["epoch"], "step": checkpoint["step"]}
    steps_per_epoch = report["dataset"]["trainImages"] // PREEMPTIBLE["batchSize"]
    assert report["optimizerSteps"] == PREEMPTIBLE["epochs"] * steps_per_epoch
    assert [h["epoch"] for h in report["history"]] == list(range(1, PREEMPTIBLE["epochs"] + 1))
    job, = objects(kubectl, "jobs", namespace)
    assert job["status"].get("failed", 0) == 0  # the policy ignored the stop: not a failure
    assert job["metadata"]["annotations"]["finetune.dev/last-checkpoint-time"] == \
        current["lastCheckpoint"]["time"]
    assert current["lastCheckpoint"]["epoch"] == PREEMPTIBLE["epochs"]


def node(kubectl, name: str) -> dict:
    return json.loads(kubectl("get", "node", name, "-o", "json"))


def node_ready(kubectl, name: str) -> str:
    conditions = node(kubectl, name)["status"].get("conditions") or []
    return next((c["status"] for c in conditions if c["type"] == "Ready"), "Unknown")


def test_a_node_that_stops_answering_strands_the_trainer_until_it_is_back_then_it_resumes(
        kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client):
    """The kubelet frozen (SIGSTOP), as a node that loses its network or hangs: no SIGTERM
    reaches the trainer. The node lifecycle controller marks the node NotReady, taints it, and
    the taint evicts the pod (tolerationSeconds 5 here, 300 by default); the pod stays
    Terminating while the node is away (podReplacementPolicy Failed: no second trainer writes
    the same checkpoints). When the node answers again the kubelet stops the pod, gracefully,
    and the job resumes at that step. The local cluster has one real node, so the replacement
    runs there. The job is endless: the container trains on while the kubelet is frozen."""
    s3_secret(kubectl, namespace, cluster_env)
    real_node = cluster_env["FINETUNE_NODE_NAME"]
    tolerations = [{"key": f"node.kubernetes.io/{taint}", "operator": "Exists",
                    "effect": "NoExecute", "tolerationSeconds": 5}
                   for taint in ("unreachable", "not-ready")]
    manifest = finetunejob("stranded", namespace, datasets["fashion-mnist"], **{
        **PREEMPTIBLE, "epochs": 10000,
        "resources": {**PREEMPTIBLE["resources"], "tolerations": tolerations}})
    apply(kubectl, manifest)
    wait_phase(kubectl, namespace, "stranded", "Running", timeout=120)
    wait_checkpoint(s3_client, manifest["spec"]["output"]["uri"])
    first, = objects(kubectl, "pods", namespace)
    kubelet = int((Path(cluster_env["FINETUNE_CLUSTER_DIR"]) / "pids" / "kubelet.pid")
                  .read_text())
    os.kill(kubelet, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        wait_for(lambda: node_ready(kubectl, real_node) != "True", timeout=180, interval=1,
                 message=f"node {real_node} NotReady")
        not_ready = time.monotonic() - frozen
        wait_for(lambda: get(kubectl, "pod", first["metadata"]["name"], namespace)["metadata"]
                 .get("deletionTimestamp"), timeout=120, interval=1,
                 message="the taint manager evicting the trainer pod")
        evicted = time.monotonic() - frozen
        # Stranded: Terminating, not replaced, while the node is away.
        time.sleep(5)
        assert len(objects(kubectl, "pods", namespace)) == 1
    finally:
        os.kill(kubelet, signal.SIGCONT)
    wait_for(lambda: node_ready(kubectl, real_node) == "True", timeout=120, interval=1,
             message=f"node {real_node} Ready again")
    back = time.monotonic() - frozen
    checkpoint = graceful_stop(kubectl, namespace, "stranded")

    def resumed_line():
        for pod in objects(kubectl, "pods", namespace):
            if pod["metadata"]["uid"] == first["metadata"]["uid"]:
                continue
            log = kubectl("logs", pod["metadata"]["name"], "-n", namespace, check=False)
            found = [line for line in log.splitlines() if "resumed from" in line]
            if found:
                return found[0]
        return None
    line = wait_for(resumed_line, timeout=300, interval=2, message="the replacement resuming")
    assert f"{checkpoint['file']}: {checkpoint['epoch']} of 10000 epochs and " \
           f"{checkpoint['step']} steps of the next done" in line, line
    current = status(kubectl, namespace, "stranded")
    assert current["phase"] == "Running" and current["preemptions"] == 1
    print(f"node away: NotReady after {not_ready:.0f} s, pod evicted after {evicted:.0f} s, "
          f"node back after {back:.0f} s; resumed at epoch {checkpoint['epoch'] + 1} step "
          f"{checkpoint['step']}")
    kubectl("delete", "finetunejob", "stranded", "-n", namespace, "--wait=false")
    # The node is schedulable again for the tests after this one.
    wait_for(lambda: not [t for t in node(kubectl, real_node)["spec"].get("taints") or []
                          if t["key"].startswith("node.kubernetes.io/")],
             timeout=120, interval=1, message="the node's unreachable taints removed")


def test_operator_restarted_mid_job_leaves_exactly_one_job_and_the_job_finishes(
        kubectl, namespace, operator_factory, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    operator = operator_factory([namespace]).wait_leader()
    apply(kubectl, finetunejob("restart", namespace, datasets["fashion-mnist"], **INTERRUPTIBLE))
    before = wait_phase(kubectl, namespace, "restart", "Running", timeout=180)
    first = operator.leader()["metadata"]["name"]
    operator.stop(force=True)  # killed, as on a node failure
    operator.start().wait_leader()
    assert operator.leader()["metadata"]["name"] != first
    current = wait_phase(kubectl, namespace, "restart", "Succeeded", timeout=420)
    assert current["startTime"] == before["startTime"]
    assert len(objects(kubectl, "jobs", namespace)) == 1
    assert len(objects(kubectl, "networkpolicies", namespace)) == 1
    assert operator.metric("finetune_operator_job_creation_latency_seconds_count") == 0


def test_an_existing_job_is_adopted_and_a_foreign_one_is_refused(
        kubectl, namespace, operator_factory, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    # As if an operator had crashed between creating the Job and recording it in status.
    apply(kubectl, finetunejob("adopted", namespace, datasets["fashion-mnist"], suspend=True))
    created = ftj(kubectl, namespace, "adopted")
    kubectl("create", "-f", "-", input=json.dumps(builders.build_trainer_job(
        created, OperatorConfig(trainer_image=cluster_env["FINETUNE_TRAINER_IMAGE"]))))
    # A Job of someone else's with the name the operator would use.
    apply(kubectl, {"apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": builders.trainer_job_name("squatted"),
                                 "namespace": namespace},
                    "spec": {"suspend": True, "template": {"spec": {
                        "restartPolicy": "Never",
                        "containers": [{"name": "c", "image": "busybox"}]}}}})
    apply(kubectl, finetunejob("squatted", namespace, datasets["fashion-mnist"], suspend=True))
    operator_factory([namespace]).wait_leader()
    adopted = wait_phase(kubectl, namespace, "adopted", "Suspended", timeout=60)
    assert adopted["jobName"] == "adopted-trainer"
    squatted = wait_phase(kubectl, namespace, "squatted", "Failed", timeout=60)
    assert squatted["failure"]["reason"] == "NameConflict"
    assert len(objects(kubectl, "jobs", namespace)) == 1  # ours; the foreign Job has no labels


def test_suspend_deletes_pods_keeps_the_checkpoint_and_resume_continues_from_it(
        kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client):
    s3_secret(kubectl, namespace, cluster_env)
    manifest = finetunejob("pausable", namespace, datasets["fashion-mnist"], **PREEMPTIBLE)
    apply(kubectl, manifest)
    wait_phase(kubectl, namespace, "pausable", "Running", timeout=120)
    wait_checkpoint(s3_client, manifest["spec"]["output"]["uri"])
    kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"suspend":true}}')
    current = wait_phase(kubectl, namespace, "pausable", "Suspended", timeout=60)
    assert condition(current, "Suspended")["status"] == "True"
    wait_for(lambda: not objects(kubectl, "pods", namespace), timeout=60, message="pods deleted")
    job, = objects(kubectl, "jobs", namespace)
    assert job["spec"]["suspend"] is True
    # The suspension took the graceful path: the trainer checkpointed the step it was at.
    checkpoint = graceful_stop(kubectl, namespace, "pausable")
    assert any(k.endswith(checkpoint["file"])
               for k in s3_keys(s3_client, manifest["spec"]["output"]["uri"]))
    kubectl("patch", "ftj", "pausable", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"suspend":false}}')
    current = wait_phase(kubectl, namespace, "pausable", "Succeeded", timeout=600)
    report = s3_json(s3_client, current["output"]["reportUri"])
    assert report["resumedFrom"] == {"epoch": checkpoint["epoch"], "step": checkpoint["step"]}
    assert report["optimizerSteps"] == PREEMPTIBLE["epochs"] * (
        report["dataset"]["trainImages"] // PREEMPTIBLE["batchSize"])
    assert condition(current, "Suspended")["status"] == "False"
    assert current["preemptions"] == 1


def test_spec_change_that_cannot_apply_is_reported_in_a_condition(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("changed", namespace, datasets["fashion-mnist"], suspend=True))
    wait_phase(kubectl, namespace, "changed", "Suspended", timeout=60)
    kubectl("patch", "ftj", "changed", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"batchSize":8,"backoffLimit":1}}')
    applied = wait_for(lambda: condition(status(kubectl, namespace, "changed"), "SpecApplied")
                       or None, timeout=60, message="the SpecApplied condition")
    assert applied["status"] == "False" and "spec.batchSize" in applied["message"]
    assert "backoffLimit" not in applied["message"]
    job, = objects(kubectl, "jobs", namespace)
    assert job["spec"]["backoffLimit"] == 1  # what can apply did
    assert "ChangeNotApplied" in {e["reason"] for e in events(kubectl, namespace, "changed")}


def test_deletion_removes_job_pods_and_policies_even_with_the_operator_down(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    # More epochs than the test waits for: it is deleted while running.
    apply(kubectl, finetunejob("doomed", namespace, datasets["fashion-mnist"], epochs=10000))
    wait_phase(kubectl, namespace, "doomed", "Running", timeout=120)
    assert objects(kubectl, "pods", namespace)
    shared, = objects(kubectl, "networkpolicies", namespace)  # the namespace's, owned by none
    assert not shared["metadata"].get("ownerReferences")
    ftj_operator.stop(force=True)
    kubectl("delete", "ftj", "doomed", "-n", namespace, "--timeout=20s")
    wait_for(lambda: not (objects(kubectl, "jobs", namespace) or objects(kubectl, "pods", namespace)),
             timeout=120, message="the Job and its pods to be garbage-collected")
    assert [p["metadata"]["uid"] for p in objects(kubectl, "networkpolicies", namespace)] == \
        [shared["metadata"]["uid"]]


def test_ttl_deletes_a_finished_job_once_and_never_recreates_it(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("short-lived", namespace, datasets["one-class"],
                               ttlSecondsAfterFinished=3))
    wait_phase(kubectl, namespace, "short-lived", "Failed", timeout=240)
    wait_for(lambda: ftj(kubectl, namespace, "short-lived") is None, timeout=30,
             message="the TTL to delete the FineTuneJob")
    wait_for(lambda: not objects(kubectl, "jobs", namespace), timeout=60,
             message="its Job to be garbage-collected")
    time.sleep(8)  # several TTL sweeps and resyncs later, nothing came back
    assert ftj(kubectl, namespace, "short-lived") is None
    assert not objects(kubectl, "jobs", namespace)


def test_deadline_exceeded(kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    # Far more epochs than fit in the deadline on any machine.
    apply(kubectl, finetunejob("slow", namespace, datasets["fashion-mnist"], epochs=10000,
                               activeDeadlineSeconds=8))
    current = wait_phase(kubectl, namespace, "slow", "Failed", timeout=120)
    assert current["failure"]["reason"] == "DeadlineExceeded"
    assert "activeDeadlineSeconds=8" in current["failure"]["message"]


def test_kueue_queue_name_creates_a_suspended_labelled_job_that_runs_once_admitted(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("queued", namespace, datasets["fashion-mnist"],
                               queueName="team-gpus"))
    current = wait_phase(kubectl, namespace, "queued", "Queued", timeout=60)
    assert condition(current, "Running")["reason"] == "WaitingForAdmission"
    job, = objects(kubectl, "jobs", namespace)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
    assert job["spec"]["suspend"] is True
    time.sleep(3)  # the operator does not unsuspend it by itself
    assert objects(kubectl, "jobs", namespace)[0]["spec"]["suspend"] is True
    # Admission, as Kueue does it.
    kubectl("patch", "job", job["metadata"]["name"], "-n", namespace, "--type=merge",
            "-p", '{"spec":{"suspend":false}}')
    wait_phase(kubectl, namespace, "queued", "Succeeded", timeout=300)


def test_progress_is_reported_while_running(kubectl, namespace, ftj_operator, datasets,
                                            cluster_env, trainer_metrics_url):
    s3_secret(kubectl, namespace, cluster_env)
    # More epochs than the test waits for: progress is read while it runs.
    apply(kubectl, finetunejob("watched", namespace, datasets["fashion-mnist"], epochs=10000))
    wait_phase(kubectl, namespace, "watched", "Running", timeout=120)
    pod, = objects(kubectl, "pods", namespace)
    served = wait_for(lambda: trainer_metrics_url(namespace, pod["metadata"]["name"]),
                      message="the trainer pod's metrics address")
    assert served.startswith(f"http://{objects(kubectl, 'pods', namespace)[0]['status']['podIP']}:")
    current = wait_for(lambda: (lambda s: s if s.get("progress", {}).get("epoch", 0) >= 1
                                else None)(status(kubectl, namespace, "watched")),
                       timeout=240, interval=1, message="progress in status")
    assert current["progress"]["totalEpochs"] == 10000
    assert current["progress"]["epochProgress"].endswith("/10000")
    # A few epochs of 10000: under one percent, and counted (not left at zero epochs).
    assert current["progress"]["epoch"] >= 1 and 0 <= current["progress"]["percent"] < 1
    assert "valAccuracy" in current["metrics"]


def test_two_replicas_never_both_act(kubectl, namespace, operator_factory, datasets,
                                     cluster_env):
    s3_secret(kubectl, namespace, cluster_env)
    operator = operator_factory([namespace], replicas=2).wait_leader()
    follower, = wait_for(operator.followers, timeout=120,
                         message="the second replica to serve metrics as a follower")
    leader = operator.leader()
    apply(kubectl, finetunejob("led", namespace, datasets["fashion-mnist"], suspend=True))
    wait_phase(kubectl, namespace, "led", "Suspended", timeout=60)
    assert operator.pod_metric(leader, "finetune_operator_reconciliations_total",
                               result="success") >= 1
    assert not operator.pod_metric(follower, "finetune_operator_reconciliations_total",
                                   result="success")
    killed = leader["metadata"]["name"]
    operator.kill_pod(killed)
    # The surviving follower or the Deployment's replacement pod, whichever wins the Lease; one.
    wait_for(lambda: (operator.leader() or {}).get("metadata", {}).get("name") not in (None, killed),
             timeout=60, message="another replica to take over")
    assert len(operator.pods_leading(True)) == 1
    kubectl("patch", "ftj", "led", "-n", namespace, "--type=merge",
            "-p", '{"spec":{"suspend":false}}')
    wait_phase(kubectl, namespace, "led", "Succeeded", timeout=300)
    assert len(objects(kubectl, "jobs", namespace)) == 1


# --- guardrails for shared clusters (issue 13) -----------------------------------------------

def trainer_pods(kubectl, namespace: str, finetunejob_name: str) -> list[dict]:
    job_name = builders.trainer_job_name(finetunejob_name)
    return [p for p in objects(kubectl, "pods", namespace)
            if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job_name]


def running_pod(kubectl, namespace: str, finetunejob_name: str) -> dict | None:
    return next((p for p in trainer_pods(kubectl, namespace, finetunejob_name)
                 if p["status"].get("phase") == "Running"
                 and not p["metadata"].get("deletionTimestamp")), None)


def test_a_job_disrupted_more_often_than_the_limit_fails_evicted_and_keeps_its_checkpoint(
        kubectl, namespace, operator_factory, datasets, cluster_env, s3_client, api_client):
    operator_factory([namespace], FINETUNE_MAX_DISRUPTIONS="1").wait_leader()
    s3_secret(kubectl, namespace, cluster_env)
    # Endless: it must still be training at the second eviction however slow the first was.
    manifest = finetunejob("evictee", namespace, datasets["fashion-mnist"],
                           **{**INTERRUPTIBLE, "epochs": 10000})
    apply(kubectl, manifest)
    output = manifest["spec"]["output"]["uri"]
    wait_phase(kubectl, namespace, "evictee", "Running", timeout=120)
    wait_checkpoint(s3_client, output)

    # The first disruption is retried: counted, and a replacement runs.
    first = wait_for(lambda: running_pod(kubectl, namespace, "evictee"), message="a trainer pod")
    evict(api_client, first)
    wait_for(lambda: status(kubectl, namespace, "evictee").get("disruptions") == 1,
             message="the first disruption counted")
    second = wait_for(lambda: (lambda p: p if p and p["metadata"]["uid"] !=
                               first["metadata"]["uid"] else None)(
        running_pod(kubectl, namespace, "evictee")), timeout=180, message="a replacement pod")
    assert status(kubectl, namespace, "evictee")["phase"] == "Running"

    # The second is one more than the limit: the job fails and nothing keeps running.
    evict(api_client, second)
    current = wait_phase(kubectl, namespace, "evictee", "Failed", "Succeeded", timeout=120)
    assert current["phase"] == "Failed", current
    assert current["failure"]["reason"] == "Evicted"
    assert current["disruptions"] == 2
    assert current["lastDisruption"]["pod"] == second["metadata"]["name"]
    assert current["lastDisruption"]["reason"] == "EvictionByEvictionAPI"
    # The API server's message for an Eviction API eviction (the kubelet's, on disk pressure,
    # is quoted the same way: tests/operator/test_status.py).
    assert "Eviction API" in current["failure"]["message"]
    assert condition(current, "Failed")["reason"] == "Evicted"
    # Suspended: the Job controller deletes its active pods and creates no replacement.
    job, = objects(kubectl, "jobs", namespace)
    assert job["spec"]["suspend"] is True
    wait_for(lambda: all(p["status"].get("phase") in ("Failed", "Succeeded")
                         for p in trainer_pods(kubectl, namespace, "evictee"))
             and not objects(kubectl, "jobs", namespace)[0]["status"].get("active"),
             timeout=120, message="no trainer pod left running")
    assert any(k.endswith("checkpoints/latest.json") for k in s3_keys(s3_client, output))
    reasons = [e["reason"] for e in events(kubectl, namespace, "evictee")]
    assert reasons.count("Disrupted") == 2


def test_a_secret_created_after_the_job_lets_the_trainer_start(
        kubectl, namespace, ftj_operator, datasets, cluster_env):
    # The default grace (300 s): the Secret comes a few seconds after the job.
    apply(kubectl, finetunejob("late-secret", namespace, datasets["fashion-mnist"],
                               epochs=10000))
    waiting = wait_for(lambda: (lambda s: s if s.get("startError") else None)(
        status(kubectl, namespace, "late-secret")), timeout=120,
        message="the container's start error in status")
    assert waiting["phase"] == "Pending"
    assert waiting["startError"]["reason"] == "CreateContainerConfigError"
    assert SECRET in waiting["startError"]["message"]
    running = condition(waiting, "Running")
    assert running["reason"] == "CreateContainerConfigError" and SECRET in running["message"]
    assert "fails at" in running["message"]

    s3_secret(kubectl, namespace, cluster_env)
    current = wait_phase(kubectl, namespace, "late-secret", "Running", "Failed", timeout=180)
    assert current["phase"] == "Running", current
    assert "startError" not in current
    assert current.get("attempts") == 1
    # The trainer sees its ephemeral-storage limit (the chart's default, 20Gi) in bytes.
    pod = running_pod(kubectl, namespace, "late-secret")
    limit = kubectl("exec", "-n", namespace, pod["metadata"]["name"], "--", "python", "-c",
                    "import os; print(os.environ['FINETUNE_EPHEMERAL_STORAGE_LIMIT_BYTES'])")
    assert limit.strip() == str(20 * 2**30)


def test_an_image_that_cannot_be_pulled_fails_only_after_the_grace(
        kubectl, namespace, operator_factory, datasets, cluster_env):
    grace = 20
    image = "localhost/finetune-nonexistent"
    operator_factory([namespace], chart_values={"tenancy": {"allowedImages": [image]}},
                     FINETUNE_START_ERROR_GRACE_SECONDS=str(grace)).wait_leader()
    s3_secret(kubectl, namespace, cluster_env)
    # No registry here: pulling from localhost fails (connection refused).
    apply(kubectl, finetunejob("no-image", namespace, datasets["fashion-mnist"],
                               image=f"{image}:1"))
    waiting = wait_for(lambda: (lambda s: s if s.get("startError") else None)(
        status(kubectl, namespace, "no-image")), timeout=120,
        message="the pull error in status")
    assert waiting["phase"] == "Pending"
    assert waiting["startError"]["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert "localhost/finetune-nonexistent:1" in condition(waiting, "Running")["message"]

    current = wait_phase(kubectl, namespace, "no-image", "Failed", timeout=120)
    assert current["failure"]["reason"] in ("ErrImagePull", "ImagePullBackOff")
    assert "localhost/finetune-nonexistent:1" in current["failure"]["message"]
    assert f"grace is {grace} s" in current["failure"]["message"]
    waited = (datetime.fromisoformat(current["completionTime"].replace("Z", "+00:00"))
              - datetime.fromisoformat(waiting["startError"]["since"].replace("Z", "+00:00")))
    assert waited.total_seconds() >= grace
    wait_for(lambda: not trainer_pods(kubectl, namespace, "no-image"), timeout=60,
             message="the waiting pod deleted")
    job, = objects(kubectl, "jobs", namespace)
    assert job["spec"]["suspend"] is True


def test_network_policies_are_accepted_and_select_exactly_each_jobs_pods(
        kubectl, namespace, operator_factory, datasets, cluster_env):
    operator_factory([namespace], FINETUNE_METRICS_FROM_NAMESPACES="monitoring").wait_leader()
    s3_secret(kubectl, namespace, cluster_env)
    # More GPUs than any node has: the pods exist (Pending, unschedulable) and nothing trains.
    apply(kubectl,
          finetunejob("solo", namespace, datasets["fashion-mnist"], resources={"gpus": 16}),
          finetunejob("pair", namespace, datasets["fashion-mnist"],
                      resources={"gpus": 16, "workers": 2}))
    for name in ("solo", "pair"):
        wait_phase(kubectl, namespace, name, "Queued", timeout=60)
    wait_for(lambda: len(trainer_pods(kubectl, namespace, "solo")) == 1
             and len(trainer_pods(kubectl, namespace, "pair")) == 2,
             message="the jobs' pods")

    policies = {p["metadata"]["name"]: p for p in objects(
        kubectl, "networkpolicies", namespace, "app.kubernetes.io/managed-by=finetune-operator")}
    assert set(policies) == {"finetune-trainers", "pair-peers"}

    def selected(policy):
        """The pods the API server lists for the policy's selector."""
        selector = ",".join(f"{k}={v}" for k, v in
                            policy["spec"]["podSelector"]["matchLabels"].items())
        return {p["metadata"]["name"] for p in objects(kubectl, "pods", namespace, selector)}

    # One policy for the namespace's trainer pods: every job's, owned by none of them.
    shared = policies["finetune-trainers"]
    assert not shared["metadata"].get("ownerReferences")
    every_trainer = trainer_pods(kubectl, namespace, "solo") + \
        trainer_pods(kubectl, namespace, "pair")
    assert selected(shared) == {p["metadata"]["name"] for p in every_trainer}
    metrics_rule, = shared["spec"]["ingress"]
    assert metrics_rule["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    for pod in every_trainer:  # the port it names, on every trainer pod
        assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in \
            pod["spec"]["containers"][0]["ports"]
    assert metrics_rule["from"][0]["namespaceSelector"]["matchExpressions"][0]["values"] == \
        sorted([namespace, "monitoring"])
    # The multi-worker job's pods open to each other: its own policy, collected with it.
    peers = policies["pair-peers"]
    assert peers["metadata"]["ownerReferences"][0]["uid"] == \
        ftj(kubectl, namespace, "pair")["metadata"]["uid"]
    assert selected(peers) == {p["metadata"]["name"] for p in trainer_pods(kubectl, namespace,
                                                                             "pair")}
    peers_rule, = peers["spec"]["ingress"]
    assert peers_rule == {"from": [{"podSelector": peers["spec"]["podSelector"]}]}
    kubectl("delete", "ftj", "pair", "-n", namespace, "--wait=true")
    wait_for(lambda: {p["metadata"]["name"] for p in objects(
        kubectl, "networkpolicies", namespace, "app.kubernetes.io/managed-by=finetune-operator")}
        == {"finetune-trainers"}, timeout=60, message="the deleted job's policy collected")


# --- API errors on children (issue 12) --------------------------------------------------------

# kwok's fake T4 node: the pod needs no image and never runs. Its taint must be tolerated, and
# the tenancy policy told so.
KWOK_GPU_NODE = {"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "Tesla-T4"},
                 "tolerations": [{"key": "kwok.x-k8s.io/node", "operator": "Exists",
                                  "effect": "NoSchedule"}]}
KWOK_TENANCY = {"tenancy": {"allowedTolerationKeys": ["nvidia.com/gpu", "kwok.x-k8s.io/node"]}}


def test_a_job_whose_pods_the_quota_refuses_is_queued_with_the_quota_message_until_it_clears(
        kubectl, namespace, operator_factory, cluster_env):
    operator_factory([namespace], chart_values=KWOK_TENANCY).wait_leader()
    apply(kubectl, {"apiVersion": "v1", "kind": "ResourceQuota",
                    "metadata": {"name": "no-gpus", "namespace": namespace},
                    "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}})
    # Until the quota controller has counted it, admission refuses pods as "status unknown".
    wait_for(lambda: (get(kubectl, "resourcequota", "no-gpus", namespace).get("status") or {})
             .get("hard"), timeout=60, message="the quota to be counted")
    apply(kubectl, finetunejob("over-quota", namespace, "s3://datasets/x/",
                               resources=KWOK_GPU_NODE, epochs=10000))
    wait_phase(kubectl, namespace, "over-quota", "Queued", timeout=60)
    wait_for(lambda: "exceeded quota: no-gpus" in (condition(
        status(kubectl, namespace, "over-quota"), "Running") or {}).get("message", ""),
        timeout=60, message="the Job controller's quota message in status")
    running = condition(status(kubectl, namespace, "over-quota"), "Running")
    assert running["reason"] == "FailedCreate"
    kubectl("delete", "resourcequota", "no-gpus", "-n", namespace)
    # The Job controller retries with its own backoff; the job leaves Queued once the pod exists
    # (and kwok's fake node may run and complete that pod at once).
    wait_phase(kubectl, namespace, "over-quota", "Pending", "Running", "Succeeded", timeout=240)


def test_a_child_the_api_server_refuses_fails_the_job_naming_the_field(
        kubectl, namespace, operator_factory):
    operator_factory([namespace], chart_values=KWOK_TENANCY).wait_leader()
    bad = dict(KWOK_GPU_NODE, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "value": "v", "effect": "NoSchedule"}])
    apply(kubectl, finetunejob("bad-toleration", namespace, "s3://datasets/x/", resources=bad))
    current = wait_phase(kubectl, namespace, "bad-toleration", "Failed", timeout=60)
    assert current["failure"]["reason"] == "JobRejected"
    assert "spec.template.spec.tolerations[0]" in current["failure"]["message"]
    assert not objects(kubectl, "jobs", namespace)
    # Final: not retried (no second failure Event, the status stays as written).
    time.sleep(3)
    assert status(kubectl, namespace, "bad-toleration") == current


def test_the_local_cluster_enforces_owner_reference_permissions(kubectl, namespace):
    """OwnerReferencesPermissionEnforcement is on, so the other end-to-end tests prove that the
    chart's RBAC lets the operator set blockOwnerDeletion on its children."""
    account = "no-finalizers"
    kubectl("create", "serviceaccount", account, "-n", namespace)
    apply(kubectl, {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                    "metadata": {"name": account, "namespace": namespace},
                    "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                               "verbs": ["create", "get"]}]})
    kubectl("create", "rolebinding", account, "-n", namespace, f"--role={account}",
            f"--serviceaccount={namespace}:{account}")
    apply(kubectl, {"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "owner", "namespace": namespace}})
    owner = get(kubectl, "configmap", "owner", namespace)
    child = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "child", "namespace": namespace, "ownerReferences": [{
                 "apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
                 "uid": owner["metadata"]["uid"], "blockOwnerDeletion": True}]}}
    with pytest.raises(AssertionError, match="cannot set blockOwnerDeletion"):
        kubectl("create", "-f", "-", f"--as=system:serviceaccount:{namespace}:{account}",
                input=json.dumps(child))
