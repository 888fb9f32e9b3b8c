"""The input preprocessing of a backbone: input size, mean, std, interpolation and crop, from the
backbone's own pretrained configuration (timm's `pretrained_cfg`, torchvision's weights
transforms) unless spec.model.imageSize / spec.model.preprocessing override them; and the
torchvision transforms built from it with timm's `create_transform`.

Decided once per run (`resolve_preprocessing`) and recorded in report.json and the safetensors
metadata, so that inference can apply exactly what training applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("None", "Light", "Standard", "Strong")
# create_transform arguments of each training preset (timm's names). Strong's RandAugment is
# timm's standard policy string.
_TRAIN_PRESETS = {
    "Light": {"scale": (0.6, 1.0), "color_jitter": 0.0},
    "Standard": {"scale": (0.25, 1.0), "color_jitter": 0.2},
    "Strong": {"scale": (0.08, 1.0), "color_jitter": 0.0, "auto_augment": "rand-m9-mstd0.5-inc1",
               "re_prob": 0.25},
}


@dataclass(frozen=True)
class Preprocessing:
    input_size: int  # square side in pixels the network sees
    mean: tuple[float, float, float]  # of RGB in [0, 1]
    std: tuple[float, float, float]
    interpolation: str  # timm's name: "bilinear", "bicubic", "nearest"
    crop_pct: float  # evaluation: resize the short side to input_size / crop_pct, centre-crop
    source: str  # where the values came from

    def describe(self) -> dict:
        """For report.json and the safetensors metadata (camelCase, like the rest of the API)."""
        return {"inputSize": self.input_size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "cropPct": self.crop_pct,
                "resizeSize": int(round(self.input_size / self.crop_pct)), "source": self.source}


    @classmethod
    def from_record(cls, record: Mapping) -> Preprocessing:
        """Back from `describe()` (report.json, the safetensors metadata)."""
        return cls(input_size=record["inputSize"], mean=tuple(record["mean"]),
                   std=tuple(record["std"]), interpolation=record["interpolation"],
                   crop_pct=record["cropPct"], source=record["source"])


def library_defaults(library: str, backbone: str) -> tuple[dict, str]:
    """(input_size, mean, std, interpolation, crop_pct as a dict, where they came from) of the
    backbone's pretrained configuration; ImageNet's conventional values when it has none."""
    if library == "Timm":
        import timm.data
        import timm.models
        cfg = timm.models.get_pretrained_cfg(backbone)
        if cfg is not None:
            config = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
            return ({"input_size": config["input_size"][-1], "mean": tuple(config["mean"]),
                     "std": tuple(config["std"]), "interpolation": config["interpolation"],
                     "crop_pct": config["crop_pct"]}, "timm pretrained_cfg")
    else:
        import torchvision.models
        try:
            transforms = torchvision.models.get_model_weights(backbone).DEFAULT.transforms()
        except (ValueError, KeyError):
            transforms = None  # an architecture without published weights
        if transforms is not None:
            return ({"input_size": transforms.crop_size[0], "mean": tuple(transforms.mean),
                     "std": tuple(transforms.std),
                     "interpolation": transforms.interpolation.value,
                     "crop_pct": transforms.crop_size[0] / transforms.resize_size[0]},
                    "torchvision weights transforms")
    return ({"input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
             "interpolation": "bilinear", "crop_pct": 0.875}, "ImageNet defaults")


def resolve_preprocessing(model_spec: Mapping) -> Preprocessing:
    """The library's values, with spec.model.imageSize and spec.model.preprocessing on top."""
    values, source = library_defaults(model_spec["library"], model_spec["backbone"])
    overrides = dict(model_spec.get("preprocessing") or {})
    if model_spec.get("imageSize") is not None:
        overrides["imageSize"] = model_spec["imageSize"]
    for spec_name, name in (("imageSize", "input_size"), ("mean", "mean"), ("std", "std"),
                            ("interpolation", "interpolation"), ("cropPct", "crop_pct")):
        if spec_name in overrides:
            value = overrides[spec_name]
            values[name] = (tuple(value) if isinstance(value, list)
                            else value.lower() if name == "interpolation" else value)
    if overrides:
        source += f" (spec overrides {', '.join(sorted(overrides))})"
    return Preprocessing(source=source, **values)


def build_transform(augmentation: str, preprocessing: Preprocessing, *, train: bool):
    """timm's create_transform for one augmentation preset (spec.augmentation) with the model's
    preprocessing. Evaluation, and training with None: resize to input_size / crop_pct and
    centre-crop. Light: random crops of 60-100 % and flips. Standard: crops of 25-100 %, flips and
    mild colour jitter. Strong: crops of 8-100 %, flips, RandAugment and random erasing."""
    from timm.data import create_transform

    if augmentation not in AUGMENTATIONS:
        raise TrainerError(ExitCode.INVALID_SPEC, f"unknown augmentation {augmentation!r}; "
                           f"expected one of {', '.join(AUGMENTATIONS)}", "spec.augmentation")
    common = {"input_size": preprocessing.input_size, "mean": preprocessing.mean,
              "std": preprocessing.std, "interpolation": preprocessing.interpolation}
    if not train or augmentation == "None":
        return create_transform(**common, is_training=False, crop_pct=preprocessing.crop_pct)
    return create_transform(**common, is_training=True, hflip=0.5, **_TRAIN_PRESETS[augmentation])


def raw_image_transform(preprocessing: Preprocessing):
    """PIL image -> uint8 RGB tensor, resized and centre-cropped as in evaluation but not
    normalised: the input of the exported TorchScript model (report.RawImageClassifier)."""
    from timm.data import create_transform

    return create_transform(input_size=preprocessing.input_size, is_training=False,
                            interpolation=preprocessing.interpolation,
                            crop_pct=preprocessing.crop_pct, normalize=False)
