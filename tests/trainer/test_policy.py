"""Freeze and learning-rate policy: stages come from the model's own grouping, each parameter
group learns at the rate the spec declares, frozen parameters and frozen BatchNorm statistics do
not change while training, and the schedules have the declared shape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from finetune_api.contract import ExitCode
from finetune_api.validation import validate_spec
from finetune_trainer import policy
from finetune_trainer.errors import TrainerError
from finetune_trainer.models import build_model


def make_spec(**overrides) -> dict:
    spec = {"dataset": {"uri": "s3://bucket/data/"}, "model": {"backbone": "resnet18"},
            "output": {"uri": "s3://bucket/out/"}, "epochs": 4}
    spec.update(overrides)
    return validate_spec(spec)


def tiny(backbone="resnet18", library="Timm", classes=3):
    torch.manual_seed(0)
    return build_model({"backbone": backbone, "library": library, "weights": "None",
                        "imageSize": 32}, classes)


def test_timm_stages_follow_group_matcher_and_exclude_the_head():
    stages = policy.model_stages(tiny("efficientnet_lite0"))
    assert len(stages.stages) == 8  # stem + 7 block stages (conv_head joins the last)
    assert stages.stages[0][0] == "conv_stem.weight"
    assert all(name.startswith("blocks.6.") or name.startswith(("conv_head", "bn2"))
               for name in stages.stages[-1])
    assert stages.head == ["classifier.weight", "classifier.bias"]


def test_torchvision_stages_are_top_level_children_descending_into_features():
    resnet = policy.model_stages(tiny("resnet18", "Torchvision"))
    assert [stage[0].split(".")[0] for stage in resnet.stages] == [
        "conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert resnet.head == ["fc.weight", "fc.bias"]
    efficientnet = policy.model_stages(tiny("efficientnet_b0", "Torchvision"))
    assert [stage[0].split(".")[:2] for stage in efficientnet.stages] == [
        ["features", str(i)] for i in range(9)]
    assert efficientnet.head == ["classifier.1.weight", "classifier.1.bias"]


def test_each_group_gets_the_declared_learning_rate_and_no_decay_on_norms_and_biases():
    model = tiny()
    spec = make_spec(optimizer={"learningRate": 0.01, "backboneLrMultiplier": 0.2,
                                "weightDecay": 0.05}, schedule={"name": "Constant"})
    groups = policy.parameter_groups(model, policy.model_stages(model), spec["optimizer"])
    optimizer = policy.build_optimizer(groups, spec["optimizer"])
    assert policy.group_learning_rates(optimizer) == {"backbone": pytest.approx(0.002),
                                                      "head": 0.01}
    by_name = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, parameter in model.named_parameters():
        group = by_name[id(parameter)]
        assert group["name"] == ("head" if name.startswith("fc.") else "backbone"), name
        assert group["weight_decay"] == (0.0 if parameter.ndim <= 1 else 0.05), name
    assert len(by_name) == len(list(model.parameters()))


def test_layer_decay_multiplies_each_stage_further_from_the_head():
    model = tiny()
    spec = make_spec(optimizer={"learningRate": 0.1, "backboneLrMultiplier": 0.5,
                                "layerDecay": 0.5})
    groups = policy.parameter_groups(model, policy.model_stages(model), spec["optimizer"])
    rates = policy.group_learning_rates(policy.build_optimizer(groups, spec["optimizer"]))
    # timm's resnet grouping: stem, layer1..layer4
    assert rates == pytest.approx({"stage0": 0.05 * 0.5**4, "stage1": 0.05 * 0.5**3,
                                   "stage2": 0.05 * 0.5**2, "stage3": 0.05 * 0.5, "stage4": 0.05,
                                   "head": 0.1})


def test_from_scratch_trains_everything_at_the_head_rate():
    model = tiny()
    spec = make_spec(optimizer={"learningRate": 0.1, "layerDecay": 0.5})
    groups = policy.parameter_groups(model, policy.model_stages(model), spec["optimizer"],
                                     pretrained=False)
    assert {g["name"]: g["lr"] for g in groups} == {"backbone": 0.1, "head": 0.1}


def train_steps(model, optimizer, frozen_norms, steps=3):
    criterion = nn.CrossEntropyLoss()
    for step in range(steps):
        policy.set_train_mode(model, frozen_norms)
        images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, step % 3])
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("optimizer_name", ["AdamW", "SGD"])
def test_frozen_stages_and_their_batchnorm_statistics_do_not_change(optimizer_name):
    model = tiny()
    spec = make_spec(freeze={"policy": "FirstStages", "stages": 2, "batchNorm": "Frozen"},
                     optimizer={"name": optimizer_name, "learningRate": 0.05,
                                "weightDecay": 0.1})
    stages = policy.model_stages(model)
    frozen_names = set(stages.stages[0] + stages.stages[1])
    count = policy.frozen_stage_count(spec["freeze"], len(stages.stages), epoch=0)
    frozen_norms = policy.apply_freeze(model, stages, count, spec["freeze"]["batchNorm"])
    optimizer = policy.build_optimizer(
        policy.parameter_groups(model, stages, spec["optimizer"]), spec["optimizer"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, optimizer, frozen_norms)
    after = model.state_dict()
    for name in frozen_names:
        assert torch.equal(before[name], after[name]), name
    for stage in stages.stages[2:] + [stages.head]:
        assert any(not torch.equal(before[name], after[name]) for name in stage), stage[0]
    # stem BatchNorm (frozen stage) keeps its running statistics; layer2's (trainable) updates
    assert torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(before["layer2.0.bn1.running_mean"], after["layer2.0.bn1.running_mean"])


def test_trainable_batchnorm_updates_in_frozen_stages():
    model = tiny()
    stages = policy.model_stages(model)
    frozen_norms = policy.apply_freeze(model, stages, len(stages.stages), "Trainable")
    assert frozen_norms == []
    optimizer = policy.build_optimizer(policy.parameter_groups(
        model, stages, make_spec()["optimizer"]), make_spec()["optimizer"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, optimizer, frozen_norms)
    assert not torch.equal(before["bn1.running_mean"], model.state_dict()["bn1.running_mean"])
    assert not torch.equal(before["bn1.weight"], model.state_dict()["bn1.weight"])
    assert torch.equal(before["conv1.weight"], model.state_dict()["conv1.weight"])


def test_gradual_unfreezing():
    freeze = make_spec(freeze={"policy": "AllButHead", "unfreezeAtEpoch": 2})["freeze"]
    assert [policy.frozen_stage_count(freeze, 5, epoch) for epoch in range(4)] == [5, 5, 0, 0]


def test_more_frozen_stages_than_the_model_has_is_invalid_spec():
    freeze = make_spec(freeze={"policy": "FirstStages", "stages": 9})["freeze"]
    with pytest.raises(TrainerError) as caught:
        policy.frozen_stage_count(freeze, 5, 0)
    assert (caught.value.exit_code, caught.value.field) == (ExitCode.INVALID_SPEC,
                                                            "spec.freeze.stages")


def factors(name, warmup=0, epochs=4, steps_per_epoch=10, **extra):
    """The learning rate of a group declared at 1.0, at each of the 40 optimizer steps."""
    schedule = make_spec(schedule={"name": name, "warmupEpochs": warmup, **extra})["schedule"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = policy.build_scheduler(optimizer, schedule, steps_per_epoch=steps_per_epoch,
                                       epochs=epochs)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedule_shapes():
    cosine = factors("Cosine", warmup=1)
    assert cosine[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert cosine[10] == 1.0 and cosine[39] < 0.01
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert factors("Constant") == [1.0] * 40
    step = factors("Step", stepEpochs=1, gamma=0.5)
    assert step[0] == step[9] == 1.0 and step[10] == 0.5 and step[39] == 0.125
    one_cycle = factors("OneCycle")
    assert one_cycle[0] == pytest.approx(1 / 25) and max(one_cycle) == pytest.approx(1.0, abs=0.02)
    assert one_cycle.index(max(one_cycle)) == 11 and one_cycle[39] < 0.01


def test_scheduler_scales_every_group_keeping_their_ratio():
    model = tiny()
    spec = make_spec(schedule={"name": "Cosine", "warmupEpochs": 1})
    optimizer = policy.build_optimizer(policy.parameter_groups(
        model, policy.model_stages(model), spec["optimizer"]), spec["optimizer"])
    scheduler = policy.build_scheduler(optimizer, spec["schedule"], steps_per_epoch=5, epochs=4)
    for _ in range(7):
        optimizer.step()
        scheduler.step()
    rates = policy.group_learning_rates(optimizer)
    expected_factor = 0.5 * (1 + math.cos(math.pi * 2 / 15))
    assert rates["head"] == pytest.approx(0.001 * expected_factor)
    assert rates["backbone"] == pytest.approx(0.0001 * expected_factor)
