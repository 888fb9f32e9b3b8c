"""Create buckets on the local cluster's S3 server (versitygw); existing ones are left as they are.

    python cluster/s3buckets.py datasets models            # settings from the environment
    python cluster/s3buckets.py --env .state/cluster/env datasets models
    python cluster/s3buckets.py --list

Settings: S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, as written
to the cluster's env file by ``cluster/localcluster.py up``. Path-style addressing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError


def read_env_file(path: str) -> dict[str, str]:
    env = {}
    with open(path) as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.removeprefix("export ").partition("=")
                env[key] = shlex.split(value)[0] if value else ""
    return env


def client(settings: dict[str, str]):
    return boto3.client(
        "s3", endpoint_url=settings["S3_ENDPOINT_URL"],
        aws_access_key_id=settings["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=settings["AWS_SECRET_ACCESS_KEY"],
        region_name=settings.get("AWS_DEFAULT_REGION", "us-east-1"),
        config=Config(s3={"addressing_style": "path"}))


def ensure_buckets(s3, names: list[str]) -> list[str]:
    """Create each bucket that does not exist yet; returns the names created."""
    created = []
    for name in names:
        try:
            s3.create_bucket(Bucket=name)
            created.append(name)
        except ClientError as error:
            if error.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("buckets", nargs="*")
    parser.add_argument("--env", help="the cluster's env file (default: this process's environment)")
    parser.add_argument("--list", action="store_true", help="list the buckets")
    args = parser.parse_args(argv)
    settings = {**os.environ, **(read_env_file(args.env) if args.env else {})}
    missing = [k for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not settings.get(k)]
    if missing:
        parser.error(f"{', '.join(missing)} not set: source the cluster's env file or pass --env")
    s3 = client(settings)
    for name in ensure_buckets(s3, args.buckets):
        print(f"created s3://{name}")
    if args.list:
        for bucket in s3.list_buckets().get("Buckets", []):
            print(bucket["Name"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
