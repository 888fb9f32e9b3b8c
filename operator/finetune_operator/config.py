"""Operator settings, read once from the environment (documented in docs/operator.md)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping

DEFAULT_TRAINER_IMAGE = "ghcr.io/finetune-dev/finetune-trainer:0.1.0"


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


@dataclass(frozen=True)
class OperatorConfig:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    default_s3_endpoint: str = ""
    default_gpu_resource: str = "nvidia.com/gpu"
    watch_namespaces: tuple[str, ...] = ()  # empty: all namespaces
    metrics_port: int = 8080
    metrics_addr: str = "0.0.0.0"
    progress_interval_seconds: int = 10
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
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OperatorConfig":
        env = os.environ if env is None else env
        namespaces = tuple(ns.strip() for ns in env.get("FINETUNE_WATCH_NAMESPACES", "").split(",")
                           if ns.strip())
        level = env.get("FINETUNE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"FINETUNE_LOG_LEVEL: {level!r} is not DEBUG, INFO, WARNING or ERROR")
        endpoint = env.get("FINETUNE_DEFAULT_S3_ENDPOINT", "").strip()
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"FINETUNE_DEFAULT_S3_ENDPOINT: {endpoint!r} must start with "
                              "http:// or https://")
        pod_name = env.get("POD_NAME", "").strip()
        return cls(
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE", "").strip() or DEFAULT_TRAINER_IMAGE,
            default_s3_endpoint=endpoint,
            default_gpu_resource=(env.get("FINETUNE_DEFAULT_GPU_RESOURCE", "").strip()
                                  or "nvidia.com/gpu"),
            watch_namespaces=namespaces,
            metrics_port=_int(env, "FINETUNE_OPERATOR_METRICS_PORT", 8080),
            metrics_addr=env.get("FINETUNE_OPERATOR_METRICS_ADDR", "").strip() or "0.0.0.0",
            progress_interval_seconds=_int(env, "FINETUNE_PROGRESS_INTERVAL_SECONDS", 10, 1),
            log_level=level,
            pod_namespace=env.get("POD_NAMESPACE", "").strip() or "default",
            leader_election=_bool(env, "FINETUNE_LEADER_ELECTION", True),
            lease_name=env.get("FINETUNE_LEASE_NAME", "").strip() or "finetune-operator",
            lease_duration_seconds=_int(env, "FINETUNE_LEASE_DURATION_SECONDS", 15, 3),
            pushgateway_url=env.get("FINETUNE_PUSHGATEWAY_URL", "").strip(),
            rendezvous_timeout_seconds=_int(env, "FINETUNE_RENDEZVOUS_TIMEOUT_SECONDS", 600, 10),
            identity=(f"{pod_name}-{os.getpid()}" if pod_name
                      else f"{socket.gethostname()}-{os.getpid()}"),
        )
