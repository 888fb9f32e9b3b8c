"""Observability end to end on the local cluster, read back with PromQL from the real
Prometheus: a running FineTuneJob's live series carry its namespace and finetunejob labels and
end at the accuracy the operator wrote into status; the operator's jobs-by-phase gauge (scraped
as job finetune-operator) goes Running then Succeeded; with a Pushgateway configured, the final
values of a job shorter than a scrape interval still reach Prometheus under the job's own group,
and a new run clears its job's old group first."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from finetune_api import contract
from finetune_trainer.pushgateway import JOB as PUSH_JOB, PushedRun

from e2e_support import SECRET, apply, get, s3_secret, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("installed_crd")]


@pytest.fixture
def scraped_operator(operator_factory, namespace, cluster_env, pushgateway_url):
    """The operator with the Pushgateway on, its /metrics added to Prometheus' file_sd
    operator.json (other entries, the demo's say, are kept) and removed afterwards."""
    operator = operator_factory([namespace], FINETUNE_PUSHGATEWAY_URL=pushgateway_url)
    operator.wait_leader()
    targets = Path(cluster_env["FINETUNE_PROMETHEUS_TARGETS_DIR"]) / "operator.json"
    entry = {"targets": [f"127.0.0.1:{operator.port}"], "labels": {}}
    _write_targets(targets, _read_targets(targets) + [entry])
    yield operator
    _write_targets(targets, [e for e in _read_targets(targets) if e != entry])


def _read_targets(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _write_targets(path: Path, entries: list[dict]) -> None:
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(json.dumps(entries))
    scratch.replace(path)  # Prometheus never reads half a file


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
    # Several epochs at 64 px: each lasts longer than the 2 s scrape interval here.
    apply(kubectl, finetunejob(name, namespace, datasets["fashion-mnist"], epochs=6,
                               model={"backbone": "test_resnet", "weights": "None",
                                      "imageSize": 64}))
    operator = f'job="finetune-operator", instance="127.0.0.1:{scraped_operator.port}"'
    wait_value(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Running"}}',
               lambda found: found.get("finetune-operator") == 1, timeout=240,
               message="the operator's gauge at Running in Prometheus")
    job = f'namespace="{namespace}", finetunejob="{name}"'
    live = wait_for(lambda: prometheus_query(
        f'{contract.METRIC_VAL_ACCURACY}{{job="trainers", {job}}}'), timeout=300, interval=1,
        message="the trainer's live validation accuracy in Prometheus")
    assert live[0]["metric"]["pod"].startswith(name)

    final = wait_for(lambda: (lambda s: s if s.get("phase") in ("Succeeded", "Failed") else None)(
        status(kubectl, namespace, name)), timeout=600, interval=1, message="the job to end")
    assert final["phase"] == "Succeeded", final
    wait_value(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Succeeded"}}',
               lambda found: found.get("finetune-operator") == 1,
               message="the operator's gauge at Succeeded in Prometheus")
    assert series(prometheus_query, f'finetune_operator_jobs{{{operator}, phase="Running"}}') \
        == {"finetune-operator": 0}

    accuracy = final["metrics"]["valAccuracy"]
    scraped = series(prometheus_query, f'last_over_time({contract.METRIC_VAL_ACCURACY}'
                                       f'{{job="trainers", {job}}}[30m])')
    assert 0 <= scraped["trainers"] <= 1
    # The last epoch can end after the last scrape (seen here under load: a 1 s scrape timeout
    # on busy cores), so the final value is asserted on the push at exit, which always has it.
    pushed = wait_value(prometheus_query, f'{contract.METRIC_VAL_ACCURACY}{{{job}}}',
                        lambda found: PUSH_JOB in found, message="the pushed final accuracy")
    assert pushed[PUSH_JOB] == pytest.approx(accuracy, abs=1e-9)
    assert series(prometheus_query, f'{contract.METRIC_EXIT_CODE}{{{job}}}') == {PUSH_JOB: 0}


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
