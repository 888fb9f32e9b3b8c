"""Observability end to end on the local cluster, read back with PromQL from the real
Prometheus, which discovers the trainer and operator pods through the API and scrapes them at their
pod IPs: a running FineTuneJob's live series carry its namespace and finetunejob labels; the
operator's jobs-by-phase gauge (scraped as job finetune-operator) follows the job; with a
Pushgateway configured, the final values of a job shorter than a scrape interval still reach
Prometheus under the job's own group, and a new run clears its job's old group first.

No test here needs a job to last long enough or to end fast enough: the live-series test runs a
job with more epochs than the test will ever wait for and deletes it once it has seen what it
needs; the final values are asserted on the job that ends by itself, through the push at exit."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from finetune_api import contract
from finetune_trainer.pushgateway import JOB as PUSH_JOB, PushedRun

from e2e_support import SECRET, apply, get, s3_secret, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]


@pytest.fixture
def scraped_operator(operator_factory, namespace, pushgateway_url):
    """The chart's operator with the Pushgateway on; Prometheus finds its pod through the API
    (pods labelled as the chart's operator, port "metrics"), as it finds the trainers."""
    return operator_factory([namespace], FINETUNE_PUSHGATEWAY_URL=pushgateway_url).wait_leader()


def finetunejob(name: str, namespace: str, dataset: str, **spec) -> dict:
    body = {"dataset": {"uri": dataset, "s3": {"credentialsSecret": SECRET,
                                               "addressingStyle": "Path"}},
            "model": {"backbone": "test_resnet", "weights": "None", "imageSize": 32},
            "strategy": "FineTune", "epochs": 2, "batchSize": 16, "augmentation": "None",
            "dataLoaderWorkers": 0, "baseline": {"enabled": False},
            "output": {"uri": f"s3://models/{namespace}/{name}/"}, "resources": {"gpus": 0},
            **spec}
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": body}


def status(kubectl, namespace: str, name: str) -> dict:
    return (get(kubectl, "finetunejob", name, namespace) or {}).get("status") or {}


def series(query, expr: str) -> dict[str, float]:
    """{job label: value} of an instant query."""
    return {r["metric"].get("job", ""): float(r["value"][1]) for r in query(expr)}


def wait_value(query, expr: str, wanted, *, timeout: float = 120, message: str = "") -> dict:
    return wait_for(lambda: (lambda found: found if wanted(found) else None)(series(query, expr)),
                    timeout=timeout, interval=1, message=message or expr)


def test_live_series_and_operator_gauge_in_prometheus(kubectl, namespace, scraped_operator,
                                                      datasets, cluster_env, prometheus_query):
    s3_secret(kubectl, namespace, cluster_env)
    name = "observed"
    # Far more epochs than the test waits for: it runs until deleted below.
    apply(kubectl, finetunejob(name, namespace, datasets["fashion-mnist"], epochs=10000))
    operator = f'job="finetune-operator", namespace="{namespace}"'
    wait_value(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Running"}}',
               lambda found: found.get("finetune-operator") == 1, timeout=240,
               message="the operator's gauge at Running in Prometheus")
    job = f'namespace="{namespace}", finetunejob="{name}"'
    live = wait_for(lambda: prometheus_query(
        f'{contract.METRIC_VAL_ACCURACY}{{job="trainers", {job}}}'), timeout=300, interval=1,
        message="the trainer's live validation accuracy in Prometheus")
    assert live[0]["metric"]["pod"].startswith(name)
    assert 0 <= float(live[0]["value"][1]) <= 1
    pod = get(kubectl, "pod", live[0]["metric"]["pod"], namespace)
    assert live[0]["metric"]["instance"].startswith(f'{pod["status"]["podIP"]}:')
    # The live series follows the status the operator writes.
    epoch = wait_for(lambda: status(kubectl, namespace, name).get("progress", {}).get("epoch"),
                     timeout=120, interval=1, message="progress in status")
    assert epoch >= 1
    # What FineTuneJobCheckpointStale reads: when the latest checkpoint was complete, the same
    # time status.lastCheckpoint shows (to the second).
    checkpointed = wait_for(lambda: prometheus_query(
        f'{contract.METRIC_CHECKPOINT_TIME}{{job="trainers", {job}}} > 0'), timeout=120,
        interval=1, message="the trainer's checkpoint time in Prometheus")
    written = float(checkpointed[0]["value"][1])
    assert abs(written - time.time()) < 600
    recorded = wait_for(lambda: status(kubectl, namespace, name).get("lastCheckpoint"),
                        timeout=60, interval=1, message="lastCheckpoint in status")
    assert recorded["uri"].endswith("/checkpoints/") and recorded["time"].endswith("Z")

    kubectl("delete", "finetunejob", name, "-n", namespace, "--timeout=60s")
    wait_value(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Running"}}',
               lambda found: found.get("finetune-operator") == 0,
               message="the operator's gauge back at 0 Running after the deletion")


def test_short_job_final_metrics_arrive_through_the_pushgateway(
        kubectl, namespace, scraped_operator, datasets, cluster_env, prometheus_query):
    s3_secret(kubectl, namespace, cluster_env)
    name = "blink"
    apply(kubectl, finetunejob(name, namespace, datasets["fashion-mnist"], epochs=1))
    final = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        status(kubectl, namespace, name)), timeout=600, interval=1, message="the job to end")
    assert final["phase"] == "Succeeded", final
    job = f'job="{PUSH_JOB}", namespace="{namespace}", finetunejob="{name}"'
    pushed = wait_value(prometheus_query, f'{contract.METRIC_VAL_ACCURACY}{{{job}}}',
                        lambda found: PUSH_JOB in found, message="the pushed final accuracy")
    assert pushed[PUSH_JOB] == pytest.approx(final["metrics"]["valAccuracy"], abs=1e-9)
    duration = series(prometheus_query, f'{contract.METRIC_DURATION}{{{job}}}')[PUSH_JOB]
    assert 0 < duration < 600
    assert series(prometheus_query, f'{contract.METRIC_EPOCH}{{{job}}}') == {PUSH_JOB: 1}
    operator = f'job="finetune-operator", namespace="{namespace}"'
    wait_value(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Succeeded"}}',
               lambda found: found.get("finetune-operator") == 1,
               message="the operator's gauge at Succeeded in Prometheus")


