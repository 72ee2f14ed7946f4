from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.train import TrainConfig, recalibrate_batchnorm, train


class SimulatedCrash(RuntimeError):
    """Stands for a crash or a kill in the middle of a run."""


def _run(tmp_path, epochs, checkpoint=None, interrupt_after=None):
    digits = load_dataset("digits").subset(256, 100)
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    config = TrainConfig(epochs=epochs, batch_size=32, seed=3)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=3, steps_per_epoch=digits.steps_per_epoch(32))))
    if interrupt_after is not None:
        calls = {"n": 0}
        original_step = pruner.step

        def failing_step():
            calls["n"] += 1
            if calls["n"] > interrupt_after:
                raise SimulatedCrash
            original_step()

        pruner.step = failing_step
    return model, train(model, digits, config, pruner, checkpoint_path=checkpoint, progress=False)


def test_training_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    straight_model, straight = _run(tmp_path, epochs=4)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(SimulatedCrash):
        _run(tmp_path, epochs=4, checkpoint=checkpoint, interrupt_after=8 * 2 + 3)  # dies in epoch 3
    resumed_model, resumed = _run(tmp_path, epochs=4, checkpoint=checkpoint)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.accuracy == straight.accuracy
    for a, b in zip(straight_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.equal(a, b)


def test_train_config_errors():
    with pytest.raises(ValueError, match=r"epochs must be an int >= 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'adamw'\), got 'lion'"):
        TrainConfig(optimizer="lion")


def test_channels_last_trains_the_same_model_in_the_faster_layout():
    digits = load_dataset("digits").subset(64, 100)  # two steps: rounding differences grow chaotically over many
    torch.manual_seed(0)
    initial = build_model("resnet20", digits.input_shape, digits.num_classes)
    models, results = [], []
    for channels_last in (False, True):
        model = copy.deepcopy(initial)
        schedule = ScheduleConfig(warmup_epochs=0, ramp_end_epoch=1, steps_per_epoch=digits.steps_per_epoch(32))
        pruner = PDPPruner(model, PruningConfig(sparsity=0.8, schedule=schedule), example_inputs=digits.train_inputs[:2])
        results.append(train(model, digits, TrainConfig(epochs=1, batch_size=32, channels_last=channels_last), pruner, progress=False))
        models.append(model)
    convolution_weights = [p for p in models[1].parameters() if p.dim() == 4]
    assert convolution_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolution_weights)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert torch.equal(a == 0, b == 0)  # the same weights pruned
    assert results[0].accuracy == results[1].accuracy


def test_channels_last_refuses_non_image_inputs():
    digits = load_dataset("digits").subset(64, 32)
    flat = dataclasses.replace(digits, train_inputs=digits.train_inputs.flatten(1))
    model = build_model("mlp", (64,), flat.num_classes)
    with pytest.raises(ValueError, match=r"channels_last needs image inputs .*\(64, 64\); set channels_last=False"):
        train(model, flat, TrainConfig(epochs=1, channels_last=True), progress=False)


def test_batchnorm_recalibration_replaces_the_running_statistics_with_the_data_s():
    digits = load_dataset("digits").subset(200, 50)
    torch.manual_seed(0)
    model = build_model("resnet20", digits.input_shape, digits.num_classes)
    first_norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_norm.running_mean.fill_(5.0)  # stale statistics, as after a hard cut
    assert recalibrate_batchnorm(model.eval(), digits, batch_size=len(digits.train_inputs), num_batches=1)
    with torch.no_grad():
        activations = first_conv(digits.train_inputs)
    torch.testing.assert_close(first_norm.running_mean, activations.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first_norm.running_var, activations.var(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert not model.training  # left in the mode it was in
    mlp = build_model("mlp", digits.input_shape, digits.num_classes)
    before = copy.deepcopy(mlp.state_dict())
    assert not recalibrate_batchnorm(mlp, digits)
    assert all(torch.equal(before[key], value) for key, value in mlp.state_dict().items())


def test_a_model_with_dropout_resumes_to_the_same_weights(tmp_path):
    """Dropout draws from torch's global generator: the checkpoint carries its state too."""
    digits = load_dataset("digits").subset(128, 32)

    def run(checkpoint=None, crash_after=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10))
        steps = {"n": 0}

        def count(module, args, output):
            steps["n"] += 1
            if crash_after is not None and steps["n"] > crash_after:
                raise SimulatedCrash

        model[3].register_forward_hook(count)
        train(model, digits, TrainConfig(epochs=3, batch_size=32), checkpoint_path=checkpoint, progress=False)
        return model

    straight = run()
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(SimulatedCrash):
        run(checkpoint, crash_after=4 + 1 + 4 + 1 + 2)  # 4 batches and an evaluation per epoch: dies in epoch 3
    torch.manual_seed(123)  # whatever the global generator holds when the run resumes
    resumed = run(checkpoint)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
