"""Operator scale benchmark on the local cluster.

1. Burst: create N FineTuneJobs (suspend: true, so no trainer runs) as fast as the API server
   takes them, and measure for each the time from its create call returning to its trainer Job
   being seen in a watch: p50 / p90 / p99 / max.
2. Resident: bring the total to M FineTuneJobs, wait until every one has its Job and a settled
   status, and report the operator process's resident memory (VmRSS).

    python bench/operator_scale.py [--burst 200] [--resident 1000] [--cluster-env .state/cluster/env]

Without --cluster-env (or FINETUNE_CLUSTER_ENV) a cluster is started for the run and stopped
after it (cluster/localcluster.py; binaries from `make cluster-build`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "operator")]

from kubernetes import client, config, watch  # noqa: E402

from finetune_api import GROUP, PLURAL, VERSION  # noqa: E402

TRAINER_SELECTOR = "finetune.dev/component=trainer"


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


def start_cluster() -> tuple[object, dict[str, str]]:
    spec = importlib.util.spec_from_file_location("localcluster",
                                                  REPO / "cluster" / "localcluster.py")
    localcluster = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localcluster)
    cache = Path(os.environ.get("CACHE_DIR") or Path.home() / ".cache" / "finetune-operator")
    os.environ["PATH"] = f"{cache / 'bin'}{os.pathsep}{os.environ['PATH']}"
    cluster = localcluster.Cluster(Path(tempfile.mkdtemp(prefix="finetune-bench-")))
    cluster.up(images={})  # its FineTuneJobs stay suspended: no pod runs
    return cluster, read_env_file(cluster.env_file)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def manifest(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {"dataset": {"uri": "s3://datasets/fashion-mnist/"},
                     "model": {"backbone": "resnet18", "weights": "None", "imageSize": 32},
                     "output": {"uri": f"s3://models/bench/{name}/"},
                     "resources": {"gpus": 1}, "suspend": True}}


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


class JobWatcher(threading.Thread):
    """Records when each trainer Job is first seen, from one watch stream."""

    def __init__(self, batch: client.BatchV1Api, namespace: str):
        super().__init__(daemon=True)
        self.batch, self.namespace = batch, namespace
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            stream = watch.Watch()
            self.ready.set()
            for event in stream.stream(self.batch.list_namespaced_job, self.namespace,
                                       label_selector=TRAINER_SELECTOR, timeout_seconds=30):
                owner = (event["object"].metadata.owner_references or [None])[0]
                if owner is not None:
                    self.seen.setdefault(owner.name, time.monotonic())
                if self.stop.is_set():
                    stream.stop()
                    break


def create_all(custom: client.CustomObjectsApi, namespace: str, names: list[str],
               threads: int) -> dict[str, float]:
    created: dict[str, float] = {}

    def create(name: str) -> None:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest(name))
        created[name] = time.monotonic()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, names))
    return created


def settled(custom: client.CustomObjectsApi, namespace: str, count: int) -> int:
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return sum(1 for item in items if (item.get("status") or {}).get("phase") == "Suspended"
               and (item.get("status") or {}).get("jobName"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--resident", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=16, help="parallel create calls")
    parser.add_argument("--cluster-env", default=os.environ.get("FINETUNE_CLUSTER_ENV"))
    args = parser.parse_args(argv)

    cluster = None
    if args.cluster_env:
        env = read_env_file(Path(args.cluster_env))
    else:
        print(">> starting a local cluster for the benchmark", flush=True)
        cluster, env = start_cluster()
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    api.configuration.connection_pool_maxsize = args.threads + 4
    core, batch, custom = client.CoreV1Api(api), client.BatchV1Api(api), client.CustomObjectsApi(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))

    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="finetune-bench-")) / "operator.log"
    operator_env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"],
                    "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("api", "operator")),
                    "FINETUNE_WATCH_NAMESPACES": namespace, "POD_NAMESPACE": namespace,
                    "FINETUNE_OPERATOR_METRICS_ADDR": "127.0.0.1",
                    "FINETUNE_OPERATOR_METRICS_PORT": str(port), "FINETUNE_LOG_LEVEL": "WARNING"}
    with open(log_path, "wb") as log:
        operator = subprocess.Popen([sys.executable, "-m", "finetune_operator"], env=operator_env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or operator.poll() is not None:
                    raise SystemExit(f"operator did not start; log: {log_path}")
                time.sleep(0.5)
        time.sleep(3)  # the Lease and kopf's initial listing
        idle_rss = rss_bytes(operator.pid)

        watcher = JobWatcher(batch, namespace)
        watcher.start()
        watcher.ready.wait(10)
        names = [f"burst-{i:04d}" for i in range(args.burst)]
        cpu_before = cpu_seconds(operator.pid)
        started = time.monotonic()
        created = create_all(custom, namespace, names, args.threads)
        create_seconds = time.monotonic() - started
        while len(watcher.seen) < len(names) and time.monotonic() - started < 600:
            time.sleep(0.2)
        burst_done = time.monotonic() - started
        burst_cpu = cpu_seconds(operator.pid) - cpu_before
        latencies = [watcher.seen[n] - created[n] for n in names if n in watcher.seen]
        missing = len(names) - len(latencies)

        resident_names = [f"resident-{i:04d}" for i in range(max(0, args.resident - args.burst))]
        create_all(custom, namespace, resident_names, args.threads)
        total = len(names) + len(resident_names)
        settle_started = time.monotonic()
        while settled(custom, namespace, total) < total and time.monotonic() - settle_started < 900:
            time.sleep(2)
        settle_seconds = time.monotonic() - settle_started
        time.sleep(5)
        resident_rss = rss_bytes(operator.pid)
        watcher.stop.set()

        result = {
            "burst": args.burst,
            "burst_create_seconds": round(create_seconds, 2),
            "burst_all_jobs_seconds": round(burst_done, 2),
            "operator_cpu_seconds_during_burst": round(burst_cpu, 1),
            "apply_to_job_p50_seconds": round(statistics.median(latencies), 3) if latencies else None,
            "apply_to_job_p90_seconds": round(percentile(latencies, 0.90), 3) if latencies else None,
            "apply_to_job_p99_seconds": round(percentile(latencies, 0.99), 3) if latencies else None,
            "apply_to_job_max_seconds": round(max(latencies), 3) if latencies else None,
            "jobs_missing": missing,
            "resident": total,
            "resident_settled": settled(custom, namespace, total),
            "resident_settle_seconds": round(settle_seconds, 1),
            "operator_rss_idle_mib": round(idle_rss / 2**20, 1),
            "operator_rss_resident_mib": round(resident_rss / 2**20, 1),
        }
        print(json.dumps(result, indent=2))
        print(f"burst of {args.burst}: apply -> Job created p50 "
              f"{result['apply_to_job_p50_seconds']}s, p99 {result['apply_to_job_p99_seconds']}s; "
              f"{total} resident FineTuneJobs: operator RSS {result['operator_rss_resident_mib']} MiB "
              f"(idle {result['operator_rss_idle_mib']} MiB)")
        return 0 if missing == 0 else 1
    finally:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(timeout=20)
        except subprocess.TimeoutExpired:
            operator.kill()
        core.delete_namespace(namespace)
        if cluster is not None:
            cluster.down()


if __name__ == "__main__":
    sys.exit(main())