def test_a_new_run_clears_its_jobs_old_group(pushgateway_url, namespace, monkeypatch):
    manifest = {"metadata": {"name": "rerun", "namespace": namespace}}
    group = f"/metrics/job/{PUSH_JOB}/namespace/{namespace}/finetunejob/rerun"
    stale = CollectorRegistry()
    Gauge("finetune_stale_marker", "From an earlier run.", registry=stale).set(1)
    push_to_gateway(pushgateway_url, job=PUSH_JOB, registry=stale,
                    grouping_key={"namespace": namespace, "finetunejob": "rerun"})
    other = {"namespace": namespace, "finetunejob": "other"}
    push_to_gateway(pushgateway_url, job=PUSH_JOB, registry=stale, grouping_key=other)
    assert "finetune_stale_marker" in gateway_group(pushgateway_url, namespace, "rerun")

    monkeypatch.setenv(contract.ENV_PUSHGATEWAY_URL, pushgateway_url)
    run = PushedRun.begin(manifest)
    assert gateway_group(pushgateway_url, namespace, "rerun") == {}, group
    assert "finetune_stale_marker" in gateway_group(pushgateway_url, namespace, "other")

    live = CollectorRegistry()
    Gauge(contract.METRIC_VAL_ACCURACY, "accuracy", registry=live).set(0.75)
    run.push(live, exit_code=0)
    values = gateway_group(pushgateway_url, namespace, "rerun")
    assert values[contract.METRIC_VAL_ACCURACY] == 0.75 and values[contract.METRIC_EXIT_CODE] == 0
    assert values[contract.METRIC_DURATION] >= 0 and "finetune_stale_marker" not in values


def gateway_group(url: str, namespace: str, name: str) -> dict[str, float]:
    """The metrics the Pushgateway holds for one FineTuneJob's group (its /api/v1/metrics)."""
    with urllib.request.urlopen(f"{url}/api/v1/metrics", timeout=10) as response:
        groups = json.load(response)["data"]
    for group in groups:
        labels = group["labels"]
        if (labels.get("job"), labels.get("namespace"), labels.get("finetunejob")) == \
                (PUSH_JOB, namespace, name):
            return {metric: float(body["metrics"][0]["value"])
                    for metric, body in group.items()
                    if isinstance(body, dict) and body.get("metrics")
                    and metric not in ("push_time_seconds", "push_failure_time_seconds")}
    return {}
