"""Operator scale benchmark on the local cluster ("Operator at cluster scale"), in one run:

1. Burst: create N FineTuneJobs (suspend: true) as fast as the API server takes them; for each,
   the time from its create call returning to its trainer Job being seen in a watch (p50 / p90 /
   p99 / max), the creates' own time, the time until the last Job exists and its ratio to the
   create time. Targets: ratio <= 3, p99 <= 2 s.
2. API requests per FineTuneJob, create -> Job + first status: the API server's own
   apiserver_request_total (its /metrics) before the burst and once every burst FineTuneJob has
   its Job and a status (phase and jobName); the delta by verb / resource / subresource over N,
   the benchmark's own calls taken out. Target: operator writes <= 3 per FineTuneJob.
3. Memory: the operator's RSS with M resident FineTuneJobs (target <= 200 MiB); then C more are
   created, settled and deleted (gone from the API, their Jobs too) and the RSS is read again
   (target: within 10 % of before).
4. R running jobs: FineTuneJobs that are not suspended, whose trainer pods go to a fake node a
   second kwok keeps (the cluster's kwok completes every Job pod at once; see BenchNode), and
   whose pod IPs answer /metrics with a trainer's exposition from stand-ins inside the cluster
   network namespace (bench/trainer_standins.py; some advance an epoch every few seconds, the
   others never change). Over a window: API requests per second per running job (writes, reads),
   status PATCHes against the progress changes the operator read, and a check that the operator
   wrote status.progress for the advancing ones.

The operator runs from the working tree as a subprocess inside the cluster network namespace
(`ip netns exec`): its API server is local there, and so are the stand-ins' pod IPs (kwok's pod
CIDR is routed nowhere, on purpose). Prints one JSON document, then the summary lines with
PASS / MISS per target. Exits non-zero only when something could not be measured.

    python bench/operator_scale.py --cluster-env .state/cluster/env \
        [--burst 200] [--resident 1000] [--churn 1000] [--running 100] [--window 60]

Without --cluster-env (or FINETUNE_CLUSTER_ENV) a cluster is started for the run and stopped
after it (cluster/localcluster.py; binaries from `make cluster-build`). Needs root (netns).
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import os
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "operator")]

from kubernetes import client, config, watch  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from finetune_api import GROUP, PLURAL, VERSION  # noqa: E402
from finetune_api.tenancy import DEFAULT_TOLERATION_KEYS  # noqa: E402

TRAINER_SELECTOR = "finetune.dev/component=trainer"
BENCH_TAINT_KEY = "bench.finetune.dev/node"
SET_LABEL = "bench.finetune.dev/set"  # which part of the benchmark made a FineTuneJob
FINETUNEJOB_ANNOTATION = "finetune.dev/finetunejob"  # on trainer pods (builders.py)
FTJ_RESOURCE = f"{PLURAL}.{GROUP}"
METRICS_PORT = 9400  # the trainer's default metrics port (spec.metrics.port unset)
CREDENTIALS_SECRET = "bench-s3-credentials"  # named only: no trainer ever reads it
STANDIN_START_EPOCH = 3  # bench/trainer_standins.py START_EPOCH

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE", "DELETECOLLECTION", "APPLY"}
READ_VERBS = {"GET", "LIST", "WATCH"}
STATUS_PATCH = ("PATCH", FTJ_RESOURCE, "status")
EVENT_POSTS = [("POST", "events", ""), ("POST", "events.events.k8s.io", "")]
# What the operator writes for one FineTuneJob (events: the controllers post some too).
OPERATOR_WRITES = [("POST", "jobs.batch", ""), ("POST", "networkpolicies.networking.k8s.io", ""),
                   ("POST", "services", ""), ("POST", "configmaps", ""),
                   ("PATCH", "jobs.batch", ""), ("PUT", "jobs.batch", ""),
                   STATUS_PATCH, *EVENT_POSTS]
OPERATOR_COMPONENT = "finetune-operator"  # the reportingComponent of the operator's events

TARGETS = {"burst_ratio": 3.0, "burst_p99_seconds": 2.0, "operator_writes_per_finetunejob": 3.0,
           "resident_rss_mib": 200.0, "churn_rss_change": 0.10}

Key = tuple[str, str, str]  # verb, resource[.group], subresource


# --------------------------------------------------------------------------------------------
# The cluster


def load_localcluster():
    spec = importlib.util.spec_from_file_location("localcluster",
                                                  REPO / "cluster" / "localcluster.py")
    localcluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localcluster)
    return localcluster


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def start_cluster(localcluster) -> tuple[object, dict[str, str]]:
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    os.environ["PATH"] = f"{cache / 'bin'}{os.pathsep}{os.environ['PATH']}"
    cluster = localcluster.Cluster(Path(tempfile.mkdtemp(prefix="finetune-bench-")))
    cluster.up(images={})  # no trainer runs in a container here
    return cluster, read_env_file(cluster.env_file)


def binary(name: str) -> str:
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    for directory in [cache / "bin", *os.environ.get("PATH", "").split(os.pathsep)]:
        if (Path(directory) / name).exists():
            return str(Path(directory) / name)
    raise SystemExit(f"{name} not found ($CACHE_DIR/bin or PATH); run `make cluster-build`")


def install_crd(kubeconfig: str) -> None:
    """The working tree's CRD, as the tests install it (idempotent)."""
    kubectl = [binary("kubectl"), f"--kubeconfig={kubeconfig}"]
    subprocess.run(kubectl + ["apply", "--server-side", "--force-conflicts", "-f",
                              str(REPO / "crds")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(kubectl + ["wait", "--for=condition=Established",
                              f"crd/{PLURAL}.{GROUP}", "--timeout=60s"],
                   check=True, stdout=subprocess.DEVNULL)


def free_port(avoid: set[int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


# --------------------------------------------------------------------------------------------
# Small measurements


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def mib(value: float) -> float:
    return round(value / 2**20, 1)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


# --------------------------------------------------------------------------------------------
# The API server's request counters


class ApiRequests:
    """apiserver_request_total from the API server's /metrics, summed over codes, scopes and
    versions per (verb, resource[.group], subresource); non-resource requests (/metrics itself,
    /readyz, ...) are left out. `own` counts the benchmark's own calls, to be taken out."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        self.own: Counter[Key] = Counter()

    def scrape(self) -> tuple[Counter[Key], Counter[Key]]:
        """(requests, of which answered with a non-2xx code)."""
        response = self.api.call_api("/metrics", "GET", auth_settings=["BearerToken"],
                                     _preload_content=False, _return_http_data_only=True)
        text = response.data.decode()
        requests: Counter[Key] = Counter()
        failed: Counter[Key] = Counter()
        for family in text_string_to_metric_families(text):
            if family.name != "apiserver_request":
                continue
            for sample in family.samples:
                if sample.name != "apiserver_request_total" or not sample.labels.get("resource"):
                    continue
                labels = sample.labels
                group = labels.get("group")
                resource = labels["resource"] + (f".{group}" if group else "")
                key = (labels["verb"], resource, labels.get("subresource", ""))
                requests[key] += int(sample.value)
                if not labels.get("code", "200").startswith("2"):
                    failed[key] += int(sample.value)
        return requests, failed

    def count_own(self, verb: str, resource: str, subresource: str = "", times: int = 1) -> None:
        self.own[(verb, resource, subresource)] += times


@dataclass
class RequestWindow:
    """Requests between two scrapes, with the benchmark's own calls in the window apart."""

    total: Counter[Key]
    failed: Counter[Key]
    own: Counter[Key]
    seconds: float

    @classmethod
    def measure(cls, requests: ApiRequests, action) -> tuple["RequestWindow", object]:
        """Runs action() between two scrapes; returns the window and what action returned."""
        before, failed_before = requests.scrape()
        own_before = Counter(requests.own)
        started = time.monotonic()
        result = action()
        seconds = time.monotonic() - started
        after, failed_after = requests.scrape()
        return cls(after - before, failed_after - failed_before, requests.own - own_before,
                   seconds), result

    def others(self, key: Key) -> int:
        return max(0, self.total[key] - self.own[key])

    def keys(self) -> list[Key]:
        return sorted(k for k in self.total if self.total[k] > 0)

    def sum(self, keys, baseline: "RequestWindow | None" = None) -> float:
        return sum(self.attributable(k, baseline) for k in keys)

    def attributable(self, key: Key, baseline: "RequestWindow | None" = None) -> float:
        """Requests of others than the benchmark, less what the baseline's rate would give."""
        count = float(self.others(key))
        if baseline is not None and baseline.seconds > 0:
            count -= baseline.others(key) / baseline.seconds * self.seconds
        return max(0.0, count)

    def table(self, divisor: float, baseline: "RequestWindow | None" = None) -> list[dict]:
        rows = []
        for verb, resource, subresource in self.keys():
            key = (verb, resource, subresource)
            row = {"verb": verb, "resource": resource, "subresource": subresource,
                   "requests": self.total[key], "bench_own": self.own[key],
                   "non_2xx": self.failed[key],
                   "per_unit": round(self.attributable(key, baseline) / divisor, 4)}
            if baseline is not None:
                row["baseline_per_second"] = round(
                    baseline.others(key) / baseline.seconds, 3) if baseline.seconds else 0.0
            rows.append(row)
        return rows


def print_table(title: str, rows: list[dict], unit: str) -> None:
    print(f"\n{title}")
    baseline = any("baseline_per_second" in r for r in rows)
    header = f"  {'verb':7} {'resource':38} {'sub':8} {'requests':>8} {'bench':>6} {'non2xx':>6}"
    header += f" {'base/s':>7}" if baseline else ""
    print(header + f" {unit:>10}")
    for r in rows:
        line = (f"  {r['verb']:7} {r['resource'][:38]:38} {r['subresource'][:8]:8} "
                f"{r['requests']:>8} {r['bench_own']:>6} {r['non_2xx']:>6}")
        line += f" {r['baseline_per_second']:>7}" if baseline else ""
        print(line + f" {r['per_unit']:>10}")


# --------------------------------------------------------------------------------------------
# FineTuneJobs


@dataclass
class Placement:
    """Where a running job's pod goes: the benchmark's fake node, by its product label."""

    node_selector: dict[str, str]
    tolerations: list[dict]


def manifest(name: str, part: str, placement: Placement | None = None) -> dict:
    """A FineTuneJob; suspended unless it has a placement (then its pod goes to a fake node)."""
    resources: dict = {"gpus": 1}
    if placement:
        resources |= {"nodeSelector": placement.node_selector,
                      "tolerations": placement.tolerations}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
            "metadata": {"name": name, "labels": {SET_LABEL: part}},
            "spec": {"dataset": {"uri": "s3://datasets/fashion-mnist/",
                                 "s3": {"credentialsSecret": CREDENTIALS_SECRET}},
                     "model": {"backbone": "resnet18", "weights": "None", "imageSize": 32},
                     "epochs": 1000,
                     "output": {"uri": f"s3://models/bench/{name}/"},
                     "resources": resources, "suspend": placement is None}}


def changed_fields(before: dict, after: dict) -> tuple[str, ...]:
    """The status fields a write changed; "progress.updateTime" when progress changed in its
    time only (the same reading written again)."""
    fields = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) == after.get(key):
            continue
        if key == "progress" and {**(before.get(key) or {}), "updateTime": None} == \
                {**(after.get(key) or {}), "updateTime": None}:
            key = "progress.updateTime"
        fields.append(key)
    return tuple(fields)


class StatusWatcher(threading.Thread):
    """Every write to one part's FineTuneJobs, from one watch: when, and which status fields it
    changed (the API server's counters say how many status PATCHes, not on which job or why)."""

    def __init__(self, custom: client.CustomObjectsApi, namespace: str, part: str):
        super().__init__(daemon=True)
        self.custom, self.namespace, self.part = custom, namespace, part
        self.writes: list[tuple[float, str, tuple[str, ...]]] = []  # time, name, fields
        self.stop = threading.Event()
        self.ready = threading.Event()
        self._last: dict[str, dict] = {}

    def run(self) -> None:
        stream = watch.Watch()
        self.ready.set()
        for event in stream.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION,
                                   self.namespace, PLURAL,
                                   label_selector=f"{SET_LABEL}={self.part}",
                                   timeout_seconds=3600):
            item = event["object"]
            name, status = item["metadata"]["name"], item.get("status") or {}
            before = self._last.get(name)
            if event["type"] == "MODIFIED" and before is not None:
                self.writes.append((time.monotonic(), name, changed_fields(before, status)))
            self._last[name] = status
            if self.stop.is_set():
                stream.stop()
                break

    def between(self, opened: float, closed: float) -> list[tuple[str, tuple[str, ...]]]:
        return [(name, fields) for at, name, fields in self.writes if opened <= at <= closed]


class JobWatcher(threading.Thread):
    """Records when each trainer Job is first seen, from one watch stream (one WATCH request,
    long enough to outlast the burst, so it never ends inside a measured window)."""

    def __init__(self, batch: client.BatchV1Api, namespace: str):
        super().__init__(daemon=True)
        self.batch, self.namespace = batch, namespace
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.streams = 0

    def run(self) -> None:
        while not self.stop.is_set():
            stream = watch.Watch()
            self.streams += 1
            self.ready.set()
            for event in stream.stream(self.batch.list_namespaced_job, self.namespace,
                                       label_selector=TRAINER_SELECTOR, timeout_seconds=1800):
                owner = (event["object"].metadata.owner_references or [None])[0]
                if owner is not None:
                    self.seen.setdefault(owner.name, time.monotonic())
                if self.stop.is_set():
                    stream.stop()
                    break


class Cluster:
    """The benchmark's calls to the API, its own ones counted."""

    def __init__(self, api: client.ApiClient, namespace: str, threads: int):
        self.api, self.namespace, self.threads = api, namespace, threads
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.requests = ApiRequests(api)

    def create_all(self, names: list[str], part: str,
                   placement: Placement | None = None) -> dict[str, float]:
        """Creates the FineTuneJobs in parallel; when each create call returned."""
        created: dict[str, float] = {}

        def create(name: str) -> None:
            self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                        manifest(name, part, placement))
            created[name] = time.monotonic()

        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(create, names))
        self.requests.count_own("POST", FTJ_RESOURCE, times=len(names))
        return created

    def finetunejobs(self, part: str | None = None) -> list[dict]:
        self.requests.count_own("LIST", FTJ_RESOURCE)
        selector = f"{SET_LABEL}={part}" if part else None
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                         label_selector=selector)["items"]

    def trainer_jobs(self) -> list:
        self.requests.count_own("LIST", "jobs.batch")
        return self.batch.list_namespaced_job(self.namespace,
                                              label_selector=TRAINER_SELECTOR).items

    def trainer_pods(self) -> list:
        self.requests.count_own("LIST", "pods")
        return self.core.list_namespaced_pod(self.namespace, label_selector=TRAINER_SELECTOR).items

    def delete_part(self, part: str, attempts: int = 5) -> None:
        """One delete-collection call; again while one times out (504: a loaded API server
        deleting a thousand objects takes longer than its request timeout; it goes on)."""
        for attempt in range(attempts):
            self.requests.count_own("DELETECOLLECTION", FTJ_RESOURCE)
            try:
                self.custom.delete_collection_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, label_selector=f"{SET_LABEL}={part}")
                return
            except client.ApiException as error:
                if error.status not in (500, 504) or attempt == attempts - 1:
                    raise

    def wait_until(self, done, timeout: float, interval: float = 1.0) -> bool:
        """Polls done() until it is true; an API server too busy to answer counts as not yet."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if done():
                    return True
            except client.ApiException as error:
                if error.status != 429 and (error.status or 0) < 500:
                    raise
            if time.monotonic() > deadline:
                return False
            time.sleep(interval)


def has_first_status(finetunejob: dict) -> bool:
    status = finetunejob.get("status") or {}
    return bool(status.get("phase") and status.get("jobName"))


def count_with_first_status(cluster: Cluster, part: str | None = None) -> int:
    return sum(1 for item in cluster.finetunejobs(part) if has_first_status(item))


# --------------------------------------------------------------------------------------------
# The operator under test


class Operator:
    """`python -m finetune_operator` from the working tree, in the cluster network namespace."""

    def __init__(self, env: dict[str, str], network, namespace: str, progress_interval: int,
                 avoid_ports: set[int], log_path: Path):
        self.address = network.services
        self.port = free_port(avoid_ports)
        self.log_path = log_path
        # The running jobs tolerate the benchmark node's taints (BenchNode).
        policy = {"allowedTolerationKeys": [*DEFAULT_TOLERATION_KEYS, "kwok.x-k8s.io/node",
                                            BENCH_TAINT_KEY]}
        operator_env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"],
                        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("api", "operator")),
                        "FINETUNE_WATCH_NAMESPACES": namespace, "POD_NAMESPACE": namespace,
                        "FINETUNE_OPERATOR_METRICS_ADDR": self.address,
                        "FINETUNE_OPERATOR_METRICS_PORT": str(self.port),
                        "FINETUNE_PROGRESS_INTERVAL_SECONDS": str(progress_interval),
                        "FINETUNE_TENANCY_POLICY": json.dumps(policy),
                        "FINETUNE_LOG_LEVEL": "WARNING",
                        # As the operator image sets it (Dockerfile): freed memory can go back.
                        "PYTHONMALLOC": "malloc"}
        argv = network.exec_prefix() + [sys.executable, "-m", "finetune_operator"]
        with open(log_path, "wb") as log:
            # `ip netns exec` execs in place: the pid is the operator's own.
            self.process = subprocess.Popen(argv, env=operator_env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_serving(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((self.address, self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit(f"operator did not start; its log ({self.log_path}):\n"
                                     f"{self.log_tail()}")
                time.sleep(0.5)

    def progress_reads(self) -> Counter:
        """The operator's finetune_operator_progress_reads_total, by result."""
        url = f"http://{self.address}:{self.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        reads: Counter = Counter()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "finetune_operator_progress_reads_total":
                    reads[sample.labels.get("result", "?")] += int(sample.value)
        return reads

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------------------------
# 1 + 2: burst, with the API requests it costs


