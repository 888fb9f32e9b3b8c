# Fixtures for tests against the local cluster (they start it on first use); see fixtures_cluster.py.
pytest_plugins = ["fixtures_cluster"]

# ---- S3 and sample data ------------------------------------------------------------------
# `s3_server` is a real S3 server: versitygw started for the session (tests/s3server.py), or the
# server named by FINETUNE_S3_ENDPOINT + AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY. Tests using
# it are marked `s3` automatically, so `pytest -m "not s3"` runs without one.

import os
import uuid
from dataclasses import dataclass

import pytest

S3_FIXTURES = {"s3_server", "s3_bucket", "aws_env"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, **config):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if S3_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)


@pytest.fixture(scope="session")
def s3_server():
    endpoint = os.environ.get("FINETUNE_S3_ENDPOINT")
    if endpoint and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get(
            "AWS_SECRET_ACCESS_KEY"):
        yield S3Server(endpoint, os.environ["AWS_ACCESS_KEY_ID"],
                       os.environ["AWS_SECRET_ACCESS_KEY"],
                       os.environ.get("AWS_REGION", "us-east-1"))
        return
    from s3server import VersityGateway, versitygw_binary

    if not versitygw_binary():
        pytest.fail("versitygw is not installed: run `make cluster-build` (or set "
                    "FINETUNE_S3_ENDPOINT with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), or "
                    "deselect with -m 'not s3'")
    with VersityGateway() as gateway:
        yield S3Server(gateway.endpoint, gateway.access_key, gateway.secret_key, gateway.region)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket, emptied and deleted after the test."""
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield name
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)


@pytest.fixture
def aws_env(s3_server, monkeypatch, tmp_path):
    """The standard AWS environment pointed at the test server (as the operator sets it in the
    trainer pod from the credentials Secret), with no profile or config file of this machine."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key,
           "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
           "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_REGION": s3_server.region,
           "AWS_DEFAULT_REGION": s3_server.region,
           "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory):
    """A small Fashion-MNIST ImageFolder: 20 training and 5 val/ images per class, 28 px."""
    from finetune_trainer.samples import write_fashion_mnist

    return write_fashion_mnist(tmp_path_factory.mktemp("fashion-mnist"), per_class=20,
                               val_per_class=5, image_size=28, seed=0)
