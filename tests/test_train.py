from __future__ import annotations

import pytest


class SimulatedCrash(RuntimeError):
    """Stands for a crash or a kill in the middle of a run."""
import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.train import TrainConfig, train


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
