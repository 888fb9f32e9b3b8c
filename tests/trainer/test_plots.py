"""The picture for people: a real (tiny) training run leaves training.png next to the model,
before report.json and listed in it; the same report draws the same bytes; a linear probe (no
epochs) still gets its confusion matrix and accuracies."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from finetune_trainer import train
from finetune_trainer.plots import render_report_png
from trainer_helpers import manifest, write_three_classes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def open_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    image = Image.open(io.BytesIO(data))
    image.load()  # decodes every row: a truncated file fails here
    return image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("plots")
    shapes = write_three_classes(root / "shapes")
    lines = []
    job = manifest(str(shapes), str(root / "out"), epochs=3)
    report = train.main(job, cache_dir=root / "cache", log=lines.append)
    return root / "out", report, lines


def test_training_run_writes_its_curves_next_to_the_model(trained):
    out, report, lines = trained
    stored = json.loads((out / "report.json").read_text())
    assert stored["outputs"]["plotUri"] == str(out / "training.png")
    data = (out / "training.png").read_bytes()
    image = open_png(data)
    # Three panels (loss, accuracy, confusion matrix) at 80 dpi: wide, and not blank.
    assert image.size[0] > 2 * image.size[1] and image.size[1] >= 300
    assert 10_000 < len(data) < 300_000
    assert len(image.convert("L").getcolors(maxcolors=256)) > 20
    assert f"training curves {out / 'training.png'}" in lines
    # report.json is still the last thing written.
    assert (out / "training.png").stat().st_mtime_ns <= (out / "report.json").stat().st_mtime_ns


def test_same_report_same_picture(trained):
    out, _, _ = trained
    stored = json.loads((out / "report.json").read_text())
    assert render_report_png(stored) == render_report_png(stored)


def test_linear_probe_report_draws_what_it_has():
    report = {"strategy": "LinearProbe", "history": [{"epoch": 1, "valAccuracy": 0.8,
                                                      "seconds": 1.0}],
              "valAccuracy": 0.8, "linearProbe": {"classifier": "LogisticRegression", "C": 0.1,
                                                  "cvFolds": 3, "cvAccuracy": 0.75},
              "baseline": {"enabled": True, "accuracy": 0.5},
              "confusionMatrix": {"labels": ["a", "b"], "matrix": [[4, 1], [1, 4]]}}
    image = open_png(render_report_png(report))
    assert image.size[0] > image.size[1]  # two panels
    empty = open_png(render_report_png({"history": [], "confusionMatrix": {}}))
    assert empty.size[1] > 0
