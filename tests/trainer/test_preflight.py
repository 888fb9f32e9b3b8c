"""Pre-flight of the output and of the pod's disk: one output prefix, one FineTuneJob (the owner
object); an output the trainer cannot write fails before any data is fetched; a dataset that
cannot fit the pod's ephemeral storage fails naming both sizes; report.json's checksums are those
of the objects in S3."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from finetune_api import contract
from finetune_api.contract import ExitCode, parse_termination_message
from finetune_trainer import preflight, runtime, train
from finetune_trainer.errors import TrainerError
from finetune_trainer.metrics import TrainerMetrics
from finetune_trainer.preflight import (OWNER_FILE, check_dataset_fits, check_output,
                                        claim_output, dataset_size_check,
                                        ephemeral_storage_limit, human_bytes)
from finetune_trainer.storage import open_store, upload_directory
from s3server import VersityGateway
from trainer_helpers import manifest, write_three_classes

JOB_A = {"namespace": "team-a", "name": "flowers", "uid": "uid-aaaa"}
JOB_B = {"namespace": "team-b", "name": "weeds", "uid": "uid-bbbb"}


def quiet(*_args):
    pass


def must_not_fetch(*_args, **_kwargs):
    pytest.fail("the dataset was fetched")


# ---- the owner object and the write check, on a local directory ----------------------------

def test_a_second_job_is_refused_and_the_first_keeps_its_claim(tmp_path):
    store, out = open_store(), str(tmp_path / "out")
    assert claim_output(store, out, JOB_A, log=quiet) is True
    claimed = (tmp_path / "out" / OWNER_FILE).read_text()
    assert json.loads(claimed)["uid"] == JOB_A["uid"]

    with pytest.raises(TrainerError) as caught:
        check_output(store, out, JOB_B, log=quiet)
    error = caught.value
    assert (error.exit_code, error.reason, error.field) == (
        ExitCode.OUTPUT_IN_USE, "OutputInUse", "spec.output.uri")
    assert "team-a/flowers (uid uid-aaaa" in error.message and out in error.message
    assert not error.exit_code.retryable
    assert (tmp_path / "out" / OWNER_FILE).read_text() == claimed

    # The same job again (a retried pod, a resume): the claim stands as it was.
    assert claim_output(store, out, JOB_A, log=quiet) is False
    assert (tmp_path / "out" / OWNER_FILE).read_text() == claimed


def test_a_job_applied_again_under_its_name_takes_its_output_over(tmp_path):
    store, out = open_store(), str(tmp_path)
    claim_output(store, out, JOB_A, log=quiet)
    recreated = {**JOB_A, "uid": "uid-aaaa-2"}  # deleted and applied again: a new uid
    assert claim_output(store, out, recreated, log=quiet) is True
    assert json.loads((tmp_path / OWNER_FILE).read_text())["uid"] == "uid-aaaa-2"
    # The same name in another namespace is another tenant's job.
    with pytest.raises(TrainerError) as caught:
        claim_output(store, out, {**recreated, "namespace": "team-b", "uid": "uid-c"},
                     log=quiet)
    assert caught.value.exit_code == ExitCode.OUTPUT_IN_USE
    assert "team-a/flowers (uid uid-aaaa-2" in caught.value.message


def test_an_unreadable_owner_object_still_holds_the_prefix(tmp_path):
    (tmp_path / OWNER_FILE).write_text("not json")
    with pytest.raises(TrainerError) as caught:
        claim_output(open_store(), str(tmp_path), JOB_A, log=quiet)
    assert caught.value.exit_code == ExitCode.OUTPUT_IN_USE


class IgnoresTheCondition:
    """A store on a server that ignores If-None-Match, where job B's claim lands between job
    A's read and A's read-back."""

    def __init__(self, store, racing_claim: bytes):
        self.store, self.racing_claim = store, racing_claim

    def __getattr__(self, name):
        return getattr(self.store, name)

    def create_bytes(self, uri, data, **kwargs):
        self.store.write_bytes(uri, data)
        self.store.write_bytes(uri, self.racing_claim)
        return True


def test_the_read_back_catches_a_claim_overwritten_where_the_condition_is_ignored(tmp_path):
    store = IgnoresTheCondition(open_store(), json.dumps(JOB_B).encode())
    with pytest.raises(TrainerError) as caught:
        claim_output(store, str(tmp_path), JOB_A, log=quiet)
    assert caught.value.exit_code == ExitCode.OUTPUT_IN_USE
    assert "team-b/weeds (uid uid-bbbb" in caught.value.message


def test_without_a_uid_nothing_is_claimed_but_the_write_is_checked(tmp_path):
    logged = []
    check_output(open_store(), str(tmp_path / "out"), preflight.output_owner({"name": "x"}),
                 log=logged.append)
    assert os.listdir(tmp_path / "out") == []  # the probe object is gone again
    assert "not claimed" in logged[0]


def test_the_uid_comes_from_the_manifest_the_operator_mounts():
    assert preflight.output_owner({"namespace": "n", "name": "j", "uid": "u"}) == {
        "namespace": "n", "name": "j", "uid": "u"}
    assert preflight.output_owner({"name": "local"}) is None


def test_create_bytes_keeps_what_is_there(tmp_path):
    store, uri = open_store(), str(tmp_path / "d" / "x.json")
    assert store.create_bytes(uri, b"first") is True
    assert store.create_bytes(uri, b"second") is False
    assert (tmp_path / "d" / "x.json").read_bytes() == b"first"
    assert os.listdir(tmp_path / "d") == ["x.json"]  # no temporary file left behind


# ---- the pod's ephemeral storage ------------------------------------------------------------

def test_a_dataset_that_cannot_fit_names_both_sizes():
    check_dataset_fits(6 * 2**30, model_bytes=2**20, limit_bytes=10 * 2**30)
    with pytest.raises(TrainerError) as caught:
        check_dataset_fits(int(12.3 * 2**30), model_bytes=100 * 2**20, limit_bytes=10 * 2**30)
    error = caught.value
    assert (error.reason, error.field) == ("InvalidData", "spec.resources.ephemeralStorage")
    assert "the dataset is 12.3 GiB" in error.message
    assert "limit is 10 GiB" in error.message
    assert "400 MiB" in error.message  # the model's copies on disk
    # The model's room alone can tip it over.
    with pytest.raises(TrainerError):
        check_dataset_fits(9 * 2**30, model_bytes=300 * 2**20, limit_bytes=10 * 2**30)


def test_the_limit_comes_from_the_environment_or_there_is_no_check():
    variable = contract.ENV_EPHEMERAL_STORAGE_LIMIT
    assert variable == "FINETUNE_EPHEMERAL_STORAGE_LIMIT_BYTES"
    assert ephemeral_storage_limit({variable: "10737418240"}) == 10 * 2**30
    assert ephemeral_storage_limit({}) is None
    assert ephemeral_storage_limit({variable: "0"}) is None
    assert dataset_size_check({"library": "Timm", "backbone": "test_efficientnet"}, {}) is None


def test_human_bytes():
    assert [human_bytes(n) for n in (5, 1536, 10 * 2**30, int(12.34 * 2**30))] == [
        "5 B", "1.5 KiB", "10 GiB", "12.3 GiB"]


# ---- end to end against the real S3 server ---------------------------------------------------

@pytest.fixture
def shapes_in_s3(aws_env, s3_bucket, tmp_path):
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]})
    data = write_three_classes(tmp_path / "shapes", train_per_class=4, val_per_class=2)
    upload_directory(data, f"s3://{s3_bucket}/shapes/", store)
    return f"s3://{s3_bucket}/shapes/"


def job_manifest(dataset_uri: str, output_uri: str, owner: dict | None) -> dict:
    document = manifest(dataset_uri, output_uri, name=(owner or {}).get("name", "local"),
                        epochs=1, baseline={"enabled": False})
    document["metadata"].update(owner or {})
    return document


def run(document: dict, tmp_path, name: str) -> tuple[int, dict, list[str]]:
    """One run as the pod runs it: exit code, termination message, log lines."""
    logged, log_path = [], tmp_path / f"{name}.termination"
    code = runtime.run_job(document, termination_log=str(log_path), metrics=TrainerMetrics(),
                           log=lambda *args: logged.append(" ".join(map(str, args))),
                           cache_dir=tmp_path / f"{name}-cache")
    return code, parse_termination_message(log_path.read_text()), logged


def test_one_output_one_job_against_s3(shapes_in_s3, s3_server, s3_bucket, tmp_path, monkeypatch):
    client, out = s3_server.client(), f"s3://{s3_bucket}/runs/shared/"
    code, said, logged = run(job_manifest(shapes_in_s3, out, JOB_A), tmp_path, "a")
    assert code == 0, said
    assert any(line.startswith(f"claimed {out}") for line in logged)
    owner_key = "runs/shared/" + OWNER_FILE
    claim = client.get_object(Bucket=s3_bucket, Key=owner_key)["Body"].read()
    assert json.loads(claim)["uid"] == JOB_A["uid"]
    report_before = client.get_object(Bucket=s3_bucket, Key="runs/shared/report.json")["ETag"]

    # Another job on the same prefix: refused before it fetches or trains anything.
    with monkeypatch.context() as patch:
        patch.setattr(train, "prepare_dataset", must_not_fetch)
        code, said, _ = run(job_manifest(shapes_in_s3, out, JOB_B), tmp_path, "b")
    assert code == int(ExitCode.OUTPUT_IN_USE) == 7
    assert (said["reason"], said["field"]) == ("OutputInUse", "spec.output.uri")
    assert "team-a/flowers (uid uid-aaaa" in said["message"] and out in said["message"]
    assert not (tmp_path / "b-cache").exists()
    assert client.get_object(Bucket=s3_bucket, Key=owner_key)["Body"].read() == claim
    assert client.get_object(Bucket=s3_bucket, Key="runs/shared/report.json")["ETag"] \
        == report_before

    # The first job again (a retry, a resume): its claim stands and it runs.
    code, said, logged = run(job_manifest(shapes_in_s3, out, JOB_A), tmp_path, "a-again")
    assert code == 0, said
    assert any("already claimed by this job" in line for line in logged)
    assert client.get_object(Bucket=s3_bucket, Key=owner_key)["Body"].read() == claim


def test_report_checksums_match_the_objects_in_s3(shapes_in_s3, s3_server, s3_bucket, tmp_path):
    client, out = s3_server.client(), f"s3://{s3_bucket}/runs/sums/"
    code, said, _ = run(job_manifest(shapes_in_s3, out, None), tmp_path, "sums")
    assert code == 0, said
    report = json.loads(client.get_object(Bucket=s3_bucket, Key="runs/sums/report.json")["Body"]
                        .read())
    sha256 = report["outputs"]["sha256"]
    assert set(sha256) == {"model.safetensors", "model.torchscript.pt", "labels.json",
                           "training.png"}
    for name, digest in sha256.items():
        body = client.get_object(Bucket=s3_bucket, Key="runs/sums/" + name)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, name


@pytest.fixture
def read_only_bucket(aws_env, tmp_path, monkeypatch):
    """A bucket of shapes on a gateway of its own, and in the environment the credentials of a
    user whom the bucket policy lets read, not write."""
    with VersityGateway(iam=True) as gateway:
        gateway.create_user("reader", "reader-secret-key")
        monkeypatch.setenv("AWS_ENDPOINT_URL", gateway.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", gateway.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", gateway.secret_key)
        admin = open_store()
        admin.client.create_bucket(Bucket="datasets")
        admin.client.put_bucket_policy(Bucket="datasets", Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": ["reader"]},
                           "Action": ["s3:GetObject", "s3:ListBucket"],
                           "Resource": ["arn:aws:s3:::datasets", "arn:aws:s3:::datasets/*"]}]}))
        upload_directory(write_three_classes(tmp_path / "shapes", train_per_class=2,
                                             val_per_class=1), "s3://datasets/shapes/", admin)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "reader")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "reader-secret-key")
        yield "datasets"


def test_credentials_that_read_but_cannot_write_fail_before_any_data(read_only_bucket, tmp_path,
                                                                     monkeypatch):
    assert open_store().list("s3://datasets/shapes/")  # the dataset is readable
    monkeypatch.setattr(train, "prepare_dataset", must_not_fetch)
    for owner in (JOB_A, None):  # the claim, and the probe object of a run without a uid
        code, said, _ = run(job_manifest("s3://datasets/shapes/", "s3://datasets/runs/x/",
                                         owner), tmp_path, "read-only")
        assert code == int(ExitCode.ACCESS_DENIED), said
        assert said["message"].startswith(
            "pre-flight check of the output s3://datasets/runs/x/ failed, nothing trained: "
            "access denied to s3://datasets/runs/x/.finetune-")
        assert "(AccessDenied: " in said["message"]
    assert not open_store().list("s3://datasets/runs/")


def test_an_output_bucket_that_does_not_exist_fails_before_any_data(shapes_in_s3, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(train, "prepare_dataset", must_not_fetch)
    for owner in (JOB_A, None):  # the claim, and the probe object of a run without a uid
        code, said, _ = run(job_manifest(shapes_in_s3, "s3://no-such-output-bucket/runs/x/",
                                         owner), tmp_path, "denied")
        assert code == int(ExitCode.ACCESS_DENIED), said
        assert said["message"].startswith("pre-flight check of the output "
                                          "s3://no-such-output-bucket/runs/x/ failed")
        assert "bucket 'no-such-output-bucket' does not exist" in said["message"]
    assert not (tmp_path / "denied-cache").exists()


def test_a_dataset_too_large_for_the_pod_fails_before_download(shapes_in_s3, s3_bucket, tmp_path,
                                                               monkeypatch):
    store = open_store()
    dataset_bytes = sum(o.size for o in store.list(shapes_in_s3))
    out = f"s3://{s3_bucket}/runs/big/"
    monkeypatch.setenv(contract.ENV_EPHEMERAL_STORAGE_LIMIT, str(dataset_bytes // 2))
    code, said, _ = run(job_manifest(shapes_in_s3, out, None), tmp_path, "big")
    assert code == int(ExitCode.INVALID_DATA), said
    assert said["field"] == "spec.resources.ephemeralStorage"
    assert f"the dataset is {human_bytes(dataset_bytes)}" in said["message"]
    assert f"limit is {human_bytes(dataset_bytes // 2)}" in said["message"]
    assert not list((tmp_path / "big-cache").rglob("*.png"))  # nothing downloaded

    monkeypatch.setenv(contract.ENV_EPHEMERAL_STORAGE_LIMIT, str(10 * 2**30))
    code, said, _ = run(job_manifest(shapes_in_s3, out, None), tmp_path, "fits")
    assert code == 0, said
