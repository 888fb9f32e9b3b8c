"""`finetune dataset ...`: put a dataset where a FineTuneJob can read it.

    finetune dataset sample fashion-mnist|digits DIR [--per-class N] [--val-per-class N]
    finetune dataset upload DIR s3://bucket/prefix/ [--endpoint URL] [--workers N]

Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_PROFILE, ...); AWS_ENDPOINT_URL works in place of --endpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError


def add_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Add `dataset upload` and `dataset sample` to the `finetune` command's subparsers."""
    dataset = subparsers.add_parser("dataset", help="write a sample dataset or upload one to S3")
    actions = dataset.add_subparsers(dest="dataset_command", required=True)

    upload = actions.add_parser(
        "upload", help="upload a directory (e.g. an ImageFolder) to s3://bucket/prefix/, "
                       "skipping files that are already there unchanged")
    upload.add_argument("directory", type=Path)
    upload.add_argument("uri", help="s3://bucket/prefix/ (or a local path)")
    upload.add_argument("--endpoint", help="S3-compatible endpoint URL (default: AWS, or "
                                           "$AWS_ENDPOINT_URL)")
    upload.add_argument("--region", help="S3 region (default $AWS_REGION or us-east-1)")
    upload.add_argument("--addressing-style", choices=["Auto", "Path", "Virtual"],
                        default="Auto")
    upload.add_argument("--workers", type=int, default=16, help="parallel uploads (default 16)")
    upload.set_defaults(handler=dataset_upload_main)

    sample = actions.add_parser(
        "sample", help="write a sample ImageFolder from locally installed data (no download)")
    sample.add_argument("name", choices=["fashion-mnist", "digits"])
    sample.add_argument("directory", type=Path)
    sample.add_argument("--per-class", type=int,
                        help="training images per class (default: 100 for fashion-mnist, "
                             "all for digits)")
    sample.add_argument("--val-per-class", type=int, default=0,
                        help="images per class in val/ (default 0: the trainer splits)")
    sample.add_argument("--image-size", type=int,
                        help="side in pixels (default 28 for fashion-mnist, 32 for digits)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--split", choices=["train", "test"], default="train",
                        help="fashion-mnist: which original split to draw from")
    sample.set_defaults(handler=dataset_sample_main)
    return dataset


def dataset_upload_main(args) -> int:
    from finetune_trainer.storage import open_store, upload_directory

    s3 = {"endpoint": args.endpoint, "region": args.region,
          "addressingStyle": args.addressing_style}
    store = open_store({key: value for key, value in s3.items() if value})
    try:
        uploaded = upload_directory(args.directory, args.uri, store, max_workers=args.workers)
    except TrainerError as error:
        print(f"finetune dataset upload: {error}", file=sys.stderr)
        return int(error.exit_code)
    total = sum(1 for path in Path(args.directory).rglob("*") if path.is_file())
    print(f"uploaded {uploaded} of {total} files to {args.uri} "
          f"({store.stats.bytes_uploaded} bytes; {total - uploaded} already there unchanged)")
    return 0


def dataset_sample_main(args) -> int:
    from finetune_trainer import samples

    for option in ("per_class", "val_per_class", "image_size"):
        value = getattr(args, option)
        if value is not None and value < (1 if option != "val_per_class" else 0):
            print(f"finetune dataset sample: --{option.replace('_', '-')} must be positive",
                  file=sys.stderr)
            return int(ExitCode.INVALID_SPEC)
    try:
        if args.name == "fashion-mnist":
            dest = samples.write_fashion_mnist(
                args.directory, per_class=args.per_class or 100,
                val_per_class=args.val_per_class, image_size=args.image_size or 28,
                seed=args.seed, split=args.split)
        else:
            dest = samples.write_digits(args.directory, per_class=args.per_class,
                                        val_per_class=args.val_per_class,
                                        image_size=args.image_size or 32, seed=args.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"finetune dataset sample: {error}", file=sys.stderr)
        return int(ExitCode.INVALID_DATA)
    counts = {split: sum(1 for _ in (dest / split).rglob("*.png")) for split in ("train", "val")}
    print(f"wrote {counts['train']} training and {counts['val']} validation images "
          f"({args.name}) to {dest}")
    return 0
