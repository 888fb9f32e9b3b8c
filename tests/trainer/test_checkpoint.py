"""Checkpoints: the pointer is written after the file it names, a corrupt newest checkpoint
falls back to the previous one, another job's or another spec's checkpoints are not used, and
only `keep` older ones remain."""

from __future__ import annotations

import json

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
