"""Helpers of the operator's end-to-end tests on the local cluster: FineTuneJobs, what they
leave behind, and polling. The operator itself runs as the chart's Deployment (chart_operator)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from fixtures_cluster import wait_for as poll

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.5,
             message: str = "condition") -> Any:
    """The cluster fixtures' poll, with the longer default an operator's round trip needs."""
    return poll(predicate, timeout=timeout, interval=interval, message=message)


SECRET = "s3-credentials"
TRAINER_SELECTOR = "finetune.dev/component=trainer"


def s3_secret(kubectl, namespace: str, cluster_env: dict) -> None:
    """The local S3 server's credentials as the Secret the test jobs name."""
    apply(kubectl, {"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": SECRET, "namespace": namespace},
                    "stringData": {"AWS_ACCESS_KEY_ID": cluster_env["AWS_ACCESS_KEY_ID"],
                                   "AWS_SECRET_ACCESS_KEY": cluster_env["AWS_SECRET_ACCESS_KEY"]}})


def apply(kubectl, *documents: dict, namespace: str | None = None) -> None:
    args = ["apply", "-f", "-"] + (["-n", namespace] if namespace else [])
    kubectl(*args, input="\n---\n".join(json.dumps(d) for d in documents))


def get(kubectl, kind: str, name: str, namespace: str) -> dict | None:
    out = kubectl("get", kind, name, "-n", namespace, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


# --- FineTuneJobs and what they leave behind ------------------------------------------------------------------------------

def finetunejob(name: str, namespace: str, dataset: str, **spec) -> dict:
    base = {
        "dataset": {"uri": dataset, "s3": {"credentialsSecret": SECRET, "addressingStyle": "Path"}},
        "model": {"backbone": "test_resnet", "weights": "None", "imageSize": 32},
        "strategy": "FineTune", "epochs": 2, "batchSize": 16, "augmentation": "None",
        "dataLoaderWorkers": 0, "baseline": {"enabled": False},
        "output": {"uri": f"s3://models/{namespace}/{name}/"},
        "resources": {"gpus": 0},
    }
    for key, value in spec.items():
        base[key] = value
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace}, "spec": base}


def ftj(kubectl, namespace: str, name: str) -> dict | None:
    return get(kubectl, "finetunejob", name, namespace)


def status(kubectl, namespace: str, name: str) -> dict:
    return (ftj(kubectl, namespace, name) or {}).get("status") or {}


def wait_phase(kubectl, namespace: str, name: str, *phases: str, timeout: float = 300) -> dict:
    def reached():
        current = status(kubectl, namespace, name)
        return current if current.get("phase") in phases else None
    try:
        return wait_for(reached, timeout=timeout, interval=1,
                        message=f"{namespace}/{name} to reach {'/'.join(phases)}")
    except AssertionError as error:
        raise AssertionError(f"{error}; status: {json.dumps(status(kubectl, namespace, name))}")


def condition(current: dict, type_: str) -> dict:
    return next((c for c in current.get("conditions") or [] if c["type"] == type_), {})


def objects(kubectl, kind: str, namespace: str, selector: str = TRAINER_SELECTOR) -> list[dict]:
    return json.loads(kubectl("get", kind, "-n", namespace, "-l", selector, "-o", "json"))["items"]


def s3_keys(s3_client, uri: str) -> list[str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = s3_client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def s3_bytes(s3_client, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()


def s3_json(s3_client, uri: str) -> dict:
    return json.loads(s3_bytes(s3_client, uri))


def wait_checkpoint(s3_client, output_uri: str, timeout: float = 240) -> None:
    wait_for(lambda: any(k.endswith("checkpoints/latest.json")
                         for k in s3_keys(s3_client, output_uri)),
             timeout=timeout, interval=0.5, message=f"a checkpoint under {output_uri}")


def events(kubectl, namespace: str, name: str) -> list[dict]:
    items = json.loads(kubectl("get", "events", "-n", namespace, "-o", "json",
                               "--field-selector", f"involvedObject.name={name}"))["items"]
    return [e for e in items if e.get("source", {}).get("component") == "finetune-operator"]


def graceful_stop(kubectl, namespace: str, name: str, count: int = 1) -> dict:
    """Where the trainer's graceful stop number `count` checkpointed ({epoch, step, file}),
    from the operator's Preempted Event, which quotes the trainer's termination message."""
    def event():
        said = [e["message"] for e in events(kubectl, namespace, name)
                if e["reason"] == "Preempted" and e["message"].startswith(f"preemption {count}:")]
        return said[0] if said else None
    message = wait_for(event, timeout=180, message=f"the Preempted event of {name}")
    match = re.search(r"checkpoints/(epoch-(\d+)(?:-step-(\d+))?\.pt)", message)
    assert match, message
    return {"file": match.group(1), "epoch": int(match.group(2)),
            "step": int(match.group(3) or 0)}
