"""Kubernetes objects as the API server sends them, for the operator's unit tests."""

from __future__ import annotations

import copy
from typing import Any

from finetune_api import API_VERSION, KIND
from finetune_api.validation import validate_spec

FTJ_UID = "6f1c1d52-0000-4000-8000-000000000001"
JOB_UID = "6f1c1d52-0000-4000-8000-000000000002"


def finetunejob(name: str = "flowers", namespace: str = "team-a", status: dict | None = None,
                **spec_overrides: Any) -> dict[str, Any]:
    spec = {
        "dataset": {"uri": "s3://datasets/flowers/",
                    "s3": {"endpoint": "http://s3.local:7070", "credentialsSecret": "s3-creds"}},
        "model": {"backbone": "resnet18", "weights": "None", "imageSize": 32},
        "output": {"uri": "s3://models/flowers/"},
        "epochs": 10,
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "namespace": namespace, "uid": FTJ_UID, "generation": 1,
                     "creationTimestamp": "2026-11-28T10:00:00Z"},
        # What the API server stores: the spec with the schema's defaults applied.
        "spec": validate_spec(spec),
        "status": copy.deepcopy(status) if status else {},
    }


def job(name: str = "flowers-trainer", namespace: str = "team-a", suspend: bool = False,
        conditions: list[dict] | None = None, backoff_limit: int = 3, **status: Any
        ) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "uid": JOB_UID,
                     "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND,
                                          "name": "flowers", "uid": FTJ_UID,
                                          "controller": True}]},
        "spec": {"suspend": suspend, "backoffLimit": backoff_limit},
        "status": {"conditions": conditions or [], **status},
    }


def job_condition(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message}


def pod(name: str = "flowers-trainer-abcde", phase: str = "Pending",
        state: dict | None = None, conditions: list[dict] | None = None,
        pod_ip: str | None = None, deleting: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    if pod_ip:
        status["podIP"] = pod_ip
    meta: dict[str, Any] = {"name": name, "namespace": "team-a", "uid": f"uid-{name}",
                            "creationTimestamp": "2026-11-28T10:00:05Z",
                            "annotations": {"finetune.dev/finetunejob": "flowers"},
                            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                                 "name": "flowers-trainer", "uid": JOB_UID,
                                                 "controller": True}]}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-28T10:09:00Z"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"containers": [{"name": "trainer",
                                     "ports": [{"name": "metrics", "containerPort": 9400}]}]},
            "status": status}


def running_state() -> dict[str, Any]:
    return {"running": {"startedAt": "2026-11-28T10:00:10Z"}}


def terminated_state(exit_code: int, message: str = "", reason: str = "Error",
                     finished: str = "2026-11-28T10:05:00Z") -> dict[str, Any]:
    return {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                           "finishedAt": finished}}
