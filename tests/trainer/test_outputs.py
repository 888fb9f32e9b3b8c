"""Outputs: model files first, report.json last with status Succeeded; an old report.json is
removed before anything is overwritten; a model that cannot be traced is recorded, not fatal."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from finetune_trainer.preprocessing import Preprocessing
from finetune_trainer.report import write_outputs
from test_checkpoint import RecordingStore


def tiny_preprocessing(size: int) -> Preprocessing:
    return Preprocessing(input_size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5),
                         interpolation="bicubic", crop_pct=1.0, source="test")


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, images):
        if torch.jit.is_tracing():  # stands in for an architecture the tracer rejects
            raise RuntimeError("cannot trace this")
        return self.fc(images.mean((2, 3)))


def test_report_is_written_last_and_replaces_an_old_one(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"status": "Succeeded", "old": True}))
    store = RecordingStore()
    deleted = []
    original_delete = store.inner.delete
    store.inner.delete = lambda uri, **kw: (deleted.append(len(store.writes)),
                                            original_delete(uri, **kw))
    report = {"valAccuracy": 0.5, "nan": float("nan")}
    outputs = write_outputs(store, str(tmp_path), nn.Sequential(nn.Flatten(), nn.Linear(12, 2)),
                            classes=["a", "b"], preprocessing=tiny_preprocessing(2),
                            report=report)
    assert deleted == [0]  # before the first write
    assert store.writes == ["model.safetensors", "model.torchscript.pt", "labels.json",
                            "training.png", "report.json"]
    stored = json.loads((tmp_path / "report.json").read_text())
    assert stored["status"] == "Succeeded" and "old" not in stored and stored["nan"] is None
    assert stored["torchscript"]["exported"] is True
    assert outputs["reportUri"] == str(tmp_path / "report.json")
    assert stored["outputs"]["sha256"] == {
        name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
        for name in ("model.safetensors", "model.torchscript.pt", "labels.json", "training.png")}


def test_a_failed_torchscript_export_is_recorded_in_the_report(tmp_path):
    model = Untraceable()
    report = {}
    outputs = write_outputs(RecordingStore(), str(tmp_path), model, classes=["a", "b"],
                            preprocessing=tiny_preprocessing(4), report=report,
                            log=lambda *_: None)
    assert outputs["torchscriptUri"] is None and not (tmp_path / "model.torchscript.pt").exists()
    assert report["torchscript"]["exported"] is False
    assert "cannot trace this" in report["torchscript"]["error"]
