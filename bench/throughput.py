"""Training throughput: the trainer's `train_one_epoch` (with its device setup: bf16 autocast and
channels_last on GPUs that support them, per-group optimizer, per-step schedule, metrics) against
a plain hand-written PyTorch loop, on the same model, the same images and the same machine.

    python bench/throughput.py                       # CPU-sized defaults: 64 px, 256 images
    python bench/throughput.py --image-size 224 --images 2048 --batch-size 128   # on a GPU

Both loops run in this one process, alternating, and each figure is the median of the timed
epochs after a warm-up epoch, so that a busy machine slows both alike. Prints images/s of each
and the ratio trainer / plain.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from finetune_api.validation import validate_spec
from finetune_trainer import policy
from finetune_trainer.data import ImageDataset, prepare_dataset
from finetune_trainer.preprocessing import build_transform, resolve_preprocessing
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.models import build_model
from finetune_trainer.samples import write_fashion_mnist
from finetune_trainer.train import load_data, pick_device, train_one_epoch


def plain_epoch(model, optimizer, loader, device) -> float:
    """The loop everyone writes first: fp32, no memory-format or loader tuning. Returns images/s."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    images_seen, started = 0, time.perf_counter()
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        loss = criterion(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        images_seen += len(targets)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_seen / (time.perf_counter() - started)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=256, help="training images (10 classes)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per loop")
    parser.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = parser.parse_args(argv)

    spec = validate_spec({
        "dataset": {"uri": "/tmp/unused/"}, "output": {"uri": "/tmp/unused/"},
        "model": {"backbone": args.backbone, "weights": "None", "imageSize": args.image_size},
        "strategy": "FineTune", "batchSize": args.batch_size, "augmentation": "None",
        "dataLoaderWorkers": args.workers, "schedule": {"name": "Constant"},
        "epochs": args.epochs + 1})
    with tempfile.TemporaryDirectory() as scratch:
        directory = write_fashion_mnist(Path(scratch) / "fashion", per_class=args.images // 10,
                                        image_size=28, seed=0)
        dataset = prepare_dataset({**spec["dataset"], "uri": str(directory)}, seed=0,
                                  cache_dir=Path(scratch) / "cache")
        run = pick_device(spec["precision"], spec["channelsLast"])

        torch.manual_seed(0)
        model = build_model(spec["model"], len(dataset.classes), load_weights=False)
        plain_model = copy.deepcopy(model).to(run.device)

        # The trainer's path: its loaders, device setup, optimizer groups and schedule.
        preprocessing = resolve_preprocessing(spec["model"])
        loaders = load_data(dataset, preprocessing=preprocessing, augmentation="None",
                            batch_size=args.batch_size, workers=args.workers, run=run, seed=0)
        model.to(run.device)
        if run.channels_last:
            model.to(memory_format=torch.channels_last)
        stages = policy.model_stages(model)
        optimizer = policy.build_optimizer(
            policy.parameter_groups(model, stages, spec["optimizer"]), spec["optimizer"])
        scheduler = policy.build_scheduler(optimizer, spec["schedule"],
                                           steps_per_epoch=len(loaders.train),
                                           epochs=spec["epochs"])
        criterion = nn.CrossEntropyLoss()
        metrics = TrainerMetrics()

        # The plain path: the same images and transform, a textbook DataLoader and AdamW.
        plain_loader = torch.utils.data.DataLoader(
            ImageDataset(dataset.train, build_transform("None", preprocessing, train=True)),
            batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
            drop_last=len(dataset.train) > args.batch_size)
        plain_optimizer = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)

        def trainer_epoch() -> float:
            stats = train_one_epoch(model, criterion, optimizer, scheduler, loaders.train, run,
                                    metrics=metrics)
            if run.device.type == "cuda":
                torch.cuda.synchronize()
            return stats.images_per_second

        trainer_epoch(), plain_epoch(plain_model, plain_optimizer, plain_loader, run.device)
        trainer_rates, plain_rates = [], []
        for _ in range(args.epochs):
            plain_rates.append(plain_epoch(plain_model, plain_optimizer, plain_loader, run.device))
            trainer_rates.append(trainer_epoch())

    trainer, plain = statistics.median(trainer_rates), statistics.median(plain_rates)
    device = torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu"
    precision = "bf16" if run.autocast_dtype else "fp32"
    print(f"{args.backbone} at {args.image_size}px, {len(dataset.train)} images, batch "
          f"{args.batch_size}, {args.workers} workers, {device} ({torch.get_num_threads()} threads)")
    print(f"plain PyTorch loop      {plain:9.1f} images/s  (fp32)")
    print(f"trainer train_one_epoch {trainer:9.1f} images/s  ({precision}"
          f"{', channels_last' if run.channels_last else ''})")
    print(f"ratio trainer/plain     {trainer / plain:9.2f}")
    if args.json:
        print(json.dumps({"backbone": args.backbone, "imageSize": args.image_size,
                          "images": len(dataset.train), "device": device,
                          "precision": precision, "plainImagesPerSecond": plain,
                          "trainerImagesPerSecond": trainer, "ratio": trainer / plain,
                          "plainEpochs": plain_rates, "trainerEpochs": trainer_rates}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
