"""Running a job as a process: the metrics server, the one-line failure, the termination message
and the exit code. Shared by the pod entry point (`python -m finetune_trainer`) and
`finetune run`."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

from finetune_api import contract
from finetune_api.contract import ExitCode, termination_message
from finetune_trainer import cpus, distributed, race, train
from finetune_trainer.errors import TrainerError
from finetune_trainer.manifests import read_manifest  # noqa: F401 - part of this module's API
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.preemption import STOP, Preempted
from finetune_trainer.pushgateway import PushedRun

DEFAULT_METRICS_PORT = 9400


def metrics_port(manifest: dict) -> int:
    if os.environ.get(contract.ENV_METRICS_PORT):
        return int(os.environ[contract.ENV_METRICS_PORT])
    spec = manifest.get("spec", manifest)
    return int(((spec.get("metrics") or {}).get("port")) or DEFAULT_METRICS_PORT)


def serve_metrics(metrics: TrainerMetrics, address: str, port: int, *, log=print,
                  any_port_if_busy: bool = False) -> str | None:
    """Start /metrics; a busy port costs the metrics, not the training run."""
    try:
        server, _ = metrics.serve(address, port)
    except OSError as error:
        if not any_port_if_busy:
            log(f"metrics server not started on {address}:{port}: {error}")
            return None
        server, _ = metrics.serve(address, 0)
    host = address or "0.0.0.0"
    return f"http://{host}:{server.server_port}/metrics"


def failure(exit_code: ExitCode, message: str, field: str | None = None) -> TrainerError:
    return TrainerError(exit_code, " ".join(str(message).split()), field)


def run_job(manifest: dict, *, termination_log: str | None, metrics: TrainerMetrics,
            log=print, **options) -> int:
    """Run the job; write the termination message; return the exit code. `options` go to
    train.main (output_uri, epochs, cache_dir)."""
    try:
        report = train.main(manifest, metrics=metrics, log=log, **options)
    except Preempted as error:
        log(f"preempted: {error.message}")
        checkpoint = ({key: error.checkpoint[key] for key in ("uri", "epoch", "step", "time")}
                      if error.checkpoint else None)
        _write_termination_log(termination_log, termination_message(
            reason=error.reason, message=error.message, exitCode=int(error.exit_code),
            checkpoint=checkpoint))
        return int(error.exit_code)
    except TrainerError as error:
        problem = failure(error.exit_code, error.message, error.field)
    except torch.OutOfMemoryError as error:
        problem = failure(ExitCode.OUT_OF_MEMORY, f"out of GPU memory; lower spec.batchSize "
                          f"(or spec.model.imageSize): {str(error).splitlines()[0]}",
                          "spec.batchSize")
    except MemoryError:
        problem = failure(ExitCode.OUT_OF_MEMORY, "out of memory; lower spec.batchSize or raise "
                          "spec.resources.memory", "spec.batchSize")
    except Exception as error:  # noqa: BLE001 - an unexpected crash: retried by the operator
        traceback.print_exc()
        problem = failure(ExitCode.FAILED, f"{type(error).__name__}: {error}")
    else:
        if "outputs" not in report:  # a rank other than 0: rank 0 writes the message
            return ExitCode.SUCCEEDED
        _write_termination_log(termination_log, termination_message(
            valAccuracy=report["valAccuracy"], bestValAccuracy=report["bestValAccuracy"],
            baselineAccuracy=report["baseline"].get("accuracy"), strategy=report["strategy"],
            strategyReason=report["strategyReason"], modelUri=report["outputs"]["modelUri"],
            reportUri=report["outputs"]["reportUri"], epochs=report["epochs"]["completed"],
            plannedEpochs=report["epochs"]["planned"], resumedFromEpoch=report["resumedFromEpoch"],
            checkpoint=report.get("lastCheckpoint"),
            leaderboard=race.top(report["leaderboard"]) if "leaderboard" in report else None))
        return ExitCode.SUCCEEDED
    return report_failure(problem, termination_log)


def _write_termination_log(path: str | None, message: str) -> None:
    if not path:
        return
    try:
        Path(path).write_text(message)
    except OSError as error:
        print(f"could not write the termination message to {path}: {error}", file=sys.stderr)


def pod_main(argv: list[str] | None = None) -> int:
    """Entry point in the trainer pod: `python -m finetune_trainer --spec /etc/finetune/spec.yaml`."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer")
    parser.add_argument("--spec", default=os.environ.get(
        contract.ENV_SPEC, f"{contract.SPEC_MOUNT_DIR}/{contract.SPEC_FILE_NAME}"),
        help="the FineTuneJob manifest (default: $FINETUNE_SPEC or /etc/finetune/spec.yaml)")
    args = parser.parse_args(argv)
    STOP.install()  # PID 1 of the container: without a handler SIGTERM would be ignored
    termination_log = os.environ.get(contract.ENV_TERMINATION_LOG, "/dev/termination-log")
    log = print_flush
    world = distributed.world_from_env()
    metrics = TrainerMetrics(rank=world.rank if world.launched else None)
    try:
        manifest = read_manifest(args.spec)
    except TrainerError as error:
        return report_failure(error, termination_log)
    pushed = PushedRun.begin(manifest, log)  # off unless FINETUNE_PUSHGATEWAY_URL
    if not world.launched:
        # Several GPUs or several pods: torchrun starts the ranks, each of which runs this
        # entry point again with RANK and WORLD_SIZE set.
        run_id = (manifest.get("metadata") or {}).get("uid") or "finetune"
        arguments = distributed.launch_arguments(
            manifest.get("spec", manifest), run_id=run_id,
            program=["-m", "finetune_trainer", "--spec", args.spec])
        if arguments is not None:
            log(f"torchrun {' '.join(arguments)}")
            try:
                return distributed.launch(arguments)
            except TrainerError as error:
                return report_failure(error, termination_log)
    if world.local_rank != 0:  # one message per pod, from its first process
        termination_log = None
    cpus.limit_threads(processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)), log=log)
    # All interfaces unless told otherwise: Prometheus and the operator scrape the pod IP.
    # Each process of a pod serves on its own port: the configured one plus its local rank.
    address = os.environ.get(contract.ENV_METRICS_ADDR) or "0.0.0.0"
    url = serve_metrics(metrics, address, metrics_port(manifest) + world.local_rank, log=log)
    if url:
        log(f"metrics on {url}")
    exit_code = run_job(manifest, termination_log=termination_log, metrics=metrics, log=log,
                        cache_dir=os.environ.get(contract.ENV_CACHE_DIR) or None)
    if world.is_main:
        pushed.push(metrics.registry, exit_code=int(exit_code))
    distributed.destroy_process_group()
    return int(exit_code)


def report_failure(error: TrainerError, termination_log: str | None) -> int:
    """One line on stderr naming the field and the cause, and the termination message."""
    where = f"{error.field}: " if error.field else ""
    print(f"error: {where}{error.message} [{error.reason}, exit {int(error.exit_code)}]",
          file=sys.stderr, flush=True)
    _write_termination_log(termination_log, termination_message(
        reason=error.reason, message=error.message, field=error.field,
        exitCode=int(error.exit_code)))
    return int(error.exit_code)


def print_flush(*args) -> None:
    print(*args, flush=True)
