"""The transfer-learning policy: which stages are frozen, the learning rate of each parameter
group, weight decay, and the per-step learning-rate schedule.

Stages are the model's own coarse layer grouping: timm's `group_matcher(coarse=True)` applied with
`timm.models.group_parameters` (stem, then each block stage); torchvision models, which declare no
grouping, use their top-level children in order. The new classifier head is never part of a stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import timm.models
import torch
from torch import nn

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import head_parameter_names

NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass
class ModelStages:
    stages: list[list[str]]  # parameter names per stage, from the input towards the head
    head: list[str]  # parameter names of the classifier


def model_stages(model: nn.Module) -> ModelStages:
    head = head_parameter_names(model)
    head_set = set(head)
    if hasattr(model, "group_matcher"):
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=True)).values()
    else:
        groups = _top_level_groups(model, head_set)
    stages = [[name for name in group if name not in head_set] for group in groups]
    return ModelStages(stages=[stage for stage in stages if stage], head=head)


def _top_level_groups(model: nn.Module, head: set[str]) -> list[list[str]]:
    """Top-level children in order, descending while a single child holds every backbone
    parameter (as torchvision's `features` does), so that its blocks become the stages."""
    prefix, module = "", model
    while True:
        with_params = [(name, child) for name, child in module.named_children()
                       if any(f"{prefix}{name}.{p}" not in head for p, _ in child.named_parameters())]
        if len(with_params) != 1 or not list(with_params[0][1].children()):
            break
        name, module = with_params[0]
        prefix += name + "."
    own = [prefix + name for name, _ in module.named_parameters(recurse=False)]
    groups = [[f"{prefix}{child_name}.{name}" for name, _ in child.named_parameters()]
              for child_name, child in module.named_children()]
    # Parameters outside the chosen container (a class token, say) go with the first stage.
    outside = [name for name, _ in model.named_parameters()
               if not name.startswith(prefix) and name not in head] if prefix else []
    return [outside + own + (groups[0] if groups else [])] + groups[1:]


def frozen_stage_count(freeze: Mapping, num_stages: int, epoch: int) -> int:
    """How many stages, from the input, are frozen during `epoch` (0-based)."""
    unfreeze_at = freeze.get("unfreezeAtEpoch")
    if unfreeze_at is not None and epoch >= unfreeze_at:
        return 0
    if freeze["policy"] == "AllButHead":
        return num_stages
    if freeze["policy"] == "FirstStages":
        if freeze["stages"] > num_stages:
            raise TrainerError(ExitCode.INVALID_SPEC, f"is {freeze['stages']} but the model has "
                               f"only {num_stages} stages", "spec.freeze.stages")
        return freeze["stages"]
    return 0


def apply_freeze(model: nn.Module, stages: ModelStages, frozen_count: int,
                 batch_norm: str) -> list[nn.Module]:
    """Set requires_grad for the first `frozen_count` stages off and everything else on. Returns
    the normalisation layers that must stay in eval mode while training (batchNorm: Frozen), so
    their pretrained running statistics are kept."""
    frozen = {name for stage in stages.stages[:frozen_count] for name in stage}
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name not in frozen
    frozen_norms = []
    for module_name, module in model.named_modules():
        if not isinstance(module, NORM_LAYERS):
            continue
        names = [f"{module_name}.{name}" for name, _ in module.named_parameters(recurse=False)]
        if not names or not all(name in frozen for name in names):
            continue
        if batch_norm == "Trainable":
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad = True
        else:
            frozen_norms.append(module)
    return frozen_norms


def set_train_mode(model: nn.Module, frozen_norms: list[nn.Module]) -> None:
    model.train()
    for module in frozen_norms:
        module.eval()


def parameter_groups(model: nn.Module, stages: ModelStages, optimizer: Mapping, *,
                     pretrained: bool = True) -> list[dict]:
    """Optimizer groups, each named: `head` at optimizer.learningRate; the backbone at
    learningRate * backboneLrMultiplier (one `backbone` group, or one `stageN` group per stage when
    layerDecay multiplies each stage further from the head by it). Without pretrained weights
    (FromScratch) every group learns at the head's rate. Norms, biases and the model's own
    no-weight-decay parameters get no weight decay."""
    head_lr = optimizer["learningRate"]
    backbone_lr = head_lr * (optimizer["backboneLrMultiplier"] if pretrained else 1.0)
    layer_decay = optimizer.get("layerDecay") if pretrained else None
    named = [("head", head_lr, stages.head)]
    if layer_decay is None:
        named.insert(0, ("backbone", backbone_lr, [n for stage in stages.stages for n in stage]))
    else:
        last = len(stages.stages) - 1
        named[:0] = [(f"stage{i}", backbone_lr * layer_decay ** (last - i), stage)
                     for i, stage in enumerate(stages.stages)]
    skip_decay = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    parameters = dict(model.named_parameters())
    groups = []
    for group_name, lr, names in named:
        decay, no_decay = [], []
        for name in names:
            parameter = parameters[name]
            no_wd = parameter.ndim <= 1 or name.endswith(".bias") or name in skip_decay
            (no_decay if no_wd else decay).append(parameter)
        for params, weight_decay in ((decay, optimizer["weightDecay"]), (no_decay, 0.0)):
            if params:
                groups.append({"name": group_name, "params": params, "lr": lr,
                               "weight_decay": weight_decay})
    return groups


def build_optimizer(groups: list[dict], optimizer: Mapping) -> torch.optim.Optimizer:
    if optimizer["name"] == "SGD":
        return torch.optim.SGD(groups, lr=optimizer["learningRate"], momentum=optimizer["momentum"])
    return torch.optim.AdamW(groups, lr=optimizer["learningRate"])


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Mapping, *, steps_per_epoch: int,
                    epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers, stepped once per optimizer step; each scales every group's own rate,
    so the ratios between groups hold throughout. A linear warmup over schedule.warmupEpochs
    (LinearLR) precedes Cosine (CosineAnnealingLR to 0), Step (StepLR: gamma every stepEpochs)
    or Constant; OneCycle is OneCycleLR (up from 1/25 of the peak over the warmup, 30 % of the
    steps by default, then cosine down to 1/25/10^4), which has its own warmup."""
    lr_scheduler = torch.optim.lr_scheduler
    total_steps = max(1, steps_per_epoch * epochs)
    warmup_steps = schedule["warmupEpochs"] * steps_per_epoch
    name = schedule["name"]
    if name == "OneCycle":
        return lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps, pct_start=warmup_steps / total_steps if warmup_steps else 0.3,
            anneal_strategy="cos", cycle_momentum=False, div_factor=25, final_div_factor=1e4)
    if name == "Cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    elif name == "Step":
        main = lr_scheduler.StepLR(optimizer, step_size=schedule["stepEpochs"] * steps_per_epoch,
                                   gamma=schedule["gamma"])
    else:
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0)
    if warmup_steps <= 1:
        return main
    # (step + 1) / warmup_steps during the warmup: 1/warmup_steps at the first step, 1 at its end.
    warmup = lr_scheduler.LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0,
                                   total_iters=warmup_steps - 1)
    return lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
