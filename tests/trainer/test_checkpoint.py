"""Checkpoints: the pointer is written after the file it names, a corrupt newest checkpoint
falls back to the previous one, another job's or another spec's checkpoints are not used, and
only `keep` older ones remain."""

from __future__ import annotations

import json
import tracemalloc

import pytest
import torch

from finetune_trainer.checkpoint import Checkpoints, job_identity
from finetune_trainer.storage import open_store

SPEC = {"dataset": {"uri": "s3://b/d/"}, "model": {"backbone": "resnet18"}, "epochs": 3,
        "seed": 0, "suspend": False}
IDENTITY = job_identity({"name": "cats", "namespace": "team"}, SPEC)


class RecordingStore:
    """The real local store, recording the order of writes."""

    def __init__(self):
        self.inner, self.writes = open_store(None), []

    def write_bytes(self, uri, data, **kwargs):
        self.writes.append(uri.rsplit("/", 1)[-1])
        self.inner.write_bytes(uri, data, **kwargs)

    def upload_file(self, path, uri, **kwargs):
        self.writes.append(uri.rsplit("/", 1)[-1])
        self.inner.upload_file(path, uri, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def save_epochs(checkpoints, epochs):
    for epoch in epochs:
        checkpoints.save({"epoch": epoch, "weights": torch.full((3,), float(epoch))}, epoch)


def test_pointer_follows_the_file_and_old_checkpoints_are_pruned(tmp_path):
    store = RecordingStore()
    checkpoints = Checkpoints(store, str(tmp_path), IDENTITY, keep=1, log=lambda *_: None)
    save_epochs(checkpoints, [1, 2, 3])
    assert store.writes == ["epoch-0001.pt", "latest.json", "epoch-0002.pt", "latest.json",
                            "epoch-0003.pt", "latest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0002.pt", "epoch-0003.pt",
                                                          "latest.json"]
    loaded = checkpoints.load_latest()
    assert loaded.epoch == 3 and torch.equal(loaded.state["weights"], torch.full((3,), 3.0))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    messages = []
    checkpoints = Checkpoints(open_store(None), str(tmp_path), IDENTITY, keep=2,
                              log=messages.append)
    save_epochs(checkpoints, [1, 2])
    (tmp_path / "epoch-0002.pt").write_bytes(b"half an upload")
    loaded = checkpoints.load_latest()
    assert loaded.epoch == 1
    assert any("epoch-0002.pt does not match its checksum" in m for m in messages)
    (tmp_path / "epoch-0001.pt").unlink()
    assert checkpoints.load_latest() is None


def test_checkpoints_of_another_job_or_spec_are_not_used(tmp_path):
    save_epochs(Checkpoints(open_store(None), str(tmp_path), IDENTITY, keep=1), [1])
    other_job = job_identity({"name": "dogs", "namespace": "team"}, SPEC)
    other_spec = job_identity({"name": "cats", "namespace": "team"}, {**SPEC, "epochs": 4})
    same_training = job_identity({"name": "cats", "namespace": "team"}, {**SPEC, "suspend": True})
    for identity in (other_job, other_spec):
        assert Checkpoints(open_store(None), str(tmp_path), identity, keep=1,
                           log=lambda *_: None).load_latest() is None
    assert same_training == IDENTITY
    assert json.loads((tmp_path / "latest.json").read_text())["identity"] == IDENTITY


@pytest.mark.s3
def test_a_checkpoint_larger_than_a_part_streams_both_ways_without_a_copy_in_memory(
        aws_env, s3_bucket):
    """Multipart up, parallel ranged GETs down, through a temporary file: Python holds at most
    the parts in flight (max_concurrency of them), never the serialized checkpoint (a BytesIO of
    it and its getvalue() held two)."""
    part = 5 * 1024 * 1024
    store = open_store({"endpoint": aws_env["AWS_ENDPOINT_URL"]}, multipart_chunk_bytes=part,
                       max_concurrency=2)
    checkpoints = Checkpoints(store, f"s3://{s3_bucket}/run/checkpoints/", IDENTITY, keep=1,
                              log=lambda *_: None)
    weights = torch.randn(6 * 1024 * 1024)  # 24 MiB: five parts
    size = weights.numel() * weights.element_size()
    checkpoints.load_latest()  # the client's first call loads botocore's models: ~15 MB
    tracemalloc.start()
    try:
        entry = checkpoints.save({"weights": weights}, 2, 17)
        _, save_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        loaded = checkpoints.load_latest()
        _, load_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert entry["bytes"] > size and entry["file"] == "epoch-0002-step-00017.pt"
    head = store.client.head_object(Bucket=s3_bucket, Key="run/checkpoints/" + entry["file"])
    assert head["ETag"].strip('"').endswith("-5")  # uploaded in parts
    assert (loaded.epoch, loaded.step) == (2, 17)
    assert torch.equal(loaded.state["weights"], weights)
    assert save_peak < 2 * part + part / 2 < size, save_peak
    assert load_peak < 2 * part + part / 2 < size, load_peak
