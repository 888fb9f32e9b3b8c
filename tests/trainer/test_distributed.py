"""Data-parallel training on CPU with gloo: torchrun ranks in one pod reach the weights of one
process that takes the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import yaml

from finetune_api.contract import ExitCode
from finetune_trainer import distributed
from trainer_helpers import manifest, write_three_classes, write_tiny_weights

SPEC = {"model": {"backbone": "test_efficientnet_gn", "weights": "None", "imageSize": 32},
        "optimizer": {"name": "SGD", "learningRate": 0.05, "weightDecay": 0.0, "momentum": 0.9},
        "schedule": {"name": "Constant"}, "baseline": {"enabled": False}, "epochs": 2}


def trainer_process(tmp_path, name: str, job: dict, *, launcher: tuple[str, ...] = (),
                    **env: str) -> subprocess.CompletedProcess:
    """The pod's command on `job` (written to <name>.yaml): `python -m finetune_trainer --spec
    FILE`, or under `python -m <launcher...>`; its termination message goes to <name>.termination."""
    spec_file = tmp_path / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(tmp_path / f"{name}.termination"),
           "FINETUNE_METRICS_PORT": "0", "FINETUNE_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", *launcher, "finetune_trainer", "--spec",
                           str(spec_file)], env=env, capture_output=True, text=True, timeout=300)


def run_pod(tmp_path, name: str, *, processes: int, batch_size: int, dataset) -> dict:
    """`python -m finetune_trainer --spec FILE` as in a pod, FINETUNE_PROCESSES_PER_POD ranks."""
    out = tmp_path / name
    job = manifest(str(dataset), str(out), name=name, batchSize=batch_size, **SPEC)
    done = trainer_process(tmp_path, name, job,
                           **{distributed.ENV_PROCESSES_PER_POD: str(processes)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"weights": safetensors.torch.load_file(out / "model.safetensors"),
            "report": json.loads((out / "report.json").read_text()),
            "termination": (tmp_path / f"{name}.termination").read_text()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-4, rtol=1e-3, msg=key)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_three_classes(tmp_path_factory.mktemp("shapes"))  # 24 training images


def test_two_ranks_match_one_process_with_the_same_global_batch(shapes, tmp_path):
    # Three steps an epoch: 2 ranks x 4 images against one torchrun rank x 8 images.
    single_rank = subprocess_world_of_one(tmp_path, shapes)
    two = run_pod(tmp_path, "two", processes=2, batch_size=4, dataset=shapes)
    assert_same_weights(single_rank["weights"], two["weights"])
    assert two["report"]["distributed"] == {
        "worldSize": 2, "batchSizePerProcess": 4, "globalBatchSize": 8, "lrScaling": "None",
        "requestedLearningRate": 0.05, "learningRate": 0.05, "backend": "gloo"}
    assert json.loads(two["termination"])["epochs"] == 2
    assert two["report"]["history"][0]["imagesPerSecond"] > 0


def subprocess_world_of_one(tmp_path, dataset) -> dict:
    """One rank under torchrun: the same DistributedSampler permutation as the two-rank run."""
    name = "rank1"
    out = tmp_path / name
    job = manifest(str(dataset), str(out), name=name, batchSize=8, **SPEC)
    done = trainer_process(tmp_path, name, job, launcher=(
        "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"weights": safetensors.torch.load_file(out / "model.safetensors")}


def test_one_step_an_epoch_matches_the_plain_single_process_trainer(shapes, tmp_path):
    # The whole training set is one global batch, so the order of images does not matter and
    # the plain (non-distributed) trainer is the reference.
    one = run_pod(tmp_path, "plain", processes=1, batch_size=24, dataset=shapes)
    two = run_pod(tmp_path, "pair", processes=2, batch_size=12, dataset=shapes)
    assert_same_weights(one["weights"], two["weights"])
    assert one["report"]["distributed"]["worldSize"] == 1


def test_launch_arguments():
    spec = {"resources": {"gpus": 1}}
    assert distributed.launch_arguments(spec, run_id="u", program=["-m", "x"], environ={}) is None
    args = distributed.launch_arguments({"resources": {"gpus": 4}}, run_id="u",
                                        program=["-m", "x"], environ={})
    assert "--standalone" in args and "--nproc-per-node=4" in args and args[-2:] == ["-m", "x"]
    args = distributed.launch_arguments(
        {"resources": {"gpus": 2, "workers": 3}}, run_id="u", program=["-m", "x"],
        environ={"JOB_COMPLETION_INDEX": "2", "MASTER_ADDR": "j-0.svc", "MASTER_PORT": "29500"})
    assert {"--nnodes=3", "--node-rank=2", "--master-addr=j-0.svc", "--nproc-per-node=2",
            "--max-restarts=0"} <= set(args)


def test_lr_scaling_rules():
    assert distributed.lr_factor("None", 4) == 1.0
    assert distributed.lr_factor("Linear", 4) == 4.0
    assert distributed.lr_factor("Sqrt", 4) == 2.0


def test_a_peer_that_never_joins_fails_the_pod_with_a_retryable_error(shapes, tmp_path):
    # Pod index 1 of a two-worker job whose index-0 pod never starts (not scheduled).
    job = manifest(str(shapes), str(tmp_path / "out"), name="alone", **SPEC,
                   resources={"gpus": 0, "workers": 2})
    done = trainer_process(tmp_path, "alone", job, **{
        distributed.ENV_WORKERS: "2", distributed.ENV_COMPLETION_INDEX: "1",
        distributed.ENV_RENDEZVOUS_TIMEOUT: "5", "MASTER_ADDR": "alone-trainer-0.alone-workers",
        "MASTER_PORT": "29531"})
    assert done.returncode == int(ExitCode.TRANSIENT), done.stderr[-3000:]
    said = json.loads((tmp_path / "alone.termination").read_text())
    assert said["field"] == "spec.resources.workers"
    assert "did not all join" in said["message"] and "within 5 s" in said["message"]
    assert not (tmp_path / "out").exists()  # nothing written


def test_auto_races_in_a_two_process_pod(shapes, tmp_path):
    """Every rank runs the same race; rank 0's baseline and rankings are broadcast, so the ranks
    agree on the finalist and the job ends with one leaderboard."""
    weights = write_tiny_weights(tmp_path / "pretrained.pt")
    out = tmp_path / "auto"
    job = manifest(str(shapes), str(out), name="auto", strategy="Auto", epochs=3, batchSize=4,
                   model={"backbone": "test_efficientnet", "weights": str(weights),
                          "imageSize": 32})
    done = trainer_process(tmp_path, "auto", job, **{distributed.ENV_PROCESSES_PER_POD: "2"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"]["worldSize"] == 2
    assert report["race"]["candidates"] == len([e for e in report["leaderboard"]
                                                if e["deployable"]])
    assert report["strategy"] == next(e for e in report["leaderboard"] if e["deployable"])[
        "strategy"]
    termination = json.loads((tmp_path / "auto.termination").read_text())
    assert termination["leaderboard"][0]["candidate"] == report["leaderboard"][0]["candidate"]
