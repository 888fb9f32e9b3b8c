"""Preprocessing comes from the backbone's own pretrained configuration (timm pretrained_cfg,
torchvision weights transforms) unless the spec overrides it, the transforms apply it, and a run
records it and exports a TorchScript model that takes raw 0-255 images."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from PIL import Image

from finetune_api.validation import SpecError, validate_spec
from finetune_trainer import train
from finetune_trainer.data import ImageDataset, Sample
from finetune_trainer.models import build_model
from finetune_trainer.preprocessing import (IMAGENET_MEAN, Preprocessing, build_transform,
                                            raw_image_transform, resolve_preprocessing)
from trainer_helpers import manifest, write_three_classes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


def model_spec(backbone, library="Timm", **extra):
    return {"backbone": backbone, "library": library, "weights": "None", **extra}


def test_timm_backbones_bring_their_own_mean_std_interpolation_and_crop():
    tf_lite = resolve_preprocessing(model_spec("tf_efficientnet_lite0"))
    assert (tf_lite.mean, tf_lite.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert (tf_lite.input_size, tf_lite.interpolation) == (224, "bicubic")
    clip = resolve_preprocessing(model_spec("vit_base_patch16_clip_224"))
    assert clip.mean == pytest.approx(CLIP_MEAN) and clip.crop_pct == pytest.approx(0.95)
    assert clip.source == "timm pretrained_cfg"
    assert resolve_preprocessing(model_spec("efficientnet_lite0")).mean == IMAGENET_MEAN


def test_torchvision_backbones_use_their_weights_transforms():
    resnet = resolve_preprocessing(model_spec("resnet18", "Torchvision"))
    assert (resnet.input_size, resnet.interpolation) == (224, "bilinear")
    assert resnet.crop_pct == pytest.approx(224 / 256)
    assert resnet.source == "torchvision weights transforms"


def test_the_spec_overrides_the_model_configuration():
    chosen = resolve_preprocessing(model_spec(
        "tf_efficientnet_lite0", imageSize=48,
        preprocessing={"mean": [0.1, 0.2, 0.3], "cropPct": 1.0, "interpolation": "Bilinear"}))
    assert (chosen.input_size, chosen.mean, chosen.std) == (48, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert (chosen.crop_pct, chosen.interpolation) == (1.0, "bilinear")
    assert chosen.source.startswith("timm pretrained_cfg (spec overrides")
    assert Preprocessing.from_record(chosen.describe()) == chosen


def test_transforms_normalise_with_the_models_statistics_and_crop_as_configured(tmp_path):
    path = tmp_path / "framed.png"
    image = Image.new("RGB", (40, 40), (200, 200, 200))
    image.paste((0, 0, 0), (0, 0, 40, 1))  # a black line along the top edge
    image.save(path)
    tf_lite = resolve_preprocessing(model_spec("tf_efficientnet_lite0", imageSize=40))
    cropped = ImageDataset([Sample(path, 0)], build_transform("None", tf_lite, train=False))[0][0]
    # Normalised with mean = std = 0.5 (not ImageNet's), and the centre crop cut the band off.
    assert cropped.shape == (3, 40, 40)
    assert torch.allclose(cropped[:, -1, :], torch.full((3, 40), (200 / 255 - 0.5) / 0.5),
                          atol=0.02)
    assert cropped[:, 0, :].min() > 0
    whole = resolve_preprocessing(model_spec("tf_efficientnet_lite0", imageSize=40,
                                             preprocessing={"cropPct": 1.0}))
    kept = ImageDataset([Sample(path, 0)], build_transform("None", whole, train=False))[0][0]
    assert kept[:, 0, :].max() < -0.9  # the band is still there: black is (0 - 0.5) / 0.5


def test_bad_preprocessing_names_the_field():
    spec = {"dataset": {"uri": "s3://datasets/x/"}, "output": {"uri": "s3://models/x/"},
            "model": {"backbone": "resnet18", "preprocessing": {"std": [0.2, 0.0, 0.2]}}}
    with pytest.raises(SpecError) as caught:
        validate_spec(spec)
    assert caught.value.problems[0].startswith("spec.model.preprocessing.std.1")
    spec["model"]["preprocessing"] = {"mean": [0.5, 0.5]}
    with pytest.raises(SpecError) as caught:
        validate_spec(spec)
    assert caught.value.problems[0].startswith("spec.model.preprocessing.mean")


def test_a_run_records_the_models_preprocessing_and_exports_for_raw_images(tmp_path):
    """tf_efficientnet_lite0 is pretrained with mean = std = 0.5: the report, the safetensors
    metadata and the TorchScript export all carry that, not ImageNet's statistics."""
    shapes = write_three_classes(tmp_path / "shapes", train_per_class=4, val_per_class=2)
    spec_model = model_spec("tf_efficientnet_lite0", imageSize=32)
    job = manifest(str(shapes), str(tmp_path / "out"), model=spec_model, epochs=1,
                   baseline={"enabled": False})
    report = train.main(job, cache_dir=tmp_path / "cache", log=lambda *_: None)
    recorded = report["preprocessing"]
    assert recorded["mean"] == [0.5, 0.5, 0.5] and recorded["inputSize"] == 32
    out = tmp_path / "out"
    metadata = safetensors.safe_open(str(out / "model.safetensors"), "pt").metadata()
    assert json.loads(metadata["preprocessing"]) == recorded

    model = build_model({**spec_model, "library": "Timm"}, 3, load_weights=False)
    model.load_state_dict(safetensors.torch.load_file(str(out / "model.safetensors")))
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    preprocessing = Preprocessing.from_record(recorded)
    sample = [Sample(next((shapes / "train" / "circle").iterdir()), 0)]
    raw = ImageDataset(sample, raw_image_transform(preprocessing))[0][0]
    normalised = ImageDataset(sample, build_transform("None", preprocessing, train=False))[0][0]
    with torch.no_grad():
        assert torch.allclose(scripted(raw[None]), model.eval()(normalised[None]), atol=1e-4)