def measure_baseline(cluster: Cluster, seconds: float) -> RequestWindow:
    """What the cluster asks of its API server with nothing happening (leases, kwok's and the
    kubelet's heartbeats, the Prometheus target lister), to be taken out of the windows."""
    window, _ = RequestWindow.measure(cluster.requests, lambda: time.sleep(seconds))
    return window


def events_by_reporter(cluster: Cluster) -> Counter:
    cluster.requests.count_own("LIST", "events")
    events = cluster.core.list_namespaced_event(cluster.namespace).items
    return Counter(e.reporting_component or (e.source.component if e.source else None) or "?"
                   for e in events)


def cluster_pids(cluster_dir: str) -> dict[str, int]:
    """The local cluster's components by name (cluster/localcluster.py records their pids)."""
    pids = {}
    for path in sorted((Path(cluster_dir) / "pids").glob("*.pid")):
        try:
            pids[path.stem] = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return pids


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float]:
    snapshot = {}
    for name, pid in pids.items():
        try:
            snapshot[name] = cpu_seconds(pid)
        except OSError:
            continue
    return snapshot


def measure_burst(cluster: Cluster, operator: Operator, count: int, timeout: float,
                  baseline: RequestWindow, components: dict[str, int]) -> dict:
    watcher = JobWatcher(cluster.batch, cluster.namespace)
    watcher.start()
    watcher.ready.wait(10)
    time.sleep(1)  # the watch is open before the first create
    names = [f"burst-{i:04d}" for i in range(count)]
    timings: dict = {}

    def burst() -> None:
        cpu_before = cpu_seconds(operator.pid)
        components_before = cpu_snapshot(components)
        own_before = time.process_time()
        started = timings["started"] = time.monotonic()
        timings["created"] = cluster.create_all(names, "burst")
        timings["create_seconds"] = time.monotonic() - started
        while len(watcher.seen) < count and time.monotonic() - started < timeout:
            time.sleep(0.1)
        timings["all_jobs_seconds"] = time.monotonic() - started
        # Job + first status for every one; polled with lists, counted as the bench's own.
        cluster.wait_until(lambda: count_with_first_status(cluster, "burst") >= count,
                           timeout=max(0.0, timeout - (time.monotonic() - started)))
        timings["all_status_seconds"] = time.monotonic() - started
        timings["operator_cpu_seconds"] = cpu_seconds(operator.pid) - cpu_before
        # Where the machine's time went: on a small machine the API server and etcd share the
        # cores with the operator, and their cost per FineTuneJob bounds the burst too.
        components_after = cpu_snapshot(components)
        timings["cpu_seconds"] = {
            **{name: round(components_after[name] - before, 2)
               for name, before in components_before.items() if name in components_after},
            "operator": round(timings["operator_cpu_seconds"], 2),
            "benchmark": round(time.process_time() - own_before, 2)}

    window, _ = RequestWindow.measure(cluster.requests, burst)
    watcher.stop.set()
    created, started_at = timings["created"], timings["started"]
    latencies = [watcher.seen[n] - created[n] for n in names if n in watcher.seen]
    with_status = count_with_first_status(cluster, "burst")
    reporters = events_by_reporter(cluster)
    rows = window.table(divisor=count, baseline=baseline)
    writes = window.sum(OPERATOR_WRITES, baseline) / count
    # The same with only the operator's own events (the Job controller posts some too).
    writes_own_events = (window.sum(k for k in OPERATOR_WRITES if k not in EVENT_POSTS)
                         + reporters.get(OPERATOR_COMPONENT, 0)) / count
    reads = window.sum((k for k in window.keys() if k[0] in READ_VERBS), baseline) / count
    ratio = timings["all_jobs_seconds"] / timings["create_seconds"]
    p99 = percentile(latencies, 0.99) if latencies else None
    # Whether the lag grows through the burst (a queue: the operator falls behind) or is flat
    # (each Job costs that long however early its FineTuneJob came): by tenths in create order.
    in_order = sorted((created[n] - started_at, watcher.seen[n] - created[n])
                      for n in names if n in watcher.seen)
    tenth = max(1, len(in_order) // 10)
    by_tenth = [{"created_at": round(chunk[-1][0], 2),
                 "median_seconds": round(statistics.median(lag for _, lag in chunk), 3)}
                for chunk in (in_order[i:i + tenth] for i in range(0, len(in_order), tenth))]
    return {
        "count": count,
        "create_seconds": round(timings["create_seconds"], 2),
        "last_job_seconds": round(timings["all_jobs_seconds"], 2),
        "last_job_to_create_ratio": round(ratio, 2),
        "all_first_status_seconds": round(timings["all_status_seconds"], 2),
        "operator_cpu_seconds": round(timings["operator_cpu_seconds"], 1),
        "cpu_seconds_by_process": timings["cpu_seconds"],
        "apply_to_job_seconds": {
            "p50": round(statistics.median(latencies), 3) if latencies else None,
            "p90": round(percentile(latencies, 0.90), 3) if latencies else None,
            "p99": round(p99, 3) if p99 is not None else None,
            "max": round(max(latencies), 3) if latencies else None},
        "apply_to_job_by_create_order": by_tenth,
        "jobs_missing": count - len(latencies),
        "first_status_missing": count - with_status,
        "job_watch_streams": watcher.streams,
        "requests_per_finetunejob": rows,
        "operator_writes_per_finetunejob": round(writes, 3),
        "operator_writes_per_finetunejob_own_events_only": round(writes_own_events, 3),
        "events_by_reporter": dict(reporters),
        "reads_per_finetunejob": round(reads, 3),
        "window_seconds": round(window.seconds, 1),
        "baseline_seconds": round(baseline.seconds, 1),
        "note": "per_unit: requests of every client but this benchmark (its own creates, lists "
                "and watch are counted and left out), less the idle baseline's rate; "
                "operator_writes_per_finetunejob counts every POST events (the Job controller "
                "posts some: events_by_reporter), the _own_events_only figure only the "
                "operator's",
        "pass": {"ratio": ratio <= TARGETS["burst_ratio"],
                 "p99": p99 is not None and p99 <= TARGETS["burst_p99_seconds"],
                 "writes": writes <= TARGETS["operator_writes_per_finetunejob"],
                 "writes_own_events_only":
                     writes_own_events <= TARGETS["operator_writes_per_finetunejob"]},
    }


# --------------------------------------------------------------------------------------------
# 3: memory, resident and after churn


def settle(cluster: Cluster, part: str, expected: int, timeout: float) -> tuple[int, float]:
    started = time.monotonic()
    cluster.wait_until(lambda: count_with_first_status(cluster, part) >= expected, timeout, 2)
    return count_with_first_status(cluster, part), time.monotonic() - started


def measure_memory(cluster: Cluster, operator: Operator, already: int, resident: int,
                   churn: int, timeout: float) -> dict:
    names = [f"resident-{i:04d}" for i in range(max(0, resident - already))]
    cluster.create_all(names, "resident")
    settled, settle_seconds = settle(cluster, "resident", len(names), timeout)
    total = already + len(names)
    time.sleep(5)
    resident_rss = rss_bytes(operator.pid)
    result = {"resident": total, "resident_settled": already + settled,
              "resident_settle_seconds": round(settle_seconds, 1),
              "rss_resident_mib": mib(resident_rss),
              "pass": {"resident_rss": mib(resident_rss) <= TARGETS["resident_rss_mib"]}}
    if not churn:
        return result

    churn_names = [f"churn-{i:04d}" for i in range(churn)]
    started = time.monotonic()
    cluster.create_all(churn_names, "churn")
    churn_settled, _ = settle(cluster, "churn", churn, timeout)
    rss_with_churn = rss_bytes(operator.pid)
    cluster.delete_part("churn")
    gone = cluster.wait_until(
        lambda: not cluster.finetunejobs("churn")
        and len(cluster.trainer_jobs()) <= total, timeout, 2)
    churn_seconds = time.monotonic() - started
    time.sleep(10)  # the operator sees the deletions
    after_rss = rss_bytes(operator.pid)
    change = after_rss / resident_rss - 1
    result |= {"churn": churn, "churn_settled": churn_settled, "churn_gone": gone,
               "churn_seconds": round(churn_seconds, 1),
               "rss_with_churn_mib": mib(rss_with_churn),
               "rss_after_churn_mib": mib(after_rss),
               "rss_after_to_before_ratio": round(after_rss / resident_rss, 3)}
    result["pass"]["churn_rss"] = abs(change) <= TARGETS["churn_rss_change"]
    return result


# --------------------------------------------------------------------------------------------
# 4: running jobs, with trainer stand-ins


class BenchNode:
    """A fake GPU node of the benchmark's own, kept Ready by a second kwok that plays its pods
    with the cluster's stages less `pod-complete`: the cluster's kwok turns every Job's pod
    Succeeded as soon as it runs (cluster/kwok-stages.yaml, kwok's pod/fast), so a trainer pod on
    its nodes never stays Running. The node carries the cluster's fake-node taint; pods pick it
    by a GPU product label no other node has; its pod IPs come from a part of kwok's pod CIDR
    (routed nowhere) that the cluster's kwok, which counts up from its start, does not reach."""

    def __init__(self, localcluster, cluster: Cluster, kubeconfig: str, run_id: str,
                 gpus: int, workdir: Path):
        self.core = cluster.core
        self.name = f"bench-{run_id}"
        self.product = f"BENCH-STANDIN-{run_id}"
        # The cluster's fake-node taint, and one of this run's own, so that no other pod that
        # tolerates kwok's nodes lands here.
        self.taints = [dict(localcluster.FAKE_NODE_TAINT),
                       {"key": BENCH_TAINT_KEY, "value": run_id, "effect": "NoSchedule"}]
        self.cidr = str(list(ipaddress.ip_network(localcluster.KWOK_POD_CIDR).subnets(1))[1])
        self.gpus, self.kubeconfig, self.workdir = gpus, kubeconfig, workdir
        self.stages = workdir / "kwok-stages.yaml"
        self.log_path = workdir / "kwok.log"
        self.process: subprocess.Popen | None = None

    @property
    def placement(self) -> Placement:
        tolerations = [{"operator": "Equal", **taint} for taint in self.taints]
        return Placement({"nvidia.com/gpu.product": self.product}, tolerations)

    def write_stages(self) -> None:
        documents = (REPO / "cluster" / "kwok-stages.yaml").read_text().split("\n---\n")
        kept = [d for d in documents if "\n  name: pod-complete\n" not in d]
        if len(kept) != len(documents) - 1:
            raise RuntimeError("cluster/kwok-stages.yaml has no single pod-complete stage")
        self.stages.write_text("\n---\n".join(kept))

    def start(self) -> None:
        capacity = {"cpu": "1000", "memory": "8Ti", "pods": str(self.gpus + 10),
                    "ephemeral-storage": "1Pi", "nvidia.com/gpu": str(self.gpus)}
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.name,
                             "labels": {"kubernetes.io/hostname": self.name,
                                        "nvidia.com/gpu.present": "true",
                                        "nvidia.com/gpu.product": self.product},
                             "annotations": {"kwok.x-k8s.io/node": self.name,
                                             "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"taints": self.taints},
                "status": {"capacity": capacity, "allocatable": capacity}}
        self.core.create_node(node)
        self.write_stages()
        argv = [binary("kwok"), f"--kubeconfig={self.kubeconfig}", f"--config={self.stages}",
                f"--manage-single-node={self.name}", "--node-ip=127.0.0.1",
                f"--cidr={self.cidr}", "--node-lease-duration-seconds=40"]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def ready(self) -> bool:
        node = self.core.read_node(self.name)
        gpus = (node.status.allocatable or {}).get("nvidia.com/gpu")
        return gpus == str(self.gpus) and any(
            c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            self.core.delete_node(self.name)
        except client.ApiException as error:
            if error.status != 404:
                raise


class StandIns:
    """bench/trainer_standins.py in the cluster network namespace, driven over its stdin."""

    def __init__(self, network, targets: list[dict], advance_seconds: float, log_path: Path):
        argv = network.exec_prefix() + [sys.executable, str(REPO / "bench" / "trainer_standins.py")]
        self.log = open(log_path, "wb")
        self.log_path = log_path
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, start_new_session=True)
        config = {"port": METRICS_PORT, "advance_seconds": advance_seconds,
                  "planned_epochs": 1000, "targets": targets}
        self.process.stdin.write(json.dumps(config) + "\n")
        self.process.stdin.flush()

    def wait_ready(self) -> dict:
        return self._reply(timeout=180)  # importing torch (TrainerMetrics) takes a while

    def _reply(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        if not line:
            raise RuntimeError(f"the trainer stand-ins did not answer; log "
                               f"{self.log_path}:\n{self.log_path.read_text()[-3000:]}")
        return json.loads(line)

    def stats(self) -> dict[str, dict]:
        return {t["name"]: t for t in self._ask_stats()["targets"]}

    def last_operator_read(self) -> float:
        return self._ask_stats()["last_operator_read"]

    def _ask_stats(self) -> dict:
        self.process.stdin.write("stats\n")
        self.process.stdin.flush()
        return self._reply(timeout=30)

    def wait_between_rounds(self, settle: float, timeout: float) -> None:
        """Until the operator's next round of reads is over and `settle` seconds quiet: the
        operator reads every trainer at once each interval, so a window bounded so holds whole
        rounds, each with the status writes it caused."""
        deadline = time.monotonic() + timeout
        previous = self.last_operator_read()
        while self.last_operator_read() == previous and time.monotonic() < deadline:
            time.sleep(0.2)
        while time.time() - self.last_operator_read() < settle and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("quit\n")
                self.process.stdin.flush()
                self.process.wait(timeout=20)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.terminate()
                self.process.wait()
        self.log.close()


def running_pods(cluster: Cluster, names: set[str]) -> dict[str, str]:
    """FineTuneJob name -> pod IP of its Running trainer pod."""
    found = {}
    for pod in cluster.trainer_pods():
        owner = (pod.metadata.annotations or {}).get(FINETUNEJOB_ANNOTATION)
        if owner in names and pod.status.phase == "Running" and pod.status.pod_ip \
                and not pod.metadata.deletion_timestamp:
            found[owner] = pod.status.pod_ip
    return found


def phases(cluster: Cluster, part: str) -> Counter:
    return Counter((item.get("status") or {}).get("phase") or "-"
                   for item in cluster.finetunejobs(part))


def progress_epochs(cluster: Cluster, part: str) -> dict[str, int | None]:
    return {item["metadata"]["name"]:
            ((item.get("status") or {}).get("progress") or {}).get("epoch")
            for item in cluster.finetunejobs(part)}


def request_rates(window: RequestWindow, baseline: RequestWindow, jobs: int) -> dict:
    writes = [k for k in window.keys() if k[0] in WRITE_VERBS]
    reads = [k for k in window.keys() if k[0] in READ_VERBS]
    per_job_second = jobs * window.seconds
    return {
        "writes_per_second_per_job": round(window.sum(writes, baseline) / per_job_second, 4),
        "reads_per_second_per_job": round(window.sum(reads, baseline) / per_job_second, 4),
        "writes_per_second_per_job_raw": round(window.sum(writes) / per_job_second, 4),
        "reads_per_second_per_job_raw": round(window.sum(reads) / per_job_second, 4),
    }


@dataclass
class RunningWindow:
    """What one window over the running jobs saw."""

    requests: RequestWindow | None
    reads_before: dict[str, dict]  # stand-in stats per job at the window's start
    reads_after: dict[str, dict]
    operator_reads: Counter  # the operator's own count of its reads, by result
    writes: list[tuple[str, tuple[str, ...]]]  # (job, status fields) per write a watch saw
    epochs: dict[str, int | None] = field(default_factory=dict)  # status.progress.epoch after


def start_running_jobs(cluster: Cluster, node: BenchNode, names: list[str],
                       timeout: float) -> dict[str, str]:
    """Creates the running jobs on the benchmark's node; job -> pod IP of those that run."""
    cluster.create_all(names, "running", node.placement)
    cluster.wait_until(lambda: len(running_pods(cluster, set(names))) == len(names)
                       and phases(cluster, "running").get("Running", 0) == len(names),
                       timeout, 2)
    return running_pods(cluster, set(names))


def wait_first_readings(cluster: Cluster, standins: StandIns, count: int,
                        seconds: float) -> str | None:
    """None once every running job has a status.progress, else what went wrong."""
    if cluster.wait_until(lambda: all(e is not None for e in
                                      progress_epochs(cluster, "running").values()),
                          timeout=seconds, interval=2):
        return None
    unread = sum(e is None for e in progress_epochs(cluster, "running").values())
    reads = sum((Counter(s["reads"]) for s in standins.stats().values()), Counter())
    return (f"THE OPERATOR DID NOT READ THE STAND-INS: {unread} of {count} running jobs have no "
            f"status.progress after {seconds:.0f} s; stand-in reads by client {dict(reads)}")


def observe_running(cluster: Cluster, operator: Operator, standins: StandIns,
                    args) -> RunningWindow:
    """API requests, stand-in reads and status writes over one window that starts and ends
    between two rounds of the operator's reads."""
    status_watch = StatusWatcher(cluster.custom, cluster.namespace, "running")
    status_watch.start()
    status_watch.ready.wait(10)
    settle = min(4.0, args.progress_interval / 2)
    round_timeout = 3 * args.progress_interval + 30

    def window() -> RunningWindow:
        reads_before, operator_before = standins.stats(), operator.progress_reads()
        opened = time.monotonic()
        time.sleep(args.window)
        standins.wait_between_rounds(settle, round_timeout)
        closed = time.monotonic()
        reads_after, operator_after = standins.stats(), operator.progress_reads()
        return RunningWindow(None, reads_before, reads_after, operator_after - operator_before,
                             status_watch.between(opened, closed))

    standins.wait_between_rounds(settle, round_timeout)
    requests, observed = RequestWindow.measure(cluster.requests, window)
    status_watch.stop.set()
    observed.requests = requests
    observed.epochs = progress_epochs(cluster, "running")
    return observed


def running_figures(observed: RunningWindow, baseline: RequestWindow, names: list[str],
                    advancing: set[str]) -> dict:
    count, window = len(names), observed.requests
    before, after, epochs = observed.reads_before, observed.reads_after, observed.epochs
    changes = sum(after[n]["operator_changes"] - before[n]["operator_changes"] for n in names)
    operator_reads = sum(after[n]["reads"]["operator"] - before[n]["reads"]["operator"]
                         for n in names)
    status_patches = window.others(STATUS_PATCH)
    writes = observed.writes
    constant_written = sorted({n for n, _ in writes if n not in advancing})
    # A write is for a progress change when it changed status.progress; what the others changed.
    without_progress = Counter(", ".join(fields) or "(no status field)"
                               for _, fields in writes if "progress" not in fields)
    # Advancing: status caught up at least with where the stand-in was when the window opened.
    advanced = [n for n in advancing if (epochs.get(n) or 0) >= before[n]["epoch"]
                and (epochs.get(n) or 0) > STANDIN_START_EPOCH]
    constant_read = [n for n in names if n not in advancing
                     and epochs.get(n) == STANDIN_START_EPOCH]
    lagging = {n: (epochs.get(n), after[n]["epoch"]) for n in advancing if n not in advanced}
    figures = {
        "window_seconds": round(window.seconds, 1),
        "baseline_seconds": round(baseline.seconds, 1),
        **request_rates(window, baseline, count),
        "requests_per_second_per_job": window.table(divisor=count * window.seconds,
                                                    baseline=baseline),
        "operator_reads_of_standins": operator_reads,
        "operator_progress_reads_by_result": dict(observed.operator_reads),
        "operator_reads_per_job_per_second": round(operator_reads / count / window.seconds, 3),
        "progress_changes_read": changes,
        "status_patches": status_patches,
        "writes_seen_by_watch": len(writes),
        # A PATCH that changes nothing makes no watch event (the resourceVersion stays).
        "status_patches_without_effect": max(0, status_patches - len(writes)),
        "writes_without_progress_change": sum(without_progress.values()),
        "fields_of_writes_without_progress_change": dict(without_progress),
        "constant_jobs_written": len(constant_written),
        "advancing_with_progress_written": len(advanced),
        "constant_with_progress_written": len(constant_read),
        "advancing_not_written": lagging,
        "standin_reads_by_client": dict(sum((Counter(after[n]["reads"]) for n in names),
                                            Counter())),
        "note": "per_unit = requests per second per running job of every client but the "
                "benchmark, less the baseline rate measured before the running jobs existed; "
                "progress_changes_read = reads in which the operator got a body that differs "
                "from its previous read of that pod",
        "pass": {"patches_at_most_changes": status_patches <= changes,
                 "no_write_without_progress_change": not without_progress
                 and not constant_written,
                 "progress_written": len(advanced) == len(advancing)
                 and len(constant_read) == count - len(advancing)},
    }
    if len(advanced) < len(advancing):
        figures["error"] = (f"THE OPERATOR DID NOT WRITE status.progress FOR "
                            f"{len(advancing) - len(advanced)} OF {len(advancing)} ADVANCING "
                            f"JOBS (status epoch, served epoch): {dict(list(lagging.items())[:5])}")
    return figures


def measure_running(cluster: Cluster, operator: Operator, network, node: BenchNode, args,
                    workdir: Path) -> dict:
    count = args.running
    names = [f"running-{i:04d}" for i in range(count)]
    advancing = set(names[:max(1, round(count * args.advancing_fraction))])
    result: dict = {"count": count, "advancing": len(advancing),
                    "advance_seconds": args.advance_seconds,
                    "progress_interval_seconds": args.progress_interval,
                    "node": node.name, "pod_cidr": node.cidr}

    node.start()
    if not cluster.wait_until(node.ready, timeout=60):
        raise RuntimeError(f"node {node.name} not Ready; kwok log {node.log_path}")
    baseline = measure_baseline(cluster, args.baseline_seconds)  # with the node, no jobs

    started = time.monotonic()
    ips = start_running_jobs(cluster, node, names, args.timeout)
    result["to_running_seconds"] = round(time.monotonic() - started, 1)
    result["phases"] = dict(phases(cluster, "running"))
    if len(ips) < count or result["phases"].get("Running", 0) < count:
        result["error"] = (f"only {len(ips)} of {count} trainer pods Running, phases "
                           f"{result['phases']}")
        return result

    targets = [{"ip": ips[n], "name": n, "advancing": n in advancing} for n in names]
    standins = StandIns(network, targets, args.advance_seconds, workdir / "standins.log")
    try:
        result["standins"] = standins.wait_ready()
        error = wait_first_readings(cluster, standins, count, max(60, 6 * args.progress_interval))
        if error:
            return result | {"error": error}
        time.sleep(args.progress_interval + 1)  # the first readings written
        observed = observe_running(cluster, operator, standins, args)
    finally:
        standins.stop()
    return result | running_figures(observed, baseline, names, advancing)


def stop_running(cluster: Cluster, node: BenchNode, timeout: float = 120) -> None:
    """Deletes the running jobs and waits for their pods to go (kwok deletes them) before kwok
    and its node go."""
    try:
        cluster.delete_part("running")
        cluster.wait_until(lambda: not [p for p in cluster.trainer_pods()
                                        if p.spec.node_name == node.name], timeout, 2)
    finally:
        node.stop()


# --------------------------------------------------------------------------------------------
# Report


def summary_lines(result: dict) -> list[str]:
    lines = []
    burst = result.get("burst")
    if burst:
        latency = burst["apply_to_job_seconds"]
        lines.append(
            f"burst of {burst['count']}: creates {burst['create_seconds']} s, last Job "
            f"{burst['last_job_seconds']} s, ratio {burst['last_job_to_create_ratio']} "
            f"(target <= {TARGETS['burst_ratio']:g}: {verdict(burst['pass']['ratio'])}); "
            f"apply -> Job p50 {latency['p50']} s, p90 {latency['p90']} s, p99 {latency['p99']} s "
            f"(target <= {TARGETS['burst_p99_seconds']:g} s: {verdict(burst['pass']['p99'])}), "
            f"max {latency['max']} s")
        lines.append(
            f"API requests per FineTuneJob (create -> Job + first status): operator writes "
            f"{burst['operator_writes_per_finetunejob']} (POST jobs/networkpolicies/services/"
            f"configmaps/events + PATCH/PUT jobs + PATCH finetunejobs/status; events include the "
            f"controllers') (target <= {TARGETS['operator_writes_per_finetunejob']:g}: "
            f"{verdict(burst['pass']['writes'])}); counting only the operator's own events "
            f"{burst['operator_writes_per_finetunejob_own_events_only']} "
            f"({verdict(burst['pass']['writes_own_events_only'])}; events by reporter "
            f"{burst['events_by_reporter']}); reads {burst['reads_per_finetunejob']} "
            f"(all clients but the benchmark, less the idle baseline)")
        lines.append("apply -> Job by create order (tenths; created at s: median lag s): "
                     + ", ".join(f"{tenth['created_at']}: {tenth['median_seconds']}"
                                 for tenth in burst["apply_to_job_by_create_order"]))
        busiest = sorted(burst["cpu_seconds_by_process"].items(), key=lambda kv: -kv[1])
        lines.append(
            f"CPU seconds during the burst ({burst['all_first_status_seconds']} s on "
            f"{result['load']['cpus']} CPUs): "
            + ", ".join(f"{name} {seconds}" for name, seconds in busiest if seconds >= 0.05))
    memory = result.get("memory")
    if memory:
        lines.append(f"{memory['resident']} resident FineTuneJobs: operator RSS "
                     f"{memory['rss_resident_mib']} MiB (idle {result['operator_rss_idle_mib']} "
                     f"MiB) (target <= {TARGETS['resident_rss_mib']:g} MiB: "
                     f"{verdict(memory['pass']['resident_rss'])})")
        if "churn" in memory:
            lines.append(f"after {memory['churn']} more created and deleted: RSS "
                         f"{memory['rss_after_churn_mib']} MiB (with them "
                         f"{memory['rss_with_churn_mib']} MiB), ratio "
                         f"{memory['rss_after_to_before_ratio']} (target within "
                         f"{TARGETS['churn_rss_change']:.0%}: "
                         f"{verdict(memory['pass']['churn_rss'])})")
    running = result.get("running")
    if running and "pass" in running:
        other_fields = running["fields_of_writes_without_progress_change"]
        lines.append(
            f"{running['count']} running jobs ({running['advancing']} advancing an epoch every "
            f"{running['advance_seconds']:g} s, read every {running['progress_interval_seconds']} "
            f"s): API writes {running['writes_per_second_per_job']}/s and reads "
            f"{running['reads_per_second_per_job']}/s per running job over "
            f"{running['window_seconds']} s (less the idle baseline; raw "
            f"{running['writes_per_second_per_job_raw']}/s, "
            f"{running['reads_per_second_per_job_raw']}/s)")
        lines.append(
            f"status PATCHes {running['status_patches']} for {running['progress_changes_read']} "
            f"progress changes the operator read (target: no more: "
            f"{verdict(running['pass']['patches_at_most_changes'])}); the stand-ins served it "
            f"{running['operator_reads_of_standins']} reads, it counts "
            f"{running['operator_progress_reads_by_result']}")
        lines.append(
            f"a watch saw {running['writes_seen_by_watch']} writes to the running jobs "
            f"({running['status_patches_without_effect']} PATCHes changed nothing), "
            f"{running['writes_without_progress_change']} without a progress change"
            f"{' ' + str(other_fields) if other_fields else ''}, "
            f"{running['constant_jobs_written']} to constant jobs "
            f"({verdict(running['pass']['no_write_without_progress_change'])}); status.progress "
            f"written for {running['advancing_with_progress_written']} of "
            f"{running['advancing']} advancing jobs, at the stand-in's epoch for "
            f"{running['constant_with_progress_written']} of "
            f"{running['count'] - running['advancing']} constant ones "
            f"({verdict(running['pass']['progress_written'])})")
    if running and running.get("error"):
        lines.append(f"!!! running jobs: {running['error']}")
    load = result["load"]
    lines.append(f"machine: {load['cpus']} CPUs, load average {load['start']} at start, "
                 f"{load['end']} at end")
    return lines


def measurement_complete(result: dict) -> bool:
    burst = result.get("burst") or {}
    memory = result.get("memory") or {}
    running = result.get("running") or {}
    return (burst.get("jobs_missing") == 0 and burst.get("first_status_missing") == 0
            and memory.get("resident_settled") == memory.get("resident")
            and memory.get("churn_gone", True)
            and memory.get("churn_settled", memory.get("churn")) == memory.get("churn")
            and not running.get("error") and result.get("operator_alive", False))


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--resident", type=int, default=1000,
                        help="FineTuneJobs resident for the memory figure (the burst's count)")
    parser.add_argument("--churn", type=int, default=1000,
                        help="FineTuneJobs created and deleted after it (0: skip)")
    parser.add_argument("--running", type=int, default=100,
                        help="running jobs with trainer stand-ins (0: skip)")
    parser.add_argument("--advancing-fraction", type=float, default=0.5,
                        help="share of the running jobs whose epoch advances")
    parser.add_argument("--advance-seconds", type=float, default=5.0,
                        help="an advancing stand-in finishes an epoch this often")
    parser.add_argument("--progress-interval", type=int, default=10,
                        help="the operator's FINETUNE_PROGRESS_INTERVAL_SECONDS")
    parser.add_argument("--window", type=float, default=60.0,
                        help="seconds the running jobs' API requests are counted")
    parser.add_argument("--baseline-seconds", type=float, default=20.0,
                        help="seconds of each idle baseline (before the burst, before the "
                             "running jobs)")
    parser.add_argument("--threads", type=int, default=16, help="parallel create calls")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds any one wait may take")
    parser.add_argument("--cluster-env", default=os.environ.get("FINETUNE_CLUSTER_ENV"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = [round(x, 2) for x in os.getloadavg()]
    localcluster = load_localcluster()
    started_cluster = None
    if args.cluster_env:
        env = read_env_file(Path(args.cluster_env))
    else:
        print(">> starting a local cluster for the benchmark", flush=True)
        started_cluster, env = start_cluster(localcluster)
    network = localcluster.realnode.Network(Path(env["FINETUNE_CLUSTER_DIR"]))
    install_crd(env["KUBECONFIG"])
    run_id = uuid.uuid4().hex[:6]
    namespace = f"bench-{run_id}"
    workdir = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    api.configuration.connection_pool_maxsize = args.threads + 4
    cluster = Cluster(api, namespace, args.threads)
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    print(f">> namespace {namespace}; logs in {workdir}", flush=True)

    result: dict = {"namespace": namespace, "args": vars(args)}
    node = BenchNode(localcluster, cluster, env["KUBECONFIG"], run_id, args.running, workdir)
    operator = Operator(env, network, namespace, args.progress_interval,
                        set(localcluster.PORTS.values()) | {METRICS_PORT},
                        workdir / "operator.log")
    try:
        operator.wait_serving()
        time.sleep(3)  # the Lease and kopf's initial listing
        result["operator_rss_idle_mib"] = mib(rss_bytes(operator.pid))
        print(f">> idle baseline, then a burst of {args.burst}", flush=True)
        baseline = measure_baseline(cluster, args.baseline_seconds)
        result["burst"] = measure_burst(cluster, operator, args.burst, args.timeout, baseline,
                                        cluster_pids(env["FINETUNE_CLUSTER_DIR"]))
        print(f">> memory: {args.resident} resident, churn {args.churn}", flush=True)
        result["memory"] = measure_memory(cluster, operator, args.burst, args.resident,
                                          args.churn, args.timeout)
        if args.running:
            print(f">> {args.running} running jobs", flush=True)
            try:
                result["running"] = measure_running(cluster, operator, network, node, args,
                                                    workdir)
            finally:
                stop_running(cluster, node)
        result["operator_alive"] = operator.alive()
        if not operator.alive():
            print(f"!!! the operator exited; its log:\n{operator.log_tail()}", flush=True)
    finally:
        operator.stop()
        cluster.core.delete_namespace(namespace)
        if started_cluster is not None:
            started_cluster.down()
    result["load"] = {"cpus": os.cpu_count(), "start": load_start,
                      "end": [round(x, 2) for x in os.getloadavg()]}
    result["operator_log"] = str(operator.log_path)

    print(json.dumps(result, indent=2))
    if result.get("burst"):
        print_table(f"API requests per FineTuneJob, burst of {args.burst} (create -> Job + "
                    f"first status; per FTJ: less the baseline rate and the benchmark's own "
                    f"calls)",
                    result["burst"]["requests_per_finetunejob"], "per FTJ")
    if (result.get("running") or {}).get("requests_per_second_per_job"):
        print_table("API requests per second per running job (per_unit: less the baseline "
                    "rate and the benchmark's own calls)",
                    result["running"]["requests_per_second_per_job"], "/s/job")
    print()
    for line in summary_lines(result):
        print(line)
    return 0 if measurement_complete(result) else 1


if __name__ == "__main__":
    sys.exit(main())
