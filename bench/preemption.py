"""Work lost per preemption: the trainer's graceful stop (SIGTERM: finish the step, checkpoint it,
exit 11, resume at that step) against a hard kill at the same moments (SIGKILL: resume from the
last epoch checkpoint, as every preemption did before), both against an uninterrupted run of the
same job in the same script.

    python bench/preemption.py                       # 2 preemptions, CPU, a few minutes
    python bench/preemption.py --preemptions 3 --epochs 5

Each run is the pod's entry point (`python -m finetune_trainer`) on a Fashion-MNIST sample with
local-directory storage. A preemption lands at 3/4 of an epoch (epochs 2, 3, ...; `--at`), timed
from the uninterrupted run's epoch length. Printed per mode:

    wall overhead / preemption   extra wall time over the uninterrupted run, per preemption:
                                 process start, data, model and resume, plus the work lost
    stop latency                 SIGTERM to exit (must fit spec.checkpoint.preemptionGraceSeconds)

The difference of the two modes' overheads is the work a graceful stop saves per preemption
(3/4 of an epoch here, by construction of where the preemptions land). Restarting a process
(Python, torch, the dataset, the model) costs about ten seconds on a small CPU machine and
varies by a second or two, so the figure is only meaningful for epochs of tens of seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def manifest(dataset: Path, output: Path, epochs: int, batch: int, backbone: str) -> dict:
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
            "metadata": {"name": "bench-preemption", "namespace": "bench"},
            "spec": {"dataset": {"uri": str(dataset)},
                     "model": {"backbone": backbone, "weights": "None", "imageSize": 64},
                     "strategy": "FineTune", "epochs": epochs, "batchSize": batch,
                     "augmentation": "Light", "dataLoaderWorkers": 0,
                     "baseline": {"enabled": False}, "output": {"uri": str(output)}}}


class Segment:
    """One trainer process; its log is read as it runs."""

    def __init__(self, spec: Path, work: Path):
        env = {**os.environ, "FINETUNE_TERMINATION_LOG": str(work / "termination-log"),
               "FINETUNE_METRICS_ADDR": "127.0.0.1", "FINETUNE_METRICS_PORT": "0",
               "FINETUNE_CACHE_DIR": str(work / "cache")}
        self.started = time.monotonic()
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "finetune_trainer", "--spec",
                                         str(spec)], env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    def wait_for_line(self, pattern: str, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return time.monotonic()
            if self.process.poll() is not None:
                raise RuntimeError(f"trainer exited before {pattern!r}:\n" +
                                   "\n".join(self.lines[-30:]))
            time.sleep(0.02)
        raise TimeoutError(pattern)

    def finish(self, timeout: float = 1800) -> tuple[int, float]:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code, time.monotonic() - self.started


def run_mode(mode: str, spec: Path, work: Path, *, epochs: int, preemptions: int,
             epoch_seconds: float, at: float) -> dict:
    """Preempt at fraction `at` of epochs 2 .. preemptions + 1, then run to the end."""
    walls, stop_latencies = [], []
    for completed in range(1, preemptions + 1):
        segment = Segment(spec, work)
        segment.wait_for_line(rf"epoch {completed}/{epochs} ")
        time.sleep(epoch_seconds * at)
        signalled = time.monotonic()
        segment.process.send_signal(signal.SIGTERM if mode == "graceful" else signal.SIGKILL)
        code, wall = segment.finish()
        walls.append(wall)
        if mode == "graceful":
            assert code == 11, "\n".join(segment.lines[-20:])
            stop_latencies.append(time.monotonic() - signalled)
    last = Segment(spec, work)
    code, wall = last.finish()
    assert code == 0, "\n".join(last.lines[-30:])
    walls.append(wall)
    report = json.loads((work / "out" / "report.json").read_text())
    return {"walls": walls, "stopLatencies": stop_latencies, "report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--preemptions", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backbone", default="resnet18",
                        help="timm name; big enough that part of an epoch outweighs the noise of "
                             "restarting a process")
    parser.add_argument("--at", type=float, default=0.75,
                        help="where in an epoch a preemption lands (fraction)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.preemptions >= args.epochs:
        parser.error("--preemptions must be below --epochs")
    sys.path.insert(0, str(REPO / "trainer"))
    from finetune_trainer.samples import write_fashion_mnist

    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as scratch:
        root = Path(scratch)
        dataset = write_fashion_mnist(root / "data", per_class=args.per_class, val_per_class=2,
                                      image_size=32, seed=0)
        results = {}
        for mode in ("uninterrupted", "graceful", "hard kill"):
            work = root / mode.replace(" ", "-")
            work.mkdir()
            spec = work / "spec.json"
            spec.write_text(json.dumps(manifest(dataset, work / "out", args.epochs, args.batch,
                                                args.backbone)))
            if mode == "uninterrupted":
                code, wall = Segment(spec, work).finish()
                assert code == 0
                report = json.loads((work / "out" / "report.json").read_text())
                steps_per_epoch = report["optimizerSteps"] // args.epochs
                epoch_seconds = statistics.mean(h["seconds"] for h in report["history"])
                results[mode] = {"walls": [wall], "report": report, "stopLatencies": []}
                step_seconds = epoch_seconds / steps_per_epoch
                print(f"uninterrupted: {wall:.1f} s wall, {args.epochs} epochs of "
                      f"{steps_per_epoch} steps, {step_seconds * 1000:.0f} ms a step")
                continue
            results[mode] = run_mode("graceful" if mode == "graceful" else "kill", spec, work,
                                     epochs=args.epochs, preemptions=args.preemptions,
                                     epoch_seconds=epoch_seconds, at=args.at)
    base = sum(results["uninterrupted"]["walls"])
    figures = {"preemptions": args.preemptions, "stepSeconds": step_seconds,
               "uninterruptedWallSeconds": base, "modes": {}}
    for mode in ("graceful", "hard kill"):
        result = results[mode]
        overhead = (sum(result["walls"]) - base) / args.preemptions
        report = result["report"]
        assert report["optimizerSteps"] == results["uninterrupted"]["report"]["optimizerSteps"]
        figures["modes"][mode] = {
            "wallOverheadPerPreemptionSeconds": overhead,
            "overheadRatio": sum(result["walls"]) / base,
            "stopLatencySeconds": max(result["stopLatencies"], default=None),
            "resumedFrom": report["resumedFrom"]}
        latency = (f", stop latency {max(result['stopLatencies']):.2f} s"
                   if result["stopLatencies"] else "")
        print(f"{mode:>13}: {sum(result['walls']):.1f} s wall "
              f"({sum(result['walls']) / base:.2f}x uninterrupted), "
              f"{overhead:.1f} s overhead per preemption{latency}; last resume at "
              f"{report['resumedFrom']}")
    graceful = figures["modes"]["graceful"]["wallOverheadPerPreemptionSeconds"]
    hard = figures["modes"]["hard kill"]["wallOverheadPerPreemptionSeconds"]
    print(f"work a graceful stop saves per preemption: {hard - graceful:.1f} s "
          f"(expected: {args.at:.2f} of an epoch, {args.at * steps_per_epoch * step_seconds:.1f} s, "
          "less the graceful stop's own checkpoint)")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
