"""The job's outputs under spec.output.uri, and the rule that makes them safe to read:

    model.safetensors, model.torchscript.pt, labels.json   written first (the TorchScript model
                                                           takes 0-255 RGB; both record the
                                                           preprocessing)
    training.png                                           curves and confusion matrix (plots.py)
    report.json                                            written last, "status": "Succeeded"

A reader treats the outputs as complete only when report.json exists with status Succeeded. A
re-run deletes the old report.json before it overwrites anything, so an old marker never vouches
for new, half-written files. report.json's outputs.sha256 holds the SHA-256 of each file it
vouches for, computed from the bytes uploaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from finetune_trainer.plots import render_report_png
from finetune_trainer.preprocessing import Preprocessing
from finetune_trainer.storage import join_uri, sha256_file

MODEL_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.torchscript.pt"
LABELS_FILE = "labels.json"
REPORT_FILE = "report.json"
PLOT_FILE = "training.png"


def classification_summary(targets: np.ndarray, predictions: np.ndarray,
                           classes: list[str]) -> dict:
    """Per-class accuracy (recall) and the confusion matrix (rows: true class, columns:
    predicted)."""
    matrix = confusion_matrix(targets, predictions, labels=list(range(len(classes))))
    per_class = {}
    for index, name in enumerate(classes):
        total = int(matrix[index].sum())
        per_class[name] = float(matrix[index, index] / total) if total else None
    return {"perClassAccuracy": per_class,
            "confusionMatrix": {"labels": classes, "matrix": matrix.tolist()}}


class RawImageClassifier(nn.Module):
    """The exported network's interface: RGB images as 0-255 values (uint8 or float), N x 3 x
    inputSize x inputSize, already resized and cropped as report.json's `preprocessing` says;
    the scaling to [0, 1] and the model's mean and std happen inside."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("scale", 1 / (255 * torch.tensor(std).view(1, 3, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images.float() - self.shift) * self.scale)


def torchscript_bytes(model: nn.Module, preprocessing: Preprocessing) -> bytes:
    """Traced rather than scripted: tracing works for far more timm and torchvision models."""
    raw = RawImageClassifier(model, preprocessing.mean, preprocessing.std).eval()
    example = torch.zeros(1, 3, preprocessing.input_size, preprocessing.input_size)
    # TorchScript is deprecated in favour of torch.export, but it is still what serving stacks
    # (TorchServe, Triton's PyTorch backend) load.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(raw, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def write_outputs(store, output_uri: str, model: nn.Module, *, classes: list[str],
                  preprocessing: Preprocessing, report: dict, log=print) -> dict:
    """Upload the model files, then report.json (the completion marker). Returns the URIs and
    fills report["outputs"] and report["torchscript"]."""
    report_uri = join_uri(output_uri, REPORT_FILE)
    if store.exists(report_uri):
        store.delete(report_uri)
    model = model.eval().cpu().to(memory_format=torch.contiguous_format).float()
    # clone(): safetensors refuses tensors that share memory (tied weights).
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    metadata = {"classes": json.dumps(classes), "imageSize": str(preprocessing.input_size),
                "preprocessing": json.dumps(preprocessing.describe())}
    sha256 = {}  # file name -> hex digest, of every file report.json vouches for

    def put(name: str, data: bytes) -> str:
        uri = join_uri(output_uri, name)
        store.write_bytes(uri, data)
        sha256[name] = hashlib.sha256(data).hexdigest()
        return uri

    model_uri = join_uri(output_uri, MODEL_FILE)
    with tempfile.TemporaryDirectory(prefix="model-") as scratch:  # streamed, not held twice
        model_path = Path(scratch) / MODEL_FILE
        safetensors.torch.save_file(state, model_path, metadata=metadata)
        store.upload_file(model_path, model_uri)
        sha256[MODEL_FILE] = sha256_file(model_path)
    outputs = {"modelUri": model_uri, "labelsUri": join_uri(output_uri, LABELS_FILE),
               "reportUri": report_uri, "torchscriptUri": None, "sha256": sha256}
    try:
        scripted = torchscript_bytes(model, preprocessing)
    except Exception as error:  # noqa: BLE001 - some architectures do not trace; not fatal
        report["torchscript"] = {"exported": False,
                                 "error": f"{type(error).__name__}: {error}"[:500]}
        log(f"TorchScript export failed, recorded in the report: {type(error).__name__}")
    else:
        outputs["torchscriptUri"] = put(TORCHSCRIPT_FILE, scripted)
        report["torchscript"] = {"exported": True, "method": "torch.jit.trace",
                                 "input": "RGB 0-255, N x 3 x inputSize x inputSize, resized and "
                                          "cropped as in `preprocessing`"}
    put(LABELS_FILE, json.dumps(classes, indent=1).encode())
    report["outputs"] = outputs
    try:  # a picture is not worth a finished training run
        outputs["plotUri"] = put(PLOT_FILE, render_report_png(_plain(report)))
        log(f"training curves {outputs['plotUri']}")
    except Exception as error:  # noqa: BLE001
        outputs["plotUri"] = None
        log(f"training curves not drawn: {type(error).__name__}: {error}")
    report["status"] = "Succeeded"
    store.write_bytes(report_uri, json.dumps(_plain(report), indent=1).encode())
    return outputs


def _plain(value):
    """JSON-safe: numpy scalars and arrays to Python numbers and lists, NaN to null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN
    return value
