"""Operator settings, read once from the environment (documented in docs/operator.md)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping

from finetune_api.schema import QUANTITY_PATTERN
from finetune_api.tenancy import TenancyPolicy

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"
NAMESPACE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    pass


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: {raw!r} is not a boolean (true/false)")


def _namespaces(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    names = tuple(ns.strip() for ns in env.get(name, "").split(",") if ns.strip())
    for namespace in names:
        if not NAMESPACE_NAME.match(namespace):
            raise ConfigError(f"{name}: {namespace!r} is not a namespace name")
    return names


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    default_s3_endpoint: str = ""
    default_gpu_resource: str = "nvidia.com/gpu"
    watch_namespaces: tuple[str, ...] = ()  # empty: all namespaces
    metrics_port: int = 8080
    metrics_addr: str = "0.0.0.0"
    health_port: int = 8081  # /healthz, for the liveness probe
    # How often the leader checks that its FineTuneJob watch has missed nothing (health.py).
    watch_check_seconds: int = 60
    progress_interval_seconds: int = 10
    # Threads that make the operator's API calls (reconciliations, one FineTuneJob at a time).
    # They mostly wait on the API server: in a burst of 200, 16 gave a p99 of 3.2 s where 8
    # gave 4.3 s (bench/operator_scale.py, idle 2-core machine).
    reconcile_workers: int = 16
    log_level: str = "INFO"
    pod_namespace: str = "default"
    leader_election: bool = True
    lease_name: str = "finetune-operator"
    lease_duration_seconds: int = 15
    pushgateway_url: str = ""  # passed to trainer pods: end-of-job push; empty: off
    # Seconds the pods of a multi-worker job wait for all their peers (torchrun's rendezvous and
    # every collective after it): a gang that cannot start completely fails instead of holding
    # its GPUs.
    rendezvous_timeout_seconds: int = 600
    # Trainer pods' ephemeral-storage request and limit when spec.resources.ephemeralStorage is
    # empty.
    default_ephemeral_storage: str = "20Gi"
    # Disruptions (evictions, preemptions, lost nodes) retried before a job fails with reason
    # Evicted: a pod that keeps filling its node's disk must not keep evicting its neighbours.
    max_disruptions: int = 3
    # Seconds a trainer container may stay unable to start (ErrImagePull, ImagePullBackOff,
    # CreateContainerConfigError, CreateContainerError) before its job fails.
    start_error_grace_seconds: int = 300
    # A NetworkPolicy per job: the trainers' metrics port open only to these namespaces (and the
    # operator's own), a multi-worker job's pods open to each other.
    network_policies: bool = True
    metrics_from_namespaces: tuple[str, ...] = ()
    # What tenants may choose for their trainer pods (the chart's `tenancy` values, as JSON).
    tenancy: TenancyPolicy = field(default_factory=lambda: TenancyPolicy.from_json(
        "", default_image=DEFAULT_TRAINER_IMAGE))
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        namespaces = _namespaces(env, "FINETUNE_WATCH_NAMESPACES")
        level = env.get("FINETUNE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"FINETUNE_LOG_LEVEL: {level!r} is not DEBUG, INFO, WARNING or ERROR")
        endpoint = env.get("FINETUNE_DEFAULT_S3_ENDPOINT", "").strip()
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"FINETUNE_DEFAULT_S3_ENDPOINT: {endpoint!r} must start with "
                              "http:// or https://")
        pod_name = env.get("POD_NAME", "").strip()
        ephemeral_storage = env.get("FINETUNE_DEFAULT_EPHEMERAL_STORAGE", "").strip() or "20Gi"
        if not re.match(QUANTITY_PATTERN, ephemeral_storage):
            raise ConfigError(f"FINETUNE_DEFAULT_EPHEMERAL_STORAGE: {ephemeral_storage!r} is not "
                              "a quantity such as 20Gi")
        trainer_image = env.get("FINETUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE
        try:
            tenancy = TenancyPolicy.from_json(env.get("FINETUNE_TENANCY_POLICY", ""),
                                              default_image=trainer_image)
        except ValueError as error:  # json.JSONDecodeError is one
            raise ConfigError(f"FINETUNE_TENANCY_POLICY: {error}") from None
        return cls(
            trainer_image=trainer_image,
            tenancy=tenancy,
            default_s3_endpoint=endpoint,
            default_gpu_resource=(env.get("FINETUNE_DEFAULT_GPU_RESOURCE", "").strip()
                                  or "nvidia.com/gpu"),
            watch_namespaces=namespaces,
            metrics_port=_int(env, "FINETUNE_OPERATOR_METRICS_PORT", 8080),
            metrics_addr=env.get("FINETUNE_OPERATOR_METRICS_ADDR", "").strip() or "0.0.0.0",
            health_port=_int(env, "FINETUNE_OPERATOR_HEALTH_PORT", 8081),
            watch_check_seconds=_int(env, "FINETUNE_WATCH_CHECK_SECONDS", 60, 5),
            progress_interval_seconds=_int(env, "FINETUNE_PROGRESS_INTERVAL_SECONDS", 10, 1),
            reconcile_workers=_int(env, "FINETUNE_RECONCILE_WORKERS", 16, 1),
            log_level=level,
            pod_namespace=env.get("POD_NAMESPACE", "").strip() or "default",
            leader_election=_bool(env, "FINETUNE_LEADER_ELECTION", True),
            lease_name=env.get("FINETUNE_LEASE_NAME", "").strip() or "finetune-operator",
            lease_duration_seconds=_int(env, "FINETUNE_LEASE_DURATION_SECONDS", 15, 3),
            pushgateway_url=env.get("FINETUNE_PUSHGATEWAY_URL", "").strip(),
            rendezvous_timeout_seconds=_int(env, "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS", 600, 10),
            default_ephemeral_storage=ephemeral_storage,
            max_disruptions=_int(env, "FINETUNE_MAX_DISRUPTIONS", 3),
            start_error_grace_seconds=_int(env, "FINETUNE_START_ERROR_GRACE_SECONDS", 300),
            network_policies=_bool(env, "FINETUNE_NETWORK_POLICIES", True),
            metrics_from_namespaces=_namespaces(env, "FINETUNE_METRICS_FROM_NAMESPACES"),
            identity=(f"{pod_name}-{os.getpid()}" if pod_name
                      else f"{socket.gethostname()}-{os.getpid()}"),
        )
