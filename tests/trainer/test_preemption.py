"""Graceful stops: a stop request (SIGTERM in a pod) ends training after the current optimizer
step, checkpoints that step, and the next run resumes there mid-epoch: the same samples in the
same order, the same number of optimizer steps, and on CPU the same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from finetune_api import contract
from finetune_api.contract import ExitCode, parse_termination_message
from finetune_trainer import train
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.preemption import STOP, Preempted
from trainer_helpers import manifest, signal_once_checkpointed, write_three_classes

EPOCHS, BATCH = 3, 4  # 24 training images: 6 steps an epoch


@pytest.fixture(autouse=True)
def clear_stop_request():
    STOP.clear()
    yield
    STOP.clear()


class StopAfter(TrainerMetrics):
    """Requests a stop once `steps` optimizer steps are done in this run, as a SIGTERM would."""

    def __init__(self, steps: int):
        super().__init__()
        self.stop_after, self.seen = steps, 0

    def step_done(self, **kwargs):
        super().step_done(**kwargs)
        self.seen += 1
        if self.seen == self.stop_after:
            STOP.request("SIGTERM")


def quiet(*_):
    pass


def job(shapes, out):
    # Standard augmentation draws from the global RNG, which the checkpoint must carry over.
    return manifest(str(shapes), str(out), epochs=EPOCHS, batchSize=BATCH,
                    augmentation="Standard", baseline={"enabled": False})


def weights(out):
    return safetensors.torch.load_file(out / "model.safetensors")


def test_a_run_stopped_mid_epoch_resumes_at_that_step_and_ends_with_the_same_weights(tmp_path):
    shapes = write_three_classes(tmp_path / "shapes")
    straight = train.main(job(shapes, tmp_path / "straight"), cache_dir=tmp_path / "c1", log=quiet)

    out = tmp_path / "stopped"
    metrics = StopAfter(8)
    with pytest.raises(Preempted) as stopped:
        train.main(job(shapes, out), cache_dir=tmp_path / "c2", log=quiet, metrics=metrics)
    # What the operator reads for status.lastCheckpoint and Prometheus for its alert.
    sample = metrics.registry.get_sample_value
    assert (sample(contract.METRIC_CHECKPOINT_EPOCH), sample(contract.METRIC_CHECKPOINT_STEP)) \
        == (1, 2)
    assert abs(sample(contract.METRIC_CHECKPOINT_TIME) - time.time()) < 120
    assert stopped.value.exit_code == ExitCode.PREEMPTED
    assert stopped.value.where == "epoch 2 step 2" and stopped.value.fresh
    assert stopped.value.checkpoint["file"] == "epoch-0001-step-00002.pt"
    assert not (out / "report.json").exists()
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (pointer["checkpoints"][0]["epoch"], pointer["checkpoints"][0]["step"]) == (1, 2)

    STOP.clear()
    messages = []
    resumed = train.main(job(shapes, out), cache_dir=tmp_path / "c2", log=messages.append)
    assert any("1 of 3 epochs and 2 steps of the next done" in m for m in messages)
    assert resumed["resumedFrom"] == {"epoch": 1, "step": 2}
    assert resumed["lastCheckpoint"]["uri"].endswith("epoch-0003.pt")
    assert resumed["optimizerSteps"] == straight["optimizerSteps"] == EPOCHS * 6
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for mine, theirs in zip(resumed["history"], straight["history"]):
        assert mine["trainLoss"] == pytest.approx(theirs["trainLoss"], abs=1e-4)
    for name, tensor in weights(tmp_path / "straight").items():
        torch.testing.assert_close(weights(out)[name], tensor, atol=1e-4, rtol=0)
    assert resumed["valAccuracy"] == pytest.approx(straight["valAccuracy"])


def test_a_stop_before_any_new_step_writes_no_checkpoint_and_resumes_where_it_was(tmp_path):
    shapes = write_three_classes(tmp_path / "shapes")
    out = tmp_path / "out"
    STOP.request("SIGTERM")  # e.g. while the dataset was downloading
    with pytest.raises(Preempted) as stopped:
        train.main(job(shapes, out), cache_dir=tmp_path / "cache", log=quiet)
    assert stopped.value.checkpoint is None and not stopped.value.fresh
    assert "no checkpoint yet" in stopped.value.message
    assert not (out / "checkpoints").exists()


def test_a_stop_on_an_epochs_last_step_names_that_epochs_checkpoint_and_writes_no_other(tmp_path):
    shapes = write_three_classes(tmp_path / "shapes")
    out = tmp_path / "out"
    with pytest.raises(Preempted) as stopped:
        train.main(job(shapes, out), cache_dir=tmp_path / "cache", log=quiet,
                   metrics=StopAfter(6))  # the epoch ends, is evaluated and checkpointed
    assert stopped.value.where == "the end of epoch 1" and not stopped.value.fresh
    assert stopped.value.checkpoint["file"] == "epoch-0001.pt"
    assert "nothing trained since checkpoint" in stopped.value.message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001.pt",
                                                                       "latest.json"]


@pytest.mark.s3
def test_sigterm_to_the_pod_process_checkpoints_exits_11_and_the_next_run_resumes_there(
        s3_server, s3_bucket, aws_env, tmp_path):
    """The pod's entry point as PID 1 would run it: SIGTERM after the first checkpoint."""
    client = s3_server.client()
    shapes = write_three_classes(tmp_path / "shapes", train_per_class=12)
    subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "dataset", "upload",
                    str(shapes), f"s3://{s3_bucket}/shapes/"], check=True, capture_output=True,
                   timeout=120)
    out = f"s3://{s3_bucket}/runs/stop/"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(manifest(f"s3://{s3_bucket}/shapes/", out, name="stop",
                                        epochs=200, batchSize=2, baseline={"enabled": False})))
    termination_log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(termination_log),
           "FINETUNE_METRICS_ADDR": "127.0.0.1", "FINETUNE_METRICS_PORT": "0",
           "FINETUNE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "finetune_trainer", "--spec", str(spec)]
    pointer_key = "runs/stop/checkpoints/latest.json"

    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    signal_once_checkpointed(first, client, s3_bucket, pointer_key, signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == ExitCode.PREEMPTED, output[-3000:]
    message = parse_termination_message(termination_log.read_text())
    assert message["reason"] == "Preempted" and "stopped on SIGTERM" in message["message"]
    stopped_at = message["checkpoint"]
    newest = json.loads(client.get_object(Bucket=s3_bucket, Key=pointer_key)["Body"].read())[
        "checkpoints"][0]
    assert (newest["epoch"], newest["step"]) == (stopped_at["epoch"], stopped_at["step"])
    assert stopped_at["uri"] == f"{out}checkpoints/{newest['file']}"

    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    # It resumes where the first stopped; then stop it again rather than train 200 epochs.
    deadline = time.monotonic() + 300
    seen = ""
    while second.poll() is None and time.monotonic() < deadline and "resumed from" not in seen:
        seen += second.stdout.readline()
    second.send_signal(signal.SIGTERM)
    output, _ = second.communicate(timeout=120)
    assert second.returncode == ExitCode.PREEMPTED, (seen + output)[-3000:]
    assert f"resumed from {stopped_at['uri']}: {stopped_at['epoch']} of 200 epochs and " \
           f"{stopped_at['step']} steps of the next done" in seen


def test_sigterm_to_a_pod_of_two_processes_stops_both_ranks_at_one_step(tmp_path):
    """torchrun (in the pod's PID 1) passes SIGTERM on to its ranks; they agree on the step,
    rank 0 checkpoints it, and the pod exits 11 with a message naming that checkpoint."""
    shapes = write_three_classes(tmp_path / "shapes", train_per_class=12)
    out = tmp_path / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(manifest(
        str(shapes), str(out), name="pair", epochs=200, batchSize=2, baseline={"enabled": False},
        model={"backbone": "test_efficientnet_gn", "weights": "None", "imageSize": 32})))
    termination_log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(termination_log),
           "FINETUNE_METRICS_PORT": "0", "FINETUNE_CACHE_DIR": str(tmp_path / "cache"),
           "FINETUNE_PROCESSES_PER_POD": "2", "OMP_NUM_THREADS": "1"}
    pod = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "--spec", str(spec)],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pointer = out / "checkpoints" / "latest.json"
    deadline = time.monotonic() + 300
    while pod.poll() is None and time.monotonic() < deadline and not pointer.exists():
        time.sleep(0.05)
    pod.send_signal(signal.SIGTERM)
    output, _ = pod.communicate(timeout=120)
    assert pod.returncode == ExitCode.PREEMPTED, output[-3000:]
    message = parse_termination_message(termination_log.read_text())
    assert message["reason"] == "Preempted"
    newest = json.loads(pointer.read_text())["checkpoints"][0]
    assert (message["checkpoint"]["epoch"], message["checkpoint"]["step"]) == \
        (newest["epoch"], newest["step"])
    state = torch.load(out / "checkpoints" / newest["file"], weights_only=True)
    assert state["worldSize"] == 2 and state["stepInEpoch"] == newest["step"]
