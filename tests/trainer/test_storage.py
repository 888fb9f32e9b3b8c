"""ObjectStore against a real S3 server (versitygw) and the local filesystem."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from botocore.exceptions import ClientError

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError
from finetune_trainer.storage import (CREDENTIALS_FIELD, ObjectNotFound, error_from_client_error,
                                      join_uri, local_etag, open_store, upload_directory)


@pytest.fixture
def store(aws_env):
    return open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]})


def test_join_uri():
    assert join_uri("s3://b/p/", "train", "cat/1.png") == "s3://b/p/train/cat/1.png"
    assert join_uri("s3://b", "x") == "s3://b/x"
    assert join_uri("/data/set", "a/") == "/data/set/a/"
    assert join_uri("file:///data/", "", "k") == "file:///data/k"


def test_put_get_list_delete(store, s3_bucket):
    base = f"s3://{s3_bucket}/set/"
    store.write_bytes(join_uri(base, "a/1.bin"), b"one")
    store.write_bytes(join_uri(base, "b.bin"), b"two!")
    store.write_bytes(f"s3://{s3_bucket}/settled.bin", b"outside the prefix")

    listed = store.list(base)
    assert [(o.key, o.size) for o in listed] == [("a/1.bin", 3), ("b.bin", 4)]
    assert listed[0].uri == f"s3://{s3_bucket}/set/a/1.bin"
    assert listed[0].etag == hashlib.md5(b"one").hexdigest()
    # Without the trailing slash the URI still names the "directory", not a key prefix.
    assert [o.key for o in store.list(f"s3://{s3_bucket}/set")] == ["a/1.bin", "b.bin"]

    assert store.read_bytes(join_uri(base, "b.bin")) == b"two!"
    assert store.exists(join_uri(base, "b.bin"))
    store.delete(join_uri(base, "b.bin"))
    assert not store.exists(join_uri(base, "b.bin"))
    store.delete(join_uri(base, "b.bin"))  # deleting what is gone is fine
    assert [o.key for o in store.list(base)] == ["a/1.bin"]


def test_create_bytes_writes_only_where_nothing_is(store, s3_bucket):
    # versitygw (posix backend) honours If-None-Match: * on PutObject, answering 412
    # PreconditionFailed, so the first claim stays; a server that ignored it would overwrite.
    uri = f"s3://{s3_bucket}/out/.claim"
    assert store.create_bytes(uri, b"first") is True
    assert store.create_bytes(uri, b"second") is False
    assert store.read_bytes(uri) == b"first"


def test_list_paginates(aws_env, s3_bucket, s3_server):
    client = s3_server.client()
    keys = [f"p/{i:03d}.txt" for i in range(23)]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=key, Body=key.encode())
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]}, page_size=5)
    listed = store.list(f"s3://{s3_bucket}/p/")
    assert [o.key for o in listed] == [k[2:] for k in keys]
    assert store.stats.list_requests == 5


def test_missing_key_names_the_uri(store, s3_bucket):
    uri = f"s3://{s3_bucket}/nothing/here.bin"
    with pytest.raises(ObjectNotFound) as caught:
        store.read_bytes(uri, field="spec.model.weights")
    assert caught.value.exit_code == ExitCode.INVALID_DATA
    assert caught.value.field == "spec.model.weights"
    assert uri in caught.value.message
    assert not store.exists(uri)


def test_download_is_atomic(store, s3_bucket, tmp_path, monkeypatch):
    uri = f"s3://{s3_bucket}/big.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    store.write_bytes(uri, payload)
    target = tmp_path / "cache" / "big.bin"

    assert store.download_file(uri, target) == len(payload)
    assert target.read_bytes() == payload

    # A download that dies half way leaves the previous file whole and no temporary file.
    target.write_bytes(b"previous version")
    real_get_object = store.client.get_object

    def get_object_that_breaks(**kwargs):
        response = real_get_object(**kwargs)
        body = response["Body"]
        real_read = body.read
        reads = []

        def read(*args):
            reads.append(1)
            if len(reads) > 1:  # every attempt (the transfer manager retries) breaks
                raise ConnectionResetError("connection reset by peer")
            return real_read(*args)

        body.read = read
        return response

    monkeypatch.setattr(store.client, "get_object", get_object_that_breaks)
    with pytest.raises(TrainerError) as caught:
        store.download_file(uri, target)
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert target.read_bytes() == b"previous version"
    assert os.listdir(target.parent) == ["big.bin"]

    # And a missing object does not touch the destination either.
    with pytest.raises(ObjectNotFound):
        store.download_file(f"s3://{s3_bucket}/absent.bin", target)
    assert target.read_bytes() == b"previous version"


def test_wrong_credentials_are_access_denied(aws_env, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]})
    with pytest.raises(TrainerError) as caught:
        store.list(f"s3://{s3_bucket}/data/")
    assert caught.value.exit_code == ExitCode.ACCESS_DENIED
    assert caught.value.field == CREDENTIALS_FIELD
    assert s3_bucket in caught.value.message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(TrainerError) as caught:
        open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]}).read_bytes(f"s3://{s3_bucket}/k")
    assert caught.value.exit_code == ExitCode.ACCESS_DENIED


def test_missing_bucket_is_access_denied_naming_the_bucket(store):
    uri = "s3://no-such-bucket-here/data/"
    for action in (lambda: store.list(uri, field="spec.dataset.uri"),
                   lambda: store.read_bytes(uri + "x.png", field="spec.dataset.uri"),
                   lambda: store.exists(uri + "x.png", field="spec.dataset.uri")):
        with pytest.raises(TrainerError) as caught:
            action()
        assert caught.value.exit_code == ExitCode.ACCESS_DENIED
        assert "'no-such-bucket-here' does not exist" in caught.value.message
        assert caught.value.field == "spec.dataset.uri"


def test_unreachable_endpoint_is_transient_and_quick(aws_env, s3_server):
    from s3server import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(TrainerError) as caught:
        open_store({"endpoint": closed}).list("s3://bucket/data/", field="spec.dataset.uri")
    elapsed = time.monotonic() - started
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert closed in caught.value.message or "s3://bucket/data/" in caught.value.message
    # Five attempts with standard-mode backoff (at most 1+2+4+8 s of sleeping).
    assert elapsed < 20, elapsed


def test_upload_directory_skips_unchanged(store, s3_bucket, tmp_path):
    source = tmp_path / "set"
    (source / "train" / "cat").mkdir(parents=True)
    (source / "train" / "cat" / "1.png").write_bytes(b"cat one")
    (source / "train" / "cat" / "2.png").write_bytes(b"cat two")
    (source / "labels.csv").write_text("x,y\n")
    uri = f"s3://{s3_bucket}/uploads/set/"

    assert upload_directory(source, uri, store) == 3
    assert [o.key for o in store.list(uri)] == ["labels.csv", "train/cat/1.png",
                                                "train/cat/2.png"]
    assert upload_directory(source, uri, store) == 0
    (source / "train" / "cat" / "2.png").write_bytes(b"cat TWO")  # same size, new content
    assert upload_directory(source, uri, store) == 1
    assert store.read_bytes(join_uri(uri, "train/cat/2.png")) == b"cat TWO"


def test_local_etag_matches_s3_multipart_etag(aws_env, s3_bucket, tmp_path):
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]},
                       multipart_chunk_bytes=5 * 1024 * 1024)  # S3's minimum part
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(11 * 1024 * 1024))
    uri = f"s3://{s3_bucket}/weights.bin"
    store.upload_file(path, uri)
    [info] = store.list(f"s3://{s3_bucket}/")
    assert info.etag.endswith("-3")
    assert info.etag == local_etag(path, chunk_bytes=5 * 1024 * 1024)


def test_local_store(tmp_path):
    store = open_store()
    root = tmp_path / "out"
    store.write_bytes(f"file://{root}/model/a.bin", b"A")
    store.write_bytes(str(root / "b.bin"), b"B")
    assert [(o.key, o.size) for o in store.list(str(root))] == [("b.bin", 1), ("model/a.bin", 1)]
    assert store.read_bytes(f"file://{root}/model/a.bin") == b"A"
    store.download_file(str(root / "b.bin"), tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == b"B"
    assert oct((root / "b.bin").stat().st_mode & 0o777) == "0o644"
    with pytest.raises(ObjectNotFound) as caught:
        store.read_bytes(str(root / "missing.bin"), field="spec.model.weights")
    assert str(root / "missing.bin") in caught.value.message
    store.delete(str(root / "b.bin"))
    assert not store.exists(str(root / "b.bin"))
    assert store.list(str(tmp_path / "nothing")) == []


@pytest.mark.parametrize("code,status,expected", [
    ("SlowDown", 503, ExitCode.TRANSIENT),
    ("InternalError", 500, ExitCode.TRANSIENT),
    ("AccessDenied", 403, ExitCode.ACCESS_DENIED),
    ("SignatureDoesNotMatch", 403, ExitCode.ACCESS_DENIED),
    ("InvalidToken", 400, ExitCode.ACCESS_DENIED),
    # A drifted node clock and expired short-lived credentials come as 403 (or 400) but a retry,
    # on another node or with credentials fetched anew, fixes them.
    ("RequestTimeTooSkewed", 403, ExitCode.TRANSIENT),
    ("ExpiredToken", 400, ExitCode.TRANSIENT),
    ("ExpiredToken", 403, ExitCode.TRANSIENT),
    ("NoSuchBucket", 404, ExitCode.ACCESS_DENIED),
    ("NoSuchKey", 404, ExitCode.INVALID_DATA),
    ("InvalidArgument", 400, ExitCode.FAILED),
])
def test_error_mapping(code, status, expected):
    error = ClientError({"Error": {"Code": code, "Message": "m"},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    mapped = error_from_client_error(error, "s3://bkt/k.png", field="spec.dataset.uri")
    assert mapped.exit_code == expected
    assert "s3://bkt/k.png" in mapped.message or "'bkt'" in mapped.message


def test_throttling_is_transient_after_retries(monkeypatch):
    """Every request answered 503 SlowDown, injected where botocore sends it."""
    from botocore.awsrequest import AWSResponse

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    store = open_store({"endpoint": "http://127.0.0.1:9"}, max_attempts=2)
    sent = []

    def slow_down(request, **kwargs):
        sent.append(request)
        return AWSResponse(request.url, 503, {}, _Raw(
            b"<Error><Code>SlowDown</Code><Message>Reduce your request rate</Message></Error>"))

    store.client.meta.events.register("before-send.s3.GetObject", slow_down)
    with pytest.raises(TrainerError) as caught:
        store.read_bytes("s3://throttled/k")
    assert caught.value.exit_code == ExitCode.TRANSIENT
    assert "SlowDown" in caught.value.message
    assert len(sent) == 2  # retried before giving up


class _Raw:
    def __init__(self, data):
        self.data = data

    def stream(self, **kwargs):
        yield self.data
