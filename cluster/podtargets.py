"""Prometheus scrape targets for the local cluster's pods, found through the API.

Debian's Prometheus is built without Kubernetes service discovery, so this process does what its
``kubernetes_sd_configs`` (role: pod) would: every second it lists the running pods of each scrape
job by label, and writes their ``<podIP>:<container port named "metrics">`` with the labels
``namespace``, ``pod`` and ``finetunejob`` to a file_sd JSON file per job (written whole, then
renamed, so Prometheus never reads half a file).

    python cluster/podtargets.py --kubeconfig admin.kubeconfig --out-dir prometheus/targets

Standard library only (it authenticates with the kubeconfig's client certificate).
"""

from __future__ import annotations

import argparse
import json
import ssl
import time
import urllib.parse
import urllib.request
from pathlib import Path

# file_sd file name -> label selector of the pods it lists.
JOBS = {
    "trainers.json": "finetune.dev/component=trainer",
    "operator.json": "app.kubernetes.io/component=operator",
}
JOB_LABEL = "finetune.dev/job"


def read_kubeconfig(path: Path) -> tuple[str, ssl.SSLContext]:
    """Server URL and TLS context of a kubeconfig written by localcluster.write_kubeconfig."""
    fields = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().removeprefix("- ").partition(": ")
        if sep and key in ("server", "certificate-authority", "client-certificate", "client-key"):
            fields[key] = value.strip()
    context = ssl.create_default_context(cafile=fields["certificate-authority"])
    context.load_cert_chain(fields["client-certificate"], fields["client-key"])
    return fields["server"], context


def targets(pods: list[dict]) -> list[dict]:
    found = []
    for pod in pods:
        status, meta = pod.get("status", {}), pod["metadata"]
        if status.get("phase") != "Running" or not status.get("podIP") or meta.get("deletionTimestamp"):
            continue
        for container in pod["spec"]["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == "metrics":
                    labels = {"namespace": meta["namespace"], "pod": meta["name"]}
                    if (meta.get("labels") or {}).get(JOB_LABEL):
                        labels["finetunejob"] = meta["labels"][JOB_LABEL]
                    found.append({"targets": [f"{status['podIP']}:{port['containerPort']}"],
                                  "labels": labels})
    return sorted(found, key=lambda t: t["targets"])


def write(path: Path, entries: list[dict]) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(entries, indent=1) + "\n")
    scratch.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, type=Path)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    server, context = read_kubeconfig(args.kubeconfig)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[dict]] = {}
    for name in JOBS:
        write(args.out_dir / name, [])
    (args.out_dir / ".ready").touch()
    while True:
        for name, selector in JOBS.items():
            url = f"{server}/api/v1/pods?{urllib.parse.urlencode({'labelSelector': selector})}"
            try:
                with urllib.request.urlopen(url, context=context, timeout=10) as response:
                    entries = targets(json.load(response)["items"])
            except OSError as error:
                print(f"listing pods ({selector}) failed: {error}", flush=True)
                continue
            if entries != written.get(name):
                write(args.out_dir / name, entries)
                written[name] = entries
        time.sleep(args.interval)


if __name__ == "__main__":
    main()
