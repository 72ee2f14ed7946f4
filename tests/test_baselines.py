"""Every method of the benchmark runs two epochs on a tiny subset and reaches its structure."""

from __future__ import annotations

import warnings

import pytest
import torch

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, is_nm_sparse, model_sparsity
from pdprune.baselines import BASELINES, MethodSpec, build_baseline
from pdprune.baselines.gmp import cubic_sparsity
from pdprune.data import load_dataset
from pdprune.models import build_model
from pdprune.train import TrainConfig, evaluate, train

CASES = [("gmp", "unstructured", 0.8), ("torch_ao", "unstructured", 0.8), ("oneshot", "unstructured", 0.8),
         ("torch_pruning", "channel", 0.5), ("srste", "2:4", 0.5), ("pdp", "unstructured", 0.8), ("pdp", "2:4", 0.5), ("pdp", "channel", 0.5)]


def _method(method: str, model: torch.nn.Module, data, structure: str, sparsity: float, ramp_end_epoch: float):
    """PDP or a baseline on `model`, warm-up half an epoch, batches of 32."""
    spec = MethodSpec(sparsity, structure, warmup_epochs=0.5, ramp_end_epoch=ramp_end_epoch, steps_per_epoch=data.steps_per_epoch(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "pdp":
            schedule = ScheduleConfig(warmup_epochs=0.5, ramp_end_epoch=ramp_end_epoch, steps_per_epoch=spec.steps_per_epoch)
            return PDPPruner(model, PruningConfig(sparsity=sparsity, structure=structure, schedule=schedule), example_inputs=data.train_inputs[:2])
        return build_baseline(method, model, spec, data.train_inputs[:2])


@pytest.mark.parametrize("method,structure,sparsity", CASES)
def test_every_method_runs_two_epochs_on_a_tiny_subset(method, structure, sparsity):
    data = load_dataset("digits").subset(256, 64)
    torch.manual_seed(0)
    model = build_model("mlp", data.input_shape, data.num_classes)
    pruner = _method(method, model, data, structure, sparsity, ramp_end_epoch=1.5)
    result = train(model, data, TrainConfig(epochs=2, batch_size=32), pruner, progress=False)
    inputs, labels = data.evaluations["test"]
    assert result.accuracy["test"] == evaluate(model, inputs, labels), "the reported accuracy is the pruned model's"
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.history[1]["loss"] < result.history[0]["loss"], "the model learns while it is pruned"
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if structure == "unstructured":
        # the MLP has Linear layers only, so even torch.ao (which skips convolutions) reaches the target
        assert model_sparsity(model).sparsity == pytest.approx(sparsity, abs=0.01)
    elif structure == "2:4":
        assert all(is_nm_sparse(w, 2, 4) for w in weights)
    else:
        hidden = weights[0]
        dead = int((hidden.detach().abs().sum(dim=1) == 0).sum())
        assert dead == hidden.shape[0] // 2


def test_unknown_or_unsupported_baselines_are_refused():
    model = build_model("mlp", (1, 8, 8), 10)
    spec = MethodSpec(0.5, "channel", 1, 2, 10)
    with pytest.raises(ValueError, match=r"baseline 'gmp' handles \['unstructured'\] sparsity, not 'channel'"):
        build_baseline("gmp", model, spec, torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"unknown baseline 'lottery'; choose one of"):
        build_baseline("lottery", model, spec, torch.randn(1, 1, 8, 8))
    assert set(BASELINES) == {"gmp", "torch_ao", "oneshot", "torch_pruning", "srste", "pquant_pdp", "coreml_magnitude"}


def test_torch_ao_cannot_prune_convolutions_and_says_so_without_linear_layers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match=r"prunes only Linear layers, and this model has none"):
        build_baseline("torch_ao", model, MethodSpec(0.5, "unstructured", 0, 1, 10), torch.randn(1, 3, 8, 8))


def test_cubic_schedule():
    assert cubic_sparsity(0, 10, 20, 0.9) == 0
    assert cubic_sparsity(10, 10, 20, 0.9) == 0
    assert cubic_sparsity(15, 10, 20, 0.9) == pytest.approx(0.9 * (1 - 0.5**3))
    assert cubic_sparsity(25, 10, 20, 0.9) == 0.9


@pytest.mark.parametrize("method,structure", [("gmp", "unstructured"), ("srste", "2:4")])
def test_methods_create_their_state_on_the_model_s_device(method, structure):
    """A model already on an accelerator: every buffer a method creates must live there too. The meta
    device stands in for a GPU (mixing it with CPU tensors fails as CUDA does) for the methods whose
    setup reads no values (PDP's CUDA paths are checked on a GPU by benchmarks/gpu_checks.py)."""
    model = build_model("mlp", (1, 8, 8), 10).to("meta")
    spec = MethodSpec(0.5, structure, warmup_epochs=0, ramp_end_epoch=0, steps_per_epoch=1)
    pruner = build_baseline(method, model, spec, torch.zeros(2, 1, 8, 8, device="meta"))
    model(torch.zeros(2, 1, 8, 8, device="meta"))
    devices = {tensor.device.type for tensor in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}, devices
    assert pruner is not None


@pytest.mark.parametrize("method,structure,sparsity", [case for case in CASES if case[0] != "torch_ao"])
def test_every_convolution_method_trains_in_the_channels_last_layout(method, structure, sparsity):
    data = load_dataset("digits").subset(64, 32)
    torch.manual_seed(0)
    model = build_model("resnet20", data.input_shape, data.num_classes)
    pruner = _method(method, model, data, structure, sparsity, ramp_end_epoch=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, data, TrainConfig(epochs=1, batch_size=32, channels_last=True), pruner, progress=False)
    convolutions = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if structure == "unstructured":
        assert model_sparsity(model).sparsity == pytest.approx(sparsity, abs=0.01)
    elif structure == "2:4":
        assert sum(is_nm_sparse(w, 2, 4) for w in convolutions) == len(convolutions) - 1  # the stem has 1 input channel
    else:
        assert sum(int((w.detach().flatten(1).abs().sum(dim=1) == 0).sum()) for w in convolutions) > 0  # channels zeroed
