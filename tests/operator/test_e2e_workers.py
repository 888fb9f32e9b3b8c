"""Several trainer pods on the local cluster's real node: the operator's Indexed Job and headless
Service, the Job controller's completion indexes and pod hostnames, the EndpointSlice controller's
pod addresses served by CoreDNS, and torchrun's c10d rendezvous across pods (each in its own
network namespace), with gloo on CPU."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from finetune_operator import builders
from finetune_operator.config import OperatorConfig

from fixtures_cluster import container_processes

from e2e_support import (apply, finetunejob, graceful_stop, objects, s3_bytes, s3_json,
                         s3_secret, wait_checkpoint, wait_for, wait_phase)

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]

# GroupNorm, not BatchNorm: per-rank batch statistics would make two ranks differ from one
# process by design, not by a fault.
TINY = {"model": {"backbone": "test_efficientnet_gn", "weights": "None", "imageSize": 32},
        "optimizer": {"name": "SGD", "learningRate": 0.05, "weightDecay": 0.0, "momentum": 0.9},
        "schedule": {"name": "Constant"}}


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fashion-mnist-two-workers.yaml"


def test_the_two_worker_example_is_accepted_by_the_api_server(kubectl, namespace):
    kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(EXAMPLE))


def model_weights(s3_client, output_uri: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load(s3_bytes(s3_client, f"{output_uri}model.safetensors"))


def test_two_worker_pods_train_to_the_weights_of_one_pod_with_the_same_global_batch(
        kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client):
    s3_secret(kubectl, namespace, cluster_env)
    # The dataset has 100 training images: one global batch of 100 per epoch, so the order in
    # which images are sharded cannot matter and the plain single-process trainer is the
    # reference.
    pair = finetunejob("pair", namespace, datasets["fashion-mnist"], **TINY, epochs=2,
                       batchSize=50, resources={"gpus": 0, "workers": 2})
    single = finetunejob("single", namespace, datasets["fashion-mnist"], **TINY, epochs=2,
                         batchSize=100, resources={"gpus": 0, "workers": 1})
    apply(kubectl, pair, single)

    job_name = builders.trainer_job_name("pair")
    service_name = builders.rendezvous_service_name("pair")
    done = {name: wait_phase(kubectl, namespace, name, "Succeeded", "Failed", timeout=420)
            for name in ("pair", "single")}
    assert done["pair"]["phase"] == "Succeeded", done["pair"]
    assert done["single"]["phase"] == "Succeeded", done["single"]

    job, = [j for j in objects(kubectl, "jobs", namespace) if j["metadata"]["name"] == job_name]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["status"]["succeeded"] == 2 and job["status"]["completedIndexes"] == "0,1"
    pods = [p for p in objects(kubectl, "pods", namespace)
            if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == job_name]
    assert sorted(p["spec"]["hostname"] for p in pods) == [f"{job_name}-0", f"{job_name}-1"]
    assert {p["spec"]["subdomain"] for p in pods} == {service_name}
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["MASTER_ADDR"] == f"{job_name}-0.{service_name}"
    service, = objects(kubectl, "services", namespace,
                       "app.kubernetes.io/managed-by=finetune-operator")
    assert service["metadata"]["name"] == service_name and service["spec"]["clusterIP"] == "None"

    report = s3_json(s3_client, done["pair"]["output"]["reportUri"])
    assert report["distributed"]["worldSize"] == 2
    assert report["distributed"]["globalBatchSize"] == 100
    assert s3_json(s3_client, done["single"]["output"]["reportUri"])["distributed"][
        "worldSize"] == 1

    two_pods = model_weights(s3_client, pair["spec"]["output"]["uri"])
    one_pod = model_weights(s3_client, single["spec"]["output"]["uri"])
    assert two_pods.keys() == one_pod.keys()
    for key in one_pod:
        torch.testing.assert_close(two_pods[key], one_pod[key], atol=2e-4, rtol=1e-3, msg=key)


def rank_processes(pod: dict) -> list[int]:
    """Host PIDs of the rank processes torchrun started under the trainer container's main
    process."""
    pids = container_processes(pod)

    def parent(pid: int) -> int:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return [pid for pid in pids if parent(pid) in pids]


def test_a_killed_worker_restarts_the_group_which_resumes_from_the_checkpoint(
        kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client):
    s3_secret(kubectl, namespace, cluster_env)
    manifest = finetunejob("gang", namespace, datasets["fashion-mnist"], **{
        **TINY, "model": {**TINY["model"], "imageSize": 64}}, epochs=12, batchSize=10,
        # Slowed on purpose (a CPU limit): many epochs of margin after the first checkpoint.
        resources={"gpus": 0, "workers": 2, "cpu": "250m"})
    apply(kubectl, manifest)
    wait_phase(kubectl, namespace, "gang", "Running", timeout=180)
    wait_checkpoint(s3_client, manifest["spec"]["output"]["uri"], timeout=300)

    job_name = builders.trainer_job_name("gang")
    first_pods = {p["metadata"]["uid"]: p["metadata"]["name"]
                  for p in objects(kubectl, "pods", namespace)}
    assert len(first_pods) == 2
    worker_pod, = [p for p in objects(kubectl, "pods", namespace)
                   if p["metadata"]["name"].startswith(f"{job_name}-1-")]
    rank, = wait_for(lambda: rank_processes(worker_pod), timeout=30,
                     message="the rank process of pod index 1")
    # What the kernel's OOM killer or a crash does to a rank: no warning, no cleanup.
    os.kill(rank, signal.SIGKILL)
    killed_at = time.monotonic()

    # The peer in pod index 0 must not hang holding its GPU: its next collective fails, and
    # both pods end Failed well within the rendezvous timeout.
    def first_pods_failed():
        phases = {p["metadata"]["uid"]: p["status"].get("phase")
                  for p in objects(kubectl, "pods", namespace)}
        return all(phases.get(uid, "Failed") == "Failed" for uid in first_pods)
    wait_for(first_pods_failed, timeout=90, interval=0.5,
             message="both first-attempt pods to fail after one rank was killed")
    assert time.monotonic() - killed_at < OperatorConfig().rendezvous_timeout_seconds / 4

    current = wait_phase(kubectl, namespace, "gang", "Succeeded", "Failed", timeout=600)
    assert current["phase"] == "Succeeded", current
    assert current["attempts"] >= 2
    report = s3_json(s3_client, current["output"]["reportUri"])
    assert report["resumedFromEpoch"] >= 1
    assert report["distributed"]["worldSize"] == 2
    assert [h["epoch"] for h in report["history"]][-1] == 12
    job, = objects(kubectl, "jobs", namespace)
    assert job["status"]["failed"] >= 2 and job["status"]["succeeded"] == 2


def test_sigterm_to_one_worker_stops_both_at_one_step_and_the_group_resumes_there(
        kubectl, namespace, ftj_operator, datasets, cluster_env, s3_client):
    s3_secret(kubectl, namespace, cluster_env)
    epochs, batch = 4, 2  # 50 images per rank: 25 steps an epoch
    manifest = finetunejob("graceful", namespace, datasets["fashion-mnist"], **{
        **TINY, "model": {**TINY["model"], "imageSize": 64}}, epochs=epochs, batchSize=batch,
        # backoffLimit 0: a rank that crashed instead of stopping with the others fails the job.
        backoffLimit=0, resources={"gpus": 0, "workers": 2, "cpu": "250m"})
    apply(kubectl, manifest)
    wait_phase(kubectl, namespace, "graceful", "Running", timeout=180)
    wait_checkpoint(s3_client, manifest["spec"]["output"]["uri"], timeout=300)
    job_name = builders.trainer_job_name("graceful")
    worker_pod, = [p for p in objects(kubectl, "pods", namespace)
                   if p["metadata"]["name"].startswith(f"{job_name}-1-")]
    # Only the index-1 pod gets SIGTERM; rank 0 in the other pod learns it at the next step.
    kubectl("delete", "pod", worker_pod["metadata"]["name"], "-n", namespace, "--wait=false")
    checkpoint = graceful_stop(kubectl, namespace, "graceful")

    current = wait_phase(kubectl, namespace, "graceful", "Succeeded", "Failed", timeout=600)
    assert current["phase"] == "Succeeded", current
    assert current["preemptions"] == 1 and current["attempts"] == 2
    report = s3_json(s3_client, current["output"]["reportUri"])
    assert report["resumedFrom"] == {"epoch": checkpoint["epoch"], "step": checkpoint["step"]}
    assert report["optimizerSteps"] == epochs * (report["dataset"]["trainImages"] // 2 // batch)
    job, = objects(kubectl, "jobs", namespace)
    # Both first pods exited with the graceful code: the pod failure policy ignored both.
    assert job["status"].get("failed", 0) == 0 and job["status"]["succeeded"] == 2


def test_a_group_that_cannot_all_start_fails_instead_of_holding_its_gpus(
        kubectl, namespace, operator_factory, datasets, cluster_env):
    # Each pod asks for all the real node's GPUs: one pod of two is scheduled, the other is not,
    # and no queue (Kueue) holds the Job back. The scheduled one must give its GPUs back.
    node = json.loads(kubectl("get", "node", cluster_env["FINETUNE_NODE_NAME"], "-o", "json"))
    gpus = int(node["status"]["capacity"]["nvidia.com/gpu"])
    operator_factory([namespace], FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS="15").wait_leader()
    s3_secret(kubectl, namespace, cluster_env)
    apply(kubectl, finetunejob("half", namespace, datasets["fashion-mnist"], **TINY, epochs=1,
                               backoffLimit=0, resources={"gpus": gpus, "workers": 2}))

    def one_pending_one_started():
        pods = objects(kubectl, "pods", namespace)
        scheduled = [p for p in pods if p["spec"].get("nodeName")]
        return len(pods) == 2 and len(scheduled) == 1
    wait_for(one_pending_one_started, timeout=60, message="one pod scheduled, one not")

    current = wait_phase(kubectl, namespace, "half", "Failed", "Succeeded", timeout=180)
    assert current["phase"] == "Failed", current
    assert "did not all join" in current["failure"]["message"], current["failure"]
    assert "spec.resources.workers" in current["failure"]["message"] or \
        current["failure"].get("field") == "spec.resources.workers", current["failure"]

    def nothing_holds_a_gpu():
        return all(p["status"].get("phase") in ("Failed", "Succeeded")
                   or p["metadata"].get("deletionTimestamp")
                   for p in objects(kubectl, "pods", namespace))
    wait_for(nothing_holds_a_gpu, timeout=60, message="no pod of the failed group left active")
