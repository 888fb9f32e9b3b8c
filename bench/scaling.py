"""Data-parallel scaling: training images/s of the trainer with one process against N processes
(torchrun + DDP, as a multi-GPU pod runs it), same model, same images, same machine.

    python bench/scaling.py                      # CPU: gloo, 1 vs 2 processes, 64 px
    python bench/scaling.py --device cuda        # GPU: NCCL, 1 vs every visible GPU, 128 px

Each run is the real entry point (`python -m finetune_trainer --spec FILE`, the trainer pod's
command) with FINETUNE_PROCESSES_PER_POD set; the figure of a run is the median images/s of its
epochs after the first (warm-up), taken from report.json. The runs alternate (1, N, 1, N, ...) so
that a change in the machine's load hits both alike. Prints both figures and the scaling
efficiency, images/s(N) / (N x images/s(1)): 1.0 is perfect scaling.

NCCL cannot put two ranks on one GPU, so on a machine with one GPU there is nothing to compare;
the script says so and stops. On CPU the N processes share the machine's cores (one thread each),
so the figure says how much DDP's gradient exchange costs, not what more hardware buys.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def run_trainer(workdir: Path, name: str, dataset: Path, *, processes: int, device: str,
                image_size: int, batch_size: int, epochs: int, images_note: list) -> float:
    out = workdir / name
    spec = {"dataset": {"uri": str(dataset)},
            "model": {"backbone": "efficientnet_lite0", "library": "Timm", "weights": "None",
                      "imageSize": image_size},
            "strategy": "FineTune", "epochs": epochs, "batchSize": batch_size,
            "augmentation": "None", "dataLoaderWorkers": 0 if device == "cpu" else 4,
            "baseline": {"enabled": False}, "checkpoint": {"everyEpochs": epochs},
            "resources": {"gpus": processes if device == "cuda" else 0},
            "output": {"uri": str(out)}}
    spec_file = workdir / f"{name}.yaml"
    spec_file.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1",
                                         "kind": "FineTuneJob",
                                         "metadata": {"name": name}, "spec": spec}))
    env = {**os.environ, "FINETUNE_PROCESSES_PER_POD": str(processes),
           "FINETUNE_METRICS_PORT": "0", "FINETUNE_CACHE_DIR": str(workdir / "cache"),
           "FINETUNE_TERMINATION_LOG": str(workdir / f"{name}.termination")}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-m", "finetune_trainer", "--spec", str(spec_file)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    images_note.append(report["distributed"])
    return statistics.median(h["imagesPerSecond"] for h in report["history"][1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int,
                        help="N (default: 2 on cpu, every visible GPU on cuda)")
    parser.add_argument("--images", type=int, default=320, help="training images")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (1 then N)")
    args = parser.parse_args(argv)

    import torch

    from finetune_trainer.samples import write_fashion_mnist

    if args.device == "cuda":
        gpus = torch.cuda.device_count()
        processes = args.processes or gpus
        if processes < 2 or gpus < processes:
            print(f"{gpus} GPU(s) visible: NCCL needs one GPU per process, so there is no "
                  f"multi-process figure to measure here (asked for {processes}).")
            return 0
    else:
        processes = args.processes or 2
    image_size = args.image_size or (128 if args.device == "cuda" else 64)
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        workdir = Path(tmp)
        dataset = Path(write_fashion_mnist(workdir / "data", per_class=args.images // 10,
                                           val_per_class=2, image_size=image_size, seed=0))
        single, several, distributed = [], [], []
        for repeat in range(args.repeats):
            for count, figures in ((1, single), (processes, several)):
                figures.append(run_trainer(
                    workdir, f"p{count}-r{repeat}", dataset, processes=count, device=args.device,
                    image_size=image_size, batch_size=args.batch_size, epochs=args.epochs,
                    images_note=distributed))
                print(f"{count} process(es), repeat {repeat}: {figures[-1]:.1f} images/s",
                      flush=True)
    one, many = statistics.median(single), statistics.median(several)
    result = {"device": args.device, "processes": processes, "imageSize": image_size,
              "batchSizePerProcess": args.batch_size, "images": args.images,
              "imagesPerSecond1": one, f"imagesPerSecond{processes}": many,
              "speedup": many / one, "efficiency": many / (processes * one),
              "loadAverage": os.getloadavg()[0], "backends": sorted(
                  {d.get("backend") or "none" for d in distributed})}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
