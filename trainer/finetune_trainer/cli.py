"""The `finetune` command: run a FineTuneJob locally, validate one, or prepare datasets.

    finetune run FILE [--output-uri URI] [--epochs N] [--metrics-port P | --no-metrics]
    finetune validate FILE
    finetune dataset upload|sample ...
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finetune_api import contract
from finetune_api.validation import SpecError, validate_manifest
from finetune_trainer.dataset_cli import add_dataset_parser
from finetune_trainer.errors import TrainerError


def _run(args) -> int:
    from finetune_trainer import cpus, runtime
    from finetune_trainer.metrics import TrainerMetrics
    from finetune_trainer.preemption import STOP
    STOP.install()  # SIGTERM: checkpoint the current step and exit 11, as in a pod
    cpus.limit_threads(log=runtime.print_flush)
    try:
        manifest = runtime.read_manifest(args.file)
    except TrainerError as error:
        return runtime.report_failure(error, None)
    metrics = TrainerMetrics()
    if not args.no_metrics:
        port = args.metrics_port or runtime.metrics_port(manifest)
        url = runtime.serve_metrics(metrics, args.metrics_address, port, any_port_if_busy=True)
        print(f"metrics on {url}", flush=True)
    return int(runtime.run_job(manifest, termination_log=args.termination_log, metrics=metrics,
                               log=runtime.print_flush, output_uri=args.output_uri,
                               epochs=args.epochs, cache_dir=args.cache_dir))


def validate_file(path: str) -> list[str]:
    """Problems of the manifest at `path`, one line each, field first; empty when it is valid.
    The schema and CEL rules need no model libraries; the backbone checks run where torch,
    timm and torchvision are installed (`library_checks_skipped` says when they are not)."""
    from finetune_trainer.manifests import read_manifest
    try:
        spec = validate_manifest(read_manifest(path))
    except SpecError as error:
        return error.problems
    except TrainerError as error:
        return [str(error)]
    if library_checks_skipped():
        return []
    from finetune_trainer.preflight import preflight_problems
    return [str(problem) for problem in preflight_problems(spec)]


def library_checks_skipped() -> str | None:
    """Why the checks that need the model libraries cannot run here, or None."""
    missing = []
    for name in ("torch", "timm", "torchvision"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return f"{', '.join(missing)} not installed" if missing else None


def _validate(args) -> int:
    problems = validate_file(args.file)
    for problem in problems:
        print(problem)
    if not problems:
        skipped = library_checks_skipped()
        print(f"{args.file}: OK" + (f" (schema and CEL rules; backbone, freeze stages and "
                                    f"weights not checked: {skipped})" if skipped else ""))
    return int(contract.ExitCode.INVALID_SPEC) if problems else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train a FineTuneJob manifest here (CPU or local GPU)")
    run.add_argument("file", help="FineTuneJob manifest (YAML)")
    run.add_argument("--output-uri", help="override spec.output.uri")
    run.add_argument("--epochs", type=int, help="override spec.epochs")
    run.add_argument("--cache-dir", default=os.environ.get(contract.ENV_CACHE_DIR),
                     help="dataset and feature cache (default $FINETUNE_CACHE_DIR or "
                          "~/.cache/finetune)")
    run.add_argument("--metrics-address", default="127.0.0.1",
                     help="bind address of /metrics (default 127.0.0.1)")
    run.add_argument("--metrics-port", type=int,
                     help="port of /metrics (default spec.metrics.port; any free port if busy)")
    run.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    run.add_argument("--termination-log", help="also write the termination message here")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check a manifest: schema, rules, backbone")
    validate.add_argument("file")
    validate.set_defaults(handler=_validate)

    add_dataset_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
