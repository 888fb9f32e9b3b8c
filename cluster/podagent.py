"""A minimal stand-in for the kubelet that runs trainer pods of the local cluster as local processes.

The local cluster has no kubelet and no container runtime: kwok plays the lifecycle of ordinary pods.
Pods labelled ``finetune.dev/component=trainer`` are left alone by kwok's stages; once the scheduler
has bound one (``spec.nodeName`` set), this agent runs its first container as a process on this
machine and writes the pod's status back, so the Job controller, the operator and the tests see a
real exit code and termination message.

What it does, per pod:

* argv is ``command + args`` (with ``$(VAR)`` expansion). Without a command, ``args`` is the argv
  (there is no image entrypoint to fall back on). ``python``/``python3`` as argv[0] is this agent's
  interpreter (the project's virtual environment); other names are looked up on PATH.
* environment: ``envFrom`` and ``env`` resolved like the kubelet does (values, Secret and
  ConfigMap keys, ``fieldRef`` on metadata.name/namespace/uid/labels/annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP/hostIP). A missing non-optional key leaves the pod Pending
  with ``CreateContainerConfigError`` and is retried. On top of the spec, the agent sets PATH, HOME,
  LANG, TMPDIR, HOSTNAME, and:

  - ``FINETUNE_METRICS_ADDR``: the pod's own loopback address (127.0.x.y, also its
    ``status.podIP``), and ``FINETUNE_METRICS_PORT``: the container port named ``metrics``
    (a free port when there is none). So ``podIP:port`` reaches the pod as in a real cluster; the
    pod is listed as ``<podIP>:<port>`` in the Prometheus file_sd file (labels ``namespace``,
    ``pod``, ``finetunejob`` from the pod label ``finetune.dev/job``) and in ``ports.json``.
  - ``FINETUNE_TERMINATION_LOG``: a file whose first 4096 bytes become the container's
    ``state.terminated.message`` (the kubelet's ``/dev/termination-log``).
  - ``KUBERNETES_SERVICE_HOST``/``PORT``: the local API server.

* pod DNS names: there is no cluster DNS here, so an env value that is exactly the DNS name of a
  pod behind a headless Service (``<hostname>.<subdomain>``, optionally followed by
  ``.<namespace>``, ``.svc`` and ``.cluster.local``, as an Indexed Job's pods are named for
  rendezvous) is replaced by that pod's address: the pod the Service selects with that
  ``spec.hostname`` and ``spec.subdomain``, as the EndpointSlice controller would publish it for
  CoreDNS (it cannot here: the API refuses loopback addresses in EndpointSlices, and every pod
  address on this machine is one). Until the name has an address the container
  waits in ``ContainerCreating``, then starts with the address. A real process would start at once
  and retry its lookup for as long as it is willing to; the agent waits that long at most (the
  pod's ``FINETUNE_RENDEZVOUS_TIMEOUT`` when it declares one, else 600 s) and then starts the
  container with the name unresolved, so the process fails its lookup as it would on NXDOMAIN.
  The lookup happens once, at container start, and only for env values; names in command or args
  are left as they are.

* volumes: ConfigMap, Secret, emptyDir, downwardAPI and projected (configMap, secret, downwardAPI,
  serviceAccountToken) volumes are written into ``<state>/pods/<ns>_<name>_<uid>/volumes/<name>``.
  A mount is a symlink at ``<poddir>/root/<mountPath>``; as there is no chroot, every occurrence of
  a mountPath at a path boundary in command, args, env values and workingDir is rewritten to the
  materialised path. The working directory is workingDir (rewritten) or ``<poddir>/root``.
* restartPolicy: Never ends the pod Succeeded/Failed; OnFailure/Always restart the process with a
  back-off, counting restartCount.
* deletion: SIGTERM to the process group, SIGKILL after the grace period, then the pod object is
  deleted with grace period 0 (as the kubelet would confirm).
* stdout and stderr go to ``<state>/logs/<ns>_<pod>.log`` (kept after the pod is gone).

What it does not do: pull or use images (the command runs in this machine's environment), isolate
resources (no cgroups, GPU requests are only scheduling), run init or sidecar containers, probes,
or more than the first container, or serve ``kubectl logs``/``exec``. If the agent restarts, pods
it was running are marked Failed (it cannot re-attach to their processes).

    python cluster/podagent.py --kubeconfig K --state-dir D --targets-file F
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

TRAINER_SELECTOR = "finetune.dev/component=trainer"
JOB_LABEL = "finetune.dev/job"
TERMINATION_MESSAGE_LIMIT = 4096
HOST_IP = "127.0.0.1"
# Each running pod gets an address of its own in 127.0.0.0/8 (Linux routes all of it to the
# loopback interface), so pods listen on the ports their spec declares, without clashes, and
# `podIP:containerPort` reaches them as it would in a real cluster.
POD_IP_RANGE = [f"127.0.{block}.{host}" for block in range(1, 255) for host in range(1, 255)]
log = logging.getLogger("podagent")


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port(address: str = HOST_IP) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class ConfigError(Exception):
    """The container cannot be configured yet (missing Secret/ConfigMap key): kubelet retries."""


class NameNotResolvedYet(ConfigError):
    """A pod DNS name in the env has no address yet (its pod is not running): retried soon."""

    def __init__(self, message: str, wait_seconds: float):
        super().__init__(message)
        self.wait_seconds = wait_seconds


# How long a container waits for a pod DNS name before it starts without it: the window in which
# its process would retry the lookup itself. Pods of multi-worker FineTuneJobs declare theirs.
NAME_WAIT_ENV = "FINETUNE_RENDEZVOUS_TIMEOUT"
NAME_WAIT_DEFAULT_SECONDS = 600


# <hostname>.<subdomain>[.<namespace>[.svc[.cluster.local]]], each part a DNS label.
POD_DNS_NAME = re.compile(r"^(?P<host>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                          r"\.(?P<service>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                          r"(\.(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                          r"(\.svc(\.cluster\.local)?)?)?$")


def resolve_pod_dns_names(api: client.CoreV1Api, namespace: str, env: dict[str, str],
                          give_up: bool = False) -> dict[str, str]:
    """env with every pod DNS name (see the module docstring) replaced by the pod's address;
    one without an address yet raises NameNotResolvedYet, or with give_up stays as it is."""
    resolved = dict(env)
    for key, value in env.items():
        match = POD_DNS_NAME.match(value)
        if not match:
            continue
        service_namespace = match["namespace"] or namespace
        try:
            service = api.read_namespaced_service(match["service"], service_namespace)
        except ApiException as error:
            if error.status == 404:
                continue  # not a Service: an ordinary host name, left to the process
            raise
        if service.spec.cluster_ip != "None":
            continue
        address = pod_dns_address(api, service, match["host"])
        if address is None and not give_up:
            wait = float(env.get(NAME_WAIT_ENV) or NAME_WAIT_DEFAULT_SECONDS)
            raise NameNotResolvedYet(f"{key}={value}: no address yet (pod {match['host']} of "
                                     f"Service {service_namespace}/{match['service']} not "
                                     f"running)", wait)
        if address is not None:
            resolved[key] = address
    return resolved


def pod_dns_address(api: client.CoreV1Api, service, hostname: str) -> str | None:
    """The address CoreDNS would answer for <hostname>.<service>: that of the pod the Service
    selects with this spec.hostname and spec.subdomain, as the EndpointSlice controller would
    publish it. (Here it cannot: the API refuses loopback addresses in EndpointSlices, and pod
    addresses on this machine are loopback ones, so the agent reads the pods themselves.)"""
    selector = ",".join(f"{k}={v}" for k, v in sorted((service.spec.selector or {}).items()))
    if not selector:
        return None
    for pod in api.list_namespaced_pod(service.metadata.namespace, label_selector=selector).items:
        ready = any(c.type == "Ready" and c.status == "True"
                    for c in (pod.status.conditions or []))
        if (pod.spec.hostname == hostname and pod.spec.subdomain == service.metadata.name
                and pod.status.pod_ip and pod.status.phase not in ("Succeeded", "Failed")
                and not pod.metadata.deletion_timestamp
                and (ready or service.spec.publish_not_ready_addresses)):
            return pod.status.pod_ip
    return None


# --------------------------------------------------------------------------------------------
# Turning a pod spec into a local process


class PodSpecResolver:
    """Resolves env and volumes of one pod against the API, the way the kubelet does."""

    def __init__(self, api: client.CoreV1Api, pod: dict, poddir: Path, pod_ip: str):
        self.api = api
        self.pod_ip = pod_ip
        self.pod = pod
        self.namespace = pod["metadata"]["namespace"]
        self.poddir = poddir
        self._cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def _source(self, kind: str, name: str) -> dict[str, str] | None:
        """Data of a Secret (decoded) or ConfigMap, or None when it does not exist."""
        key = (kind, name)
        if key not in self._cache:
            try:
                if kind == "secret":
                    obj = self.api.read_namespaced_secret(name, self.namespace)
                    data = {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
                else:
                    obj = self.api.read_namespaced_config_map(name, self.namespace)
                    data = dict(obj.data or {})
                self._cache[key] = data
            except ApiException as error:
                if error.status != 404:
                    raise
                self._cache[key] = None
        return self._cache[key]

    def _key(self, kind: str, ref: dict) -> str | None:
        data = self._source(kind, ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            what = "secret" if kind == "secret" else "configmap"
            missing = f'{what} "{ref["name"]}" not found' if data is None else \
                f'couldn\'t find key {ref["key"]} in {"Secret" if kind == "secret" else "ConfigMap"} {self.namespace}/{ref["name"]}'
            raise ConfigError(missing)
        return data[ref["key"]]

    def field(self, path: str) -> str:
        meta, spec, status = self.pod["metadata"], self.pod["spec"], self.pod.get("status") or {}
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
        values = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
            "spec.serviceAccountName": spec.get("serviceAccountName", ""),
            "status.podIP": self.pod_ip, "status.hostIP": status.get("hostIP") or HOST_IP,
            "status.podIPs": self.pod_ip, "status.hostIPs": HOST_IP,
        }
        if path not in values:
            raise ConfigError(f"unsupported fieldRef {path}")
        return values[path]

    def env(self, container: dict) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, ref_key in (("configmap", "configMapRef"), ("secret", "secretRef")):
                ref = source.get(ref_key)
                if not ref:
                    continue
                data = self._source(kind, ref["name"])
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f'{"secret" if kind == "secret" else "configmap"} "{ref["name"]}" not found')
                env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            value_from = item.get("valueFrom")
            if not value_from:
                env[item["name"]] = expand(item.get("value", ""), env)
            elif "secretKeyRef" in value_from:
                value = self._key("secret", value_from["secretKeyRef"])
                if value is not None:
                    env[item["name"]] = value
            elif "configMapKeyRef" in value_from:
                value = self._key("configmap", value_from["configMapKeyRef"])
                if value is not None:
                    env[item["name"]] = value
            elif "fieldRef" in value_from:
                env[item["name"]] = self.field(value_from["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in value_from:
                ref = value_from["resourceFieldRef"]
                kind, _, resource = ref["resource"].partition(".")
                resources = (container.get("resources") or {}).get(kind) or {}
                env[item["name"]] = str(resources.get(resource, "0"))
        return env

    # --- volumes

    def volumes(self) -> dict[str, Path]:
        """Materialise every volume; returns volume name -> local directory."""
        paths = {}
        for volume in self.pod["spec"].get("volumes") or []:
            target = self.poddir / "volumes" / volume["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "emptyDir" in volume:
                pass
            elif "configMap" in volume:
                self._write_source(target, "configmap", volume["configMap"])
            elif "secret" in volume:
                self._write_source(target, "secret", {**volume["secret"], "name": volume["secret"]["secretName"]})
            elif "downwardAPI" in volume:
                self._write_downward(target, volume["downwardAPI"].get("items") or [])
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    if "configMap" in source:
                        self._write_source(target, "configmap", source["configMap"])
                    elif "secret" in source:
                        self._write_source(target, "secret", source["secret"])
                    elif "downwardAPI" in source:
                        self._write_downward(target, source["downwardAPI"].get("items") or [])
                    elif "serviceAccountToken" in source:
                        self._write_token(target, source["serviceAccountToken"])
            else:
                log.warning("%s: volume %s has an unsupported type; mounted as an empty directory",
                            self.namespace, volume["name"])
            paths[volume["name"]] = target
        return paths

    def _write_source(self, target: Path, kind: str, ref: dict) -> None:
        data = self._source(kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                return
            raise ConfigError(f'{"secret" if kind == "secret" else "configmap"} "{ref["name"]}" not found')
        items = ref.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                if ref.get("optional"):
                    continue
                raise ConfigError(f'key {item["key"]} not found in {ref["name"]}')
            path = target / item["path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(data[item["key"]])

    def _write_downward(self, target: Path, items: list[dict]) -> None:
        for item in items:
            if "fieldRef" in item:
                path = target / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.field(item["fieldRef"]["fieldPath"]))

    def _write_token(self, target: Path, source: dict) -> None:
        """A real bound token from the TokenRequest API, so in-pod API calls authenticate."""
        meta = self.pod["metadata"]
        request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[source["audience"]] if source.get("audience") else [],
            expiration_seconds=source.get("expirationSeconds", 3600),
            bound_object_ref=client.V1BoundObjectReference(
                kind="Pod", api_version="v1", name=meta["name"], uid=meta["uid"])))
        try:
            token = self.api.create_namespaced_service_account_token(
                self.pod["spec"].get("serviceAccountName") or "default", meta["namespace"], request)
            (target / source.get("path", "token")).write_text(token.status.token)
        except ApiException as error:
            raise ConfigError(f"service account token: {error.reason}") from error


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    def replace(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)", replace, value)


def path_rewriter(mounts: list[tuple[str, Path]]):
    """A function replacing each mountPath, at a path boundary, with its materialised path.

    One pass over the value with every mountPath in one pattern (longest first): a materialised
    path that itself contains another mountPath (state under /tmp, a /tmp mount) is not rewritten
    again."""
    local_of = {mount.rstrip("/"): str(local) for mount, local in mounts if mount.rstrip("/")}
    if not local_of:
        return lambda value: value
    alternatives = "|".join(re.escape(m) for m in sorted(local_of, key=len, reverse=True))
    pattern = re.compile(r"(?<![\w.\-/])(" + alternatives + r")(?=/|$|[^\w.\-])")

    def rewrite(value: str) -> str:
        return pattern.sub(lambda match: local_of[match.group(1)], value)
    return rewrite


# --------------------------------------------------------------------------------------------
# The agent


class PodRunner(threading.Thread):
    """Runs one pod: configure, start, wait, report; restarts per restartPolicy; stops on delete."""

    def __init__(self, agent: "Agent", pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.pod = pod
        self.key = f"{meta['namespace']}/{meta['name']}"
        self.uid = meta["uid"]
        self.poddir = agent.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{self.uid[:8]}"
        self.pod_ip = agent.allocate_ip(self.uid)
        self.deleting = threading.Event()
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()

    # --- status

    def write_status(self, status: dict) -> None:
        meta = self.pod["metadata"]
        api = self.agent.api
        for _ in range(10):
            try:
                current = api.read_namespaced_pod(meta["name"], meta["namespace"])
                if current.metadata.uid != self.uid:
                    return
                body = api.api_client.sanitize_for_serialization(current)
                old = body.get("status") or {}
                # Keep the conditions others own (PodScheduled, DisruptionTarget from an eviction,
                # readiness gates), as the kubelet does: the Job controller's podFailurePolicy
                # reads DisruptionTarget.
                ours = {c["type"] for c in status.get("conditions", [])}
                kept = [c for c in old.get("conditions") or [] if c["type"] not in ours]
                body["status"] = {**old, **status, "conditions": kept + status.get("conditions", [])}
                api.replace_namespaced_pod_status(meta["name"], meta["namespace"], body)
                return
            except ApiException as error:
                if error.status == 404:
                    return
                if error.status != 409:
                    log.warning("%s: status update failed: %s", self.key, error.reason)
                time.sleep(0.2)

    def container_base(self, container: dict) -> dict:
        return {"name": container["name"], "image": container.get("image", ""), "imageID": "",
                "restartCount": self.restarts}

    def conditions(self, ready: bool, reason: str | None = None) -> list[dict]:
        t = now()
        cond = [{"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t}]
        for kind in ("ContainersReady", "Ready"):
            c = {"type": kind, "status": "True" if ready else "False", "lastTransitionTime": t}
            if reason:
                c["reason"] = reason
            cond.append(c)
        return cond

    def report_waiting(self, container: dict, reason: str, message: str, last: dict | None = None) -> None:
        status = {**self.container_base(container), "ready": False, "started": False,
                  "state": {"waiting": {"reason": reason, "message": message}}}
        if last:
            status["lastState"] = last
        phase = "Running" if self.restarts else "Pending"
        self.write_status({"phase": phase, "hostIP": HOST_IP, "podIP": self.pod_ip,
                           "podIPs": [{"ip": self.pod_ip}], "startTime": self.start_time,
                           "conditions": self.conditions(False, "ContainersNotReady"),
                           "containerStatuses": [status]})

    # --- lifecycle

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.exception("%s: agent error", self.key)
        finally:
            self.agent.forget(self)

    def _run(self) -> None:
        spec = self.pod["spec"]
        container = spec["containers"][0]
        policy = spec.get("restartPolicy", "Always")
        self.restarts = 0
        self.start_time = now()
        last_state = None
        backoff = 1.0
        waiting_for, waiting_since, wait_limit = None, None, float(NAME_WAIT_DEFAULT_SECONDS)
        while not self.deleting.is_set():
            try:
                argv, env, cwd = self.prepare(container, give_up_names=waiting_since is not None
                                              and time.monotonic() - waiting_since > wait_limit)
            except NameNotResolvedYet as error:
                if str(error) != waiting_for:
                    waiting_for, waiting_since = str(error), waiting_since or time.monotonic()
                    wait_limit = error.wait_seconds
                    log.info("%s: %s (waiting up to %.0f s)", self.key, error, wait_limit)
                    self.report_waiting(container, "ContainerCreating", waiting_for)
                self.deleting.wait(0.5)
                continue
            except ConfigError as error:
                log.info("%s: %s", self.key, error)
                self.report_waiting(container, "CreateContainerConfigError", str(error))
                self.deleting.wait(3)
                continue
            started_at = now()
            exit_code, message = self.execute(container, argv, env, cwd, started_at)
            terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                          "startedAt": started_at, "finishedAt": now(),
                          "containerID": f"podagent://{self.uid}"}
            if message:
                terminated["message"] = message
            restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
            if self.deleting.is_set() or not restart:
                # Like the kubelet, a deleted pod gets a terminal phase before it is removed.
                phase = "Succeeded" if exit_code == 0 else "Failed"
                self.write_status({
                    "phase": phase, "hostIP": HOST_IP, "podIP": self.pod_ip,
                    "podIPs": [{"ip": self.pod_ip}],
                    "startTime": self.start_time,
                    "conditions": self.conditions(False, "PodCompleted"),
                    "containerStatuses": [{**self.container_base(container), "ready": False,
                                           "started": False, "state": {"terminated": terminated},
                                           **({"lastState": last_state} if last_state else {})}],
                })
                log.info("%s: %s (exit code %d)", self.key, phase, exit_code)
                return
            last_state = {"terminated": terminated}
            self.restarts += 1
            self.report_waiting(container, "CrashLoopBackOff",
                                f"back-off {backoff:.0f}s restarting failed container", last_state)
            self.deleting.wait(backoff)
            backoff = min(backoff * 2, 60)

    def metrics_port(self, container: dict) -> int:
        """The container port named `metrics` (as a real pod would listen on), else a free one."""
        for port in container.get("ports") or []:
            if port.get("name") == "metrics":
                return int(port["containerPort"])
        return free_port(self.pod_ip)

    def prepare(self, container: dict, give_up_names: bool = False
                ) -> tuple[list[str], dict[str, str], Path]:
        resolver = PodSpecResolver(self.agent.api, self.pod, self.poddir, self.pod_ip)
        volumes = resolver.volumes()
        root = self.poddir / "root"
        root.mkdir(parents=True, exist_ok=True)
        mounts = []
        for mount in container.get("volumeMounts") or []:
            source = volumes.get(mount["name"])
            if source is None:
                raise ConfigError(f"volume {mount['name']} not found")
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            link = root / mount["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                if link.is_dir() and not link.is_symlink():
                    shutil.rmtree(link)
                else:
                    link.unlink()
            link.symlink_to(source)
            mounts.append((mount["mountPath"], link))
        rewrite = path_rewriter(mounts)

        spec_env = {k: rewrite(v) for k, v in resolver.env(container).items()}
        spec_env = resolve_pod_dns_names(self.agent.api, self.pod["metadata"]["namespace"],
                                         spec_env, give_up=give_up_names)
        tmp = self.poddir / "tmp"
        tmp.mkdir(exist_ok=True)
        self.termination_log = self.poddir / "termination-log"
        self.termination_log.write_text("")
        env = {
            "PATH": self.agent.path, "HOME": os.environ.get("HOME", str(root)),
            "LANG": os.environ.get("LANG", "C.UTF-8"), "TMPDIR": str(tmp),
            "HOSTNAME": self.pod["metadata"]["name"],
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(self.agent.api_port),
            **spec_env,
            "FINETUNE_METRICS_ADDR": self.pod_ip,
            "FINETUNE_METRICS_PORT": str(self.metrics_port(container)),
            "FINETUNE_TERMINATION_LOG": str(self.termination_log),
            "PYTHONUNBUFFERED": spec_env.get("PYTHONUNBUFFERED", "1"),
        }
        argv = [rewrite(expand(a, env)) for a in (container.get("command") or []) + (container.get("args") or [])]
        if not argv:
            raise ConfigError("container has no command or args (images are not available locally)")
        if os.path.basename(argv[0]) in ("python", "python3", f"python3.{sys.version_info.minor}"):
            argv[0] = sys.executable
        elif "/" not in argv[0]:
            argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else root
        if container.get("workingDir") and not cwd.exists():
            cwd = root / container["workingDir"].lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        return argv, env, cwd

    def execute(self, container: dict, argv: list[str], env: dict[str, str], cwd: Path,
                started_at: str) -> tuple[int, str]:
        port = int(env["FINETUNE_METRICS_PORT"])
        meta = self.pod["metadata"]
        log_path = self.agent.logs_dir / f"{meta['namespace']}_{meta['name']}.log"
        log.info("%s: starting %s (metrics port %d, log %s)", self.key, argv, port, log_path)
        with open(log_path, "ab") as output:
            output.write(f"--- podagent: {started_at} {argv}\n".encode())
            output.flush()
            try:
                with self.lock:
                    if self.deleting.is_set():
                        return 137, "deleted before start"
                    self.process = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                                    stdout=output, stderr=subprocess.STDOUT,
                                                    start_new_session=True)
            except OSError as error:
                write_atomic(self.termination_log, str(error))
                return 128, str(error)[:TERMINATION_MESSAGE_LIMIT]
        pid_file = self.agent.pids_dir / str(self.process.pid)
        pid_file.write_text(self.key)
        self.agent.publish(self, port)
        self.write_status({
            "phase": "Running", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
            "podIP": self.pod_ip, "podIPs": [{"ip": self.pod_ip}], "startTime": self.start_time,
            "conditions": self.conditions(True),
            "containerStatuses": [{**self.container_base(container), "ready": True, "started": True,
                                   "containerID": f"podagent://{self.uid}",
                                   "state": {"running": {"startedAt": started_at}}}],
        })
        returncode = self.process.wait()
        self.agent.unpublish(self)
        pid_file.unlink(missing_ok=True)
        exit_code = returncode if returncode >= 0 else 128 - returncode
        message = self.termination_log.read_bytes()[:TERMINATION_MESSAGE_LIMIT].decode(errors="replace")
        if not message and container.get("terminationMessagePolicy") == "FallbackToLogsOnError" and exit_code:
            message = log_path.read_bytes()[-TERMINATION_MESSAGE_LIMIT:].decode(errors="replace")
        return exit_code, message

    def terminate(self, grace: float) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after the grace period."""
        with self.lock:
            self.deleting.set()
            process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class Agent:
    def __init__(self, api: client.CoreV1Api, state_dir: Path, targets_file: Path):
        self.api = api
        self.state_dir = state_dir
        self.targets_file = targets_file
        self.ports_file = state_dir / "ports.json"
        self.logs_dir = state_dir / "logs"
        self.pids_dir = state_dir / "pids"
        for d in (self.logs_dir, self.pids_dir, state_dir / "pods"):
            d.mkdir(parents=True, exist_ok=True)
        self.runners: dict[str, PodRunner] = {}   # pod uid -> runner
        self.pod_ips: dict[str, str] = {}          # pod uid -> its loopback address
        self.finished: set[str] = set()            # uids this agent ran to completion
        self.ports: dict[str, dict] = {}           # "ns/name" -> port record
        self.lock = threading.RLock()
        self.path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
        host = api.api_client.configuration.host
        self.api_port = int(host.rsplit(":", 1)[1]) if host.count(":") == 2 else 443
        self.stopping = threading.Event()

    # --- metrics endpoints

    def publish(self, runner: PodRunner, port: int) -> None:
        labels = runner.pod["metadata"].get("labels") or {}
        with self.lock:
            self.ports[runner.key] = {
                "namespace": runner.pod["metadata"]["namespace"], "pod": runner.pod["metadata"]["name"],
                "uid": runner.uid, "finetunejob": labels.get(JOB_LABEL, ""), "ip": runner.pod_ip,
                "port": port, "url": f"http://{runner.pod_ip}:{port}/metrics"}
            self._write_targets()

    def unpublish(self, runner: PodRunner) -> None:
        with self.lock:
            if self.ports.get(runner.key, {}).get("uid") == runner.uid:
                del self.ports[runner.key]
                self._write_targets()

    def _write_targets(self) -> None:
        write_atomic(self.ports_file, json.dumps(self.ports, indent=2, sort_keys=True) + "\n")
        targets = [{"targets": [f"{p['ip']}:{p['port']}"],
                    "labels": {"namespace": p["namespace"], "pod": p["pod"], "finetunejob": p["finetunejob"]}}
                   for p in sorted(self.ports.values(), key=lambda p: (p["namespace"], p["pod"]))]
        write_atomic(self.targets_file, json.dumps(targets, indent=2) + "\n")

    # --- pods

    def allocate_ip(self, uid: str) -> str:
        with self.lock:
            if uid not in self.pod_ips:
                taken = set(self.pod_ips.values())
                self.pod_ips[uid] = next(ip for ip in POD_IP_RANGE if ip not in taken)
            return self.pod_ips[uid]

    def forget(self, runner: PodRunner) -> None:
        with self.lock:
            self.pod_ips.pop(runner.uid, None)
            self.runners.pop(runner.uid, None)
            self.finished.add(runner.uid)
        if runner.deleting.is_set():
            self.delete_pod(runner.pod)

    def delete_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiException):
            self.api.delete_namespaced_pod(
                meta["name"], meta["namespace"], grace_period_seconds=0,
                body=client.V1DeleteOptions(grace_period_seconds=0,
                                            preconditions=client.V1Preconditions(uid=meta["uid"])))
        log.info("%s/%s: deleted", meta["namespace"], meta["name"])

    def handle(self, event_type: str, pod: dict) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        status = pod.get("status") or {}
        with self.lock:
            runner = self.runners.get(uid)
            if event_type == "DELETED":
                if runner:
                    runner.terminate(0)
                self.finished.discard(uid)
                shutil.rmtree(self.state_dir / "pods" / f"{meta['namespace']}_{meta['name']}_{uid[:8]}",
                              ignore_errors=True)
                return
            if meta.get("deletionTimestamp"):
                if runner:
                    if not runner.deleting.is_set():
                        grace = meta.get("deletionGracePeriodSeconds")
                        if grace is None:
                            grace = spec.get("terminationGracePeriodSeconds", 30)
                        log.info("%s/%s: deletion requested; stopping (grace %ss)",
                                 meta["namespace"], meta["name"], grace)
                        threading.Thread(target=runner.terminate, args=(float(grace),), daemon=True).start()
                else:
                    threading.Thread(target=self.delete_pod, args=(pod,), daemon=True).start()
                return
            if runner or uid in self.finished or not spec.get("nodeName"):
                return
            if status.get("phase") in ("Succeeded", "Failed"):
                return
            if status.get("phase") == "Running":
                # Started by an earlier agent process, which took the process with it.
                self.finished.add(uid)
                threading.Thread(target=self.mark_lost, args=(pod,), daemon=True).start()
                return
            runner = PodRunner(self, pod)
            self.runners[uid] = runner
        runner.start()

    def mark_lost(self, pod: dict) -> None:
        runner = PodRunner(self, pod)
        runner.restarts = 0
        container = pod["spec"]["containers"][0]
        runner.write_status({"phase": "Failed", "conditions": runner.conditions(False, "PodCompleted"),
                             "containerStatuses": [{**runner.container_base(container), "ready": False,
                                                    "started": False, "state": {"terminated": {
                                                        "exitCode": 137, "reason": "Error",
                                                        "message": "podagent restarted; process lost",
                                                        "finishedAt": now()}}}]})

    def watch_pods(self) -> None:
        (self.state_dir / "ready").write_text(str(os.getpid()))
        serialize = self.api.api_client.sanitize_for_serialization
        while not self.stopping.is_set():
            try:
                listing = self.api.list_pod_for_all_namespaces(label_selector=TRAINER_SELECTOR)
                for pod in listing.items:
                    self.handle("ADDED", serialize(pod))
                version = listing.metadata.resource_version
                while not self.stopping.is_set():
                    stream = watch.Watch().stream(
                        self.api.list_pod_for_all_namespaces, label_selector=TRAINER_SELECTOR,
                        resource_version=version, timeout_seconds=30, allow_watch_bookmarks=True)
                    for event in stream:
                        obj = event["object"]
                        if event["type"] == "ERROR":
                            raise ApiException(status=getattr(obj, "code", None) or obj.get("code", 500))
                        pod = serialize(obj)
                        version = pod["metadata"]["resourceVersion"]
                        if event["type"] != "BOOKMARK":
                            self.handle(event["type"], pod)
            except ApiException as error:
                if error.status != 410:
                    log.warning("watch failed (%s); relisting", error.status)
                    time.sleep(1)
            except Exception:
                if self.stopping.is_set():
                    return
                log.exception("watch failed; relisting")
                time.sleep(1)

    def shutdown(self, *_args) -> None:
        self.stopping.set()
        with self.lock:
            runners = list(self.runners.values())
        for runner in runners:
            runner.terminate(5)
        for pid_file in self.pids_dir.iterdir():
            pid_file.unlink(missing_ok=True)
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run trainer pods of the local cluster as processes")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--targets-file", type=Path, required=True,
                        help="Prometheus file_sd file listing the trainers' metrics endpoints")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = client.CoreV1Api(config.new_client_from_config(config_file=args.kubeconfig))
    agent = Agent(api, args.state_dir.resolve(), args.targets_file.resolve())
    agent._write_targets()
    signal.signal(signal.SIGTERM, agent.shutdown)
    signal.signal(signal.SIGINT, agent.shutdown)
    agent.watch_pods()
    return 0


if __name__ == "__main__":
    sys.exit(main())
