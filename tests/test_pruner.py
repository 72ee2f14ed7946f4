from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, load_checkpoint, save_checkpoint
from pdprune.masks import pruned_count
from pdprune.parametrizations import ChannelMask, SoftMask

IMMEDIATE = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)


def _train_steps(model, pruner, optimizer, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=generator)
        y = torch.randint(0, 4, (8,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


def test_attaches_parametrizations_and_computes_dense_during_warmup(tiny_convnet):
    x = torch.randn(2, 3, 6, 6)
    dense_output = tiny_convnet(x)
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.8))
    assert pruner.tensor_names == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert all(parametrize.is_parametrized(m, "weight") for m in (tiny_convnet.conv1, tiny_convnet.conv2, tiny_convnet.fc))
    assert not parametrize.is_parametrized(tiny_convnet.bn1)
    torch.testing.assert_close(tiny_convnet(x), dense_output)
    assert len(list(tiny_convnet.parameters())) == 8, "no extra trainable parameters"


def test_soft_mask_applies_after_warmup_and_gradients_reach_the_dense_weights(tiny_convnet):
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.8, schedule=IMMEDIATE))
    assert pruner.current_sparsity("fc.weight") > 0
    original = tiny_convnet.fc.parametrizations.weight.original
    effective = tiny_convnet.fc.weight
    below_half = float((effective.abs() < 0.5 * original.abs()).float().mean())
    assert below_half == pytest.approx(pruner.current_sparsity("fc.weight"), abs=1.5 / original.numel())
    tiny_convnet(torch.randn(2, 3, 6, 6)).sum().backward()
    assert original.grad is not None and bool((original.grad != 0).any())


@pytest.mark.parametrize("structure", ["unstructured", "2:4"])
def test_straight_through_gives_pruned_weights_a_gradient_without_changing_the_forward(tiny_convnet, structure):
    x = torch.randn(4, 3, 6, 6)
    gradients, outputs = {}, {}
    for through in (False, True):
        model = copy.deepcopy(tiny_convnet)
        config = PruningConfig(sparsity=0.5, structure=structure, temperature=1e-6, straight_through=through, schedule=IMMEDIATE)
        pruner = PDPPruner(model, config, example_inputs=x)
        outputs[through] = model(x)
        outputs[through].square().sum().backward()
        gradients[through] = model.conv2.parametrizations.weight.original.grad
        assert ("straight-through" in repr(model)) == through
    torch.testing.assert_close(outputs[True], outputs[False])
    dropped = pruner.finalized_state_dict()["conv2.weight"] == 0
    assert bool(dropped.any())
    assert float(gradients[False][dropped].abs().max()) < 1e-6 * float(gradients[False].abs().max())
    assert float(gradients[True][dropped].abs().max()) > 1e-2 * float(gradients[True].abs().max())


def _expected_finalized(model: nn.Module, pruner: PDPPruner) -> dict[str, torch.Tensor]:
    """What `finalize()` must leave, from the attached model alone: the weights the network computes
    with (w * m(w)) where |w| is among the largest of its tensor (the exact count for its budget), 0 elsewhere."""
    expected = {}
    for layer in pruner.report().layers:
        module = model.get_submodule(layer.name.removesuffix(".weight"))
        original, effective = module.parametrizations.weight.original.detach(), module.weight.detach()
        kept = torch.zeros(original.numel(), dtype=torch.bool)
        kept[original.abs().flatten().topk(original.numel() - pruned_count(layer.target, original.numel())).indices] = True
        expected[layer.name] = torch.where(kept.reshape(original.shape), effective, torch.zeros_like(effective))
    return expected


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_finalize_hits_the_exact_count_and_loads_into_the_plain_model(tiny_convnet, allocation):
    from tests.conftest import TinyConvNet

    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.75, allocation=allocation, schedule=IMMEDIATE))
    _train_steps(tiny_convnet, pruner, torch.optim.SGD(tiny_convnet.parameters(), lr=0.05), 5)
    expected = _expected_finalized(tiny_convnet, pruner)
    x = torch.randn(3, 3, 6, 6)
    model = pruner.finalize()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert list(model.state_dict()) == list(TinyConvNet().state_dict()), "the keys in the plain model's order (weight, then bias)"
    total_zeros, total = 0, 0
    for name in pruner.tensor_names:
        weight = model.get_submodule(name.removesuffix(".weight")).weight
        budget = pruner.budgets[name]
        if allocation == "uniform":
            assert budget == 0.75
        assert int((weight == 0).sum()) == pruned_count(budget, weight.numel())
        assert torch.equal(weight != 0, expected[name] != 0), f"{name}: the largest magnitudes are kept"
        torch.testing.assert_close(weight.detach(), expected[name], rtol=1e-6, atol=1e-7, msg=f"{name}: kept weights are w * m(w)")
        total_zeros += int((weight == 0).sum())
        total += weight.numel()
    assert abs(total_zeros - pruned_count(0.75, total)) <= len(pruner.tensor_names)
    report = pruner.report()
    assert report.sparsity == pytest.approx(total_zeros / total)
    # The plain architecture, given the expected weights and the model's other tensors, computes the same.
    reference = TinyConvNet()
    reference.load_state_dict({**model.state_dict(), **expected})
    model.eval(), reference.eval()
    torch.testing.assert_close(reference(x), model(x), rtol=1e-5, atol=1e-6)


def test_finalize_keeps_exactly_the_weights_whose_soft_mask_is_at_least_half(tiny_mlp):
    pruner = PDPPruner(tiny_mlp, PruningConfig(sparsity=0.6, allocation="uniform", schedule=IMMEDIATE))
    soft = {name: tiny_mlp.get_submodule(name[:-7]).parametrizations.weight[0] for name in pruner.tensor_names}
    originals = {name: tiny_mlp.get_submodule(name[:-7]).parametrizations.weight.original.detach().clone() for name in pruner.tensor_names}
    expected = {name: soft[name].soft_mask(originals[name], 0.6) >= 0.5 for name in pruner.tensor_names}
    pruner.finalize()
    for name in pruner.tensor_names:
        assert torch.equal(tiny_mlp.get_submodule(name[:-7]).weight != 0, expected[name])


def test_resume_mid_training_is_bit_exact(tiny_convnet, tmp_path):
    config = PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=3, ramp_end_epoch=8))
    straight_model = copy.deepcopy(tiny_convnet)
    straight_pruner = PDPPruner(straight_model, config)
    straight_optimizer = torch.optim.SGD(straight_model.parameters(), lr=0.05, momentum=0.9)
    _train_steps(straight_model, straight_pruner, straight_optimizer, 5, seed=1)
    _train_steps(straight_model, straight_pruner, straight_optimizer, 5, seed=2)

    model = copy.deepcopy(tiny_convnet)
    pruner = PDPPruner(model, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _train_steps(model, pruner, optimizer, 5, seed=1)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "pruner": pruner.state_dict()})

    torch.manual_seed(123)
    from tests.conftest import TinyConvNet

    resumed_model = TinyConvNet()
    resumed_pruner = PDPPruner(resumed_model, config)
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    state = load_checkpoint(tmp_path / "ckpt.pt")
    resumed_model.load_state_dict(state["model"])
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_pruner.load_state_dict(state["pruner"])
    _train_steps(resumed_model, resumed_pruner, resumed_optimizer, 5, seed=2)

    for (name, a), (_, b) in zip(straight_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, name
    for name in straight_pruner.tensor_names:
        module = name.removesuffix(".weight")
        assert torch.equal(straight_model.get_submodule(module).weight, resumed_model.get_submodule(module).weight)
    assert straight_pruner.state_dict() == resumed_pruner.state_dict()


def test_model_state_dict_alone_carries_the_current_sparsity(tiny_convnet):
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    state = tiny_convnet.state_dict()
    assert float(state["fc.parametrizations.weight.0.current_sparsity"]) == pruner.current_sparsity("fc.weight")
    assert all(isinstance(value, torch.Tensor) for value in state.values()), "tensors only: safetensors can save it"
    from tests.conftest import TinyConvNet

    other = TinyConvNet()
    PDPPruner(other, PruningConfig(sparsity=0.5))  # still in warm-up: sparsity 0
    other.load_state_dict(state)
    x = torch.randn(2, 3, 6, 6)
    tiny_convnet.eval(), other.eval()
    torch.testing.assert_close(other(x), tiny_convnet(x))


def test_state_dict_is_weights_only_safe(tiny_convnet, tmp_path):
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    torch.save(pruner.state_dict(), tmp_path / "p.pt")
    assert torch.load(tmp_path / "p.pt", weights_only=True) == pruner.state_dict()


def test_detach_restores_the_dense_weights(tiny_convnet):
    before = {k: v.clone() for k, v in tiny_convnet.state_dict().items()}
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.9, schedule=IMMEDIATE))
    pruner.detach()
    after = tiny_convnet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_saving_the_whole_model_gets_pytorch_s_advice_while_masked_and_works_once_finalized(tiny_convnet, tmp_path):
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    with pytest.raises(RuntimeError, match=r"Serialization of parametrized modules is only supported through state_dict\(\)"):
        torch.save(tiny_convnet, tmp_path / "model.pt")
    pruner.finalize()
    torch.save(tiny_convnet, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(loaded(x), tiny_convnet.eval()(x))


def test_include_exclude_and_embedding(tiny_convnet):
    pruner = PDPPruner(tiny_convnet, PruningConfig(include=("conv*",), exclude=("conv1",)))
    assert pruner.tensor_names == ["conv2.weight"]
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    pruner = PDPPruner(model, PruningConfig(module_types=("Embedding", "Linear")))
    assert pruner.tensor_names == ["0.weight", "1.weight"]


def test_report_lists_every_tensor_with_target_and_current(tiny_convnet):
    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.5, allocation="uniform", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=0.5)))
    report = pruner.report()
    assert [layer.name for layer in report.layers] == pruner.tensor_names
    assert report.target == pytest.approx(0.5)
    assert all(layer.current == pytest.approx(0.25) for layer in report.layers)
    table = report.table()
    assert "conv2.weight" in table and "50.00%" in table and "total" in table
    assert report.to_dict()["layers"][0]["target"] == 0.5


def test_finalize_before_the_ramp_ends_warns():
    model = nn.Linear(10, 10)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=0.5)))
    with pytest.warns(UserWarning, match=r"finalize\(\) at 50% of the ramp"):
        pruner.finalize()
    assert int((model.weight == 0).sum()) == 50


# --- Bad input: specific errors, nothing half-modified -------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"sparsity": 1.2}, ValueError, r"sparsity must be in \[0, 1\), got 1.2; pass a fraction, e.g. 0.9"),
        ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\), got -0.1"),
        ({"sparsity": math.nan}, ValueError, r"sparsity must be a finite number, got nan"),
        ({"sparsity": "0.9"}, TypeError, r"sparsity must be a number, got str '0.9'"),
        ({"sparsity": True}, TypeError, r"sparsity must be a number, got bool True"),
        ({"temperature": True}, TypeError, r"temperature must be a number, got bool True"),
        ({"compile_kernels": "no"}, TypeError, r"compile_kernels must be True or False, got 'no'"),
        ({"schedule": {"warmup_epochs": 1}}, TypeError, r"schedule must be a ScheduleConfig, got dict .*pass schedule=ScheduleConfig"),
        ({"module_types": ("Linear", 3)}, TypeError, r"module_types must be a tuple of strings, got \('Linear', 3\)"),
        ({"sparsity": 1.0}, ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"temperature": 0.0}, ValueError, r"temperature must be a finite number > 0, got 0.0"),
        ({"temperature": -1e-4}, ValueError, r"temperature must be a finite number > 0"),
        ({"temperature_mode": "cold"}, ValueError, r"temperature_mode must be one of \('relative', 'absolute'\), got 'cold'"),
        ({"allocation": "greedy"}, ValueError, r"allocation must be one of \('global', 'uniform', 'lamp'\), got 'greedy'"),
        ({"structure": "4:2"}, ValueError, r"structure '4:2' needs 0 < N < M"),
        ({"structure": "blocks"}, ValueError, r"structure must be 'unstructured', 'channel' or 'N:M'"),
        ({"layer_structures": {"fc": "3:3"}}, ValueError, r"layer_structures\['fc'\]: structure '3:3' needs 0 < N < M"),
        ({"on_incompatible": "ignore"}, ValueError, r"on_incompatible must be one of \('skip', 'error'\), got 'ignore'"),
        ({"module_types": ("LSTM",)}, ValueError, r"module_types must name some of"),
        ({"straight_through": "yes"}, TypeError, r"straight_through must be True or False, got 'yes'"),
        ({"straight_through": True, "layer_structures": {"conv*": "channel"}}, ValueError,
         r"straight_through applies to unstructured and N:M masks, not to 'channel'"),
        ({"include": "fc"}, TypeError, r"include must be a tuple of strings, got the string 'fc'; wrap it"),
        ({"layer_structures": {0: "2:4"}}, TypeError, r"layer_structures keys must be fnmatch patterns of module names \(strings\), "
                                                      r"got int 0; e.g. \{'0': '2:4'\}"),
    ],
)
def test_config_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        PruningConfig(**kwargs)


def test_numpy_numbers_are_numbers():
    import numpy as np

    config = PruningConfig(sparsity=np.float32(0.9), temperature=np.float64(0.05), schedule=ScheduleConfig(warmup_epochs=np.int64(1), steps_per_epoch=np.int64(4)))
    assert config.sparsity == pytest.approx(0.9) and type(config.sparsity) is float
    assert type(config.schedule.warmup_epochs) is float and type(config.schedule.steps_per_epoch) is int


def test_model_without_prunable_layers_is_refused():
    with pytest.raises(ValueError, match=r"no prunable layer selected: the model has no module of types"):
        PDPPruner(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


def test_pattern_matching_nothing_is_refused_and_nothing_is_attached(tiny_convnet):
    with pytest.raises(ValueError, match=r"pattern 'layer9\*' matches no module .*module names look like \['conv1'"):
        PDPPruner(tiny_convnet, PruningConfig(exclude=("layer9*",)))
    assert not any(parametrize.is_parametrized(m) for m in tiny_convnet.modules())


def test_nan_weight_is_named_and_nothing_is_attached(tiny_convnet):
    with torch.no_grad():
        tiny_convnet.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"weight 'conv2.weight' holds NaN or Inf"):
        PDPPruner(tiny_convnet)
    assert not any(parametrize.is_parametrized(m) for m in tiny_convnet.modules())


def test_nan_appearing_during_training_is_named_at_finalize_and_the_model_stays_attached(tiny_convnet):
    pruner = PDPPruner(tiny_convnet, PruningConfig(schedule=IMMEDIATE))
    with torch.no_grad():
        tiny_convnet.fc.parametrizations.weight.original[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"weight 'fc.weight' holds NaN or Inf"):
        pruner.finalize()
    assert all(parametrize.is_parametrized(m, "weight") for m in (tiny_convnet.conv1, tiny_convnet.conv2, tiny_convnet.fc))


def test_attaching_twice_is_refused(tiny_convnet):
    PDPPruner(tiny_convnet)
    with pytest.raises(RuntimeError, match=r"a PDP mask is already attached to 'conv1'"):
        PDPPruner(tiny_convnet)


@pytest.mark.parametrize("action", ["step", "finalize", "detach"])
def test_using_the_pruner_after_finalize_is_refused(tiny_convnet, action):
    pruner = PDPPruner(tiny_convnet, PruningConfig(schedule=IMMEDIATE))
    pruner.finalize()
    with pytest.raises(RuntimeError, match=rf"{action}\(\) after finalize\(\)/detach\(\)"):
        getattr(pruner, action)()


def test_loading_state_from_another_model_is_refused(tiny_convnet, tiny_mlp):
    state = PDPPruner(tiny_mlp).state_dict()
    pruner = PDPPruner(tiny_convnet)
    with pytest.raises(ValueError, match=r"saved for a different model: tensors missing here \['0.weight'"):
        pruner.load_state_dict(state)
    assert pruner.schedule.steps_done == 0


def test_loading_state_with_another_config_is_refused(tiny_convnet):
    from tests.conftest import TinyConvNet

    state = PDPPruner(TinyConvNet(), PruningConfig(sparsity=0.5)).state_dict()
    with pytest.raises(ValueError, match=r"different config \(sparsity: 0.5 saved, 0.9 here\)"):
        PDPPruner(tiny_convnet, PruningConfig(sparsity=0.9)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"different config \(schedule.ramp_end_epoch: None saved, 3.0 here\)"):
        PDPPruner(TinyConvNet(), PruningConfig(sparsity=0.5, schedule=ScheduleConfig(ramp_end_epoch=3))).load_state_dict(state)


def test_nm_on_an_incompatible_layer_is_refused_and_nothing_attached(tiny_convnet):
    with pytest.raises(ValueError, match=r"2:4 needs the input dimension of 'conv1.weight' \(dimension 1 of shape \(8, 3, 3, 3\)\) to be a multiple of 4; exclude it"):
        PDPPruner(tiny_convnet, PruningConfig(structure="2:4", on_incompatible="error"))
    assert not any(parametrize.is_parametrized(m) for m in tiny_convnet.modules())


def test_finalized_state_dict_is_what_finalize_leaves_without_touching_the_model(tiny_convnet):
    from tests.conftest import TinyConvNet

    pruner = PDPPruner(tiny_convnet, PruningConfig(sparsity=0.7, schedule=IMMEDIATE))
    _train_steps(tiny_convnet, pruner, torch.optim.SGD(tiny_convnet.parameters(), lr=0.05), 3)
    before = {key: value.clone() for key, value in tiny_convnet.state_dict().items()}
    expected = _expected_finalized(tiny_convnet, pruner)
    state = pruner.finalized_state_dict()
    assert parametrize.is_parametrized(tiny_convnet.conv1), "the model is untouched"
    assert all(torch.equal(before[key], value) for key, value in tiny_convnet.state_dict().items())
    plain = TinyConvNet()
    plain.load_state_dict(state)
    for name, weight in expected.items():
        torch.testing.assert_close(state[name], weight, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(state[name] != 0, weight != 0), name
    pruner.finalize()
    assert state.keys() == tiny_convnet.state_dict().keys()
    for key, value in tiny_convnet.state_dict().items():
        assert torch.equal(state[key], value), key
        if key in expected:
            torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)


class _Aliased(nn.Module):
    """One Linear held under two names and run twice."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.again = self.first
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.again(torch.relu(self.first(x)))))


def test_finalized_state_dict_of_a_module_held_under_two_names_loads_into_the_plain_model():
    torch.manual_seed(0)
    model = _Aliased()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    state = pruner.finalized_state_dict()
    _Aliased().load_state_dict(state)
    pruner.finalize()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_tied_weights_share_one_mask_count_once_and_stay_tied(tmp_path):
    class TiedLanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(50, 16)
            self.hidden = nn.Linear(16, 16)
            self.output = nn.Linear(16, 50, bias=False)
            self.output.weight = self.embedding.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.output(torch.relu(self.hidden(self.embedding(ids))))

    model = TiedLanguageModel()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, allocation="uniform", schedule=IMMEDIATE))
    assert list(pruner.units) == ["hidden.weight", "output.weight"], "the shared weight is one unit"
    assert torch.equal(model.embedding.weight, model.output.weight), "both modules compute with the same masked weight"
    assert pruner.report().parameters == 16 * 16 + 50 * 16
    ids = torch.randint(0, 50, (4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        nn.functional.cross_entropy(model(ids).reshape(-1, 50), ids.reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    pruner.finalize()
    assert model.embedding.weight is model.output.weight
    assert int((model.output.weight == 0).sum()) == 400
    with pytest.raises(ValueError, match=r"'output' shares its weight with \['embedding'\]; tied weights cannot be channel-pruned"):
        PDPPruner(TiedLanguageModel(), PruningConfig(structure="channel", include=("output",)), example_inputs=ids)
    untouched = TiedLanguageModel()
    with pytest.raises(ValueError, match=r"\['embedding', 'output'\] share one weight but ask for different structures"):
        PDPPruner(untouched, PruningConfig(module_types=("Linear", "Embedding"), layer_structures={"output": "2:4"}))
    assert not any(parametrize.is_parametrized(module) for module in untouched.modules())


def test_a_module_reused_under_two_names_is_masked_once():
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.again = self.first  # one layer applied twice (ALBERT-style sharing)
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.again(torch.relu(self.first(x)))))

    model = Reused()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, allocation="uniform", schedule=IMMEDIATE))
    assert len(model.first.parametrizations.weight) == 1, "one mask, not one per name"
    unit = pruner.units["first.weight"]
    torch.testing.assert_close(model.first.weight, unit.soft(model.first.parametrizations.weight.original, 0.5))
    model(torch.randn(3, 8)).sum().backward()
    pruner.finalize()
    assert int((model.first.weight == 0).sum()) == 32


class _LoraLinear(nn.Module):
    """PEFT's LoRA layer, as it holds its parts: the frozen `base_layer` and the adapters `lora_A`, `lora_B`."""

    def __init__(self, inputs: int, outputs: int, rank: int = 2) -> None:
        super().__init__()
        self.base_layer = nn.Linear(inputs, outputs).requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(inputs, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, outputs, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


def test_lora_adapters_stay_dense_and_the_merge_that_undoes_pruning_is_warned_about():
    model = nn.Sequential(_LoraLinear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.warns(UserWarning, match=r"LoRA adapters.*merging them \(merge_and_unload\).*undoes the pruning"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    assert sorted(pruner.units) == ["0.base_layer.weight", "2.weight"]
    assert {"0.lora_A.default", "0.lora_B.default"} <= set(pruner.report().skipped)
    assert "a LoRA adapter" in pruner.report().skipped["0.lora_B.default"]
    pruner.finalize()
    assert bool((model[0].base_layer.weight == 0).any()) and not bool((model[0].lora_A["default"].weight == 0).any())


def test_a_refused_lora_model_gets_the_refusal_alone():
    """The merge warning is for a pruner that exists: a model refused later hears only why it was refused."""
    model = nn.Sequential(_LoraLinear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no prunable layer selected"):
            PDPPruner(model, PruningConfig(sparsity=0.5, exclude=("*",)))
        with pytest.raises(ValueError, match="nothing left to prune"):  # refused later, when the masks are built
            PDPPruner(nn.Sequential(_LoraLinear(6, 6), nn.Linear(6, 2)), PruningConfig(structure="2:4"))


class _SelfAttention(nn.Module):
    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.num_heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (p(x).unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def test_heads_behind_lora_layers_stay_dense_and_say_why():
    model = nn.Sequential(_SelfAttention(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    example = torch.randn(2, 5, 16)
    assert set(PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=example).units) >= {"0 heads"}
    model = nn.Sequential(_SelfAttention(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))
    model[0].q_proj, model[0].v_proj = _LoraLinear(16, 16), _LoraLinear(16, 16)
    with pytest.warns(UserWarning, match="LoRA"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=example)
    assert "0 heads" not in pruner.units and "1" in pruner.units
    assert "its projections ['q_proj', 'v_proj'] are LoRA layers" in pruner.report().skipped["0 heads"]


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "channel"])
@pytest.mark.parametrize("half_after_attaching", [False, True])
@pytest.mark.filterwarnings("ignore:channel groups left dense", "ignore:the hard mask removes")
def test_float16_weights_get_the_masks_of_their_float32_values(structure, half_after_attaching):
    """float16 holds neither 1/tau above 65504 nor small squares precisely: its masks compute in float32,
    so that small weights (a threshold t near 0.002 here: 1/tau near 7e6) get the configured mask, not a soft one."""
    def model_in(dtype: torch.dtype) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        with torch.no_grad():
            model[0].weight.mul_(0.02)
        return model.to(dtype)

    config = PruningConfig(sparsity=0.7 if structure != "2:4" else 0.5, structure=structure, schedule=IMMEDIATE)
    reference = model_in(torch.float32).half().float()  # the same float16 values, masked in float32
    reference_pruner = PDPPruner(reference, config, example_inputs=torch.randn(2, 64))
    reference_pruner.step()
    model = model_in(torch.float32 if half_after_attaching else torch.float16)
    pruner = PDPPruner(model, config, example_inputs=torch.randn(2, 64, dtype=model[0].weight.dtype))
    model.half()
    pruner.step()
    model.half()  # again, on a float16 model (Hugging Face's .to(float16)): the masks keep their float32 state
    model.float().half()  # and through float32: the sparsity stays float64, the masks float32
    assert all(buffer.dtype == torch.float64 for name, buffer in model.named_buffers() if name.endswith("current_sparsity"))
    assert model[0].weight.dtype == torch.float16
    torch.testing.assert_close(model[0].weight.float(), reference[0].weight.detach(), atol=1e-4, rtol=2e-3)
    saved: list[tuple[torch.dtype, int]] = []  # for the backward: float32 copies of the weight are computed again, not kept
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append((tensor.dtype, tensor.numel())) or tensor, lambda tensor: tensor):
        output = model(torch.randn(2, 64, dtype=torch.float16))
    assert saved and not any(dtype == torch.float32 and size >= 64 * 64 for dtype, size in saved)
    output.sum().backward()
    gradient = model[0].parametrizations.weight.original.grad
    assert gradient.dtype == torch.float16 and bool(gradient.isfinite().all())
    pruner.finalize()
    reference_pruner.finalize()
    assert model[0].weight.dtype == torch.float16
    assert torch.equal(model[0].weight == 0, reference[0].weight == 0) and pruner.report().zeros == reference_pruner.report().zeros


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "channel"])
def test_pruned_weights_are_positive_zeros(structure):
    """-0.0 (a negative weight times 0) equals 0 but not bit for bit: files and hashes would differ."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure=structure, schedule=IMMEDIATE), example_inputs=torch.randn(2, 8))
    pruner.finalize()
    zeros = model[0].weight[model[0].weight == 0]
    assert zeros.numel() >= 16 and not bool(zeros.signbit().any())


def test_importing_pdprune_does_not_import_the_optional_frameworks():
    import subprocess
    import sys

    code = "import sys, pdprune; print([m for m in ('lightning', 'transformers', 'onnx', 'matplotlib') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_reallocation_redoes_the_budgets_each_ramp_epoch_and_resumes_exactly(tiny_convnet):
    config = PruningConfig(sparsity=0.8, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=4, steps_per_epoch=2, reallocate=True))
    pruner = PDPPruner(tiny_convnet, config)
    optimizer = torch.optim.SGD(tiny_convnet.parameters(), lr=0.5)
    allocations = []
    for _ in range(12):
        _train_steps(tiny_convnet, pruner, optimizer, 1)
        allocations.append(pruner.schedule.allocated_epoch)
    assert allocations == [None, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3, 3], "once per ramp epoch, none after the ramp"
    from tests.conftest import TinyConvNet

    other = TinyConvNet()
    resumed = PDPPruner(other, config)
    other.load_state_dict(tiny_convnet.state_dict())
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.schedule.allocated_epoch == 3 and resumed.budgets == pruner.budgets


def test_finalize_measures_the_hard_cut_and_warns_when_it_is_large():
    layer = nn.Linear(8, 8)
    soft = PDPPruner(nn.Sequential(layer), PruningConfig(sparsity=0.5, temperature=5.0, schedule=IMMEDIATE))
    with pytest.warns(UserWarning, match=r"the hard mask removes \d+% of the weight energy that '0.weight' computed with .*anneal_end_epoch") as caught:
        soft.finalize()
    assert soft.hard_cut["0.weight"] > 0.05 and "BatchNorm" not in str(caught[0].message), "no BatchNorm to re-estimate"
    batchnorm = PDPPruner(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), PruningConfig(sparsity=0.5, temperature=5.0, schedule=IMMEDIATE))
    with pytest.warns(UserWarning, match=r"anneal_end_epoch.*BatchNorm already trained, re-estimating its statistics .*update_bn"):
        batchnorm.finalize()
    annealing = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0, anneal_end_epoch=1, anneal_factor=1.0)
    still_soft = PDPPruner(nn.Sequential(nn.Linear(8, 8)), PruningConfig(sparsity=0.5, temperature=5.0, schedule=annealing))
    with pytest.warns(UserWarning, match=r"weight energy .* The anneal had not turned the mask hard: finalize\(\) once it ends") as caught:
        still_soft.finalize()
    assert "anneal_end_epoch" not in str(caught[0].message), "it anneals already"
    annealed_batchnorm = PDPPruner(nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8)), PruningConfig(sparsity=0.5, temperature=5.0, schedule=annealing))
    with pytest.warns(UserWarning, match=r"weight energy .* Re-estimate the BatchNorm statistics after finalize\(\)"):
        annealed_batchnorm.finalize()
    hard = PDPPruner(nn.Sequential(nn.Linear(8, 8)), PruningConfig(sparsity=0.5, temperature=1e-4, schedule=IMMEDIATE))
    hard.finalize()
    assert hard.hard_cut["0.weight"] < 1e-3


# --- refused up front, nothing modified --------------------------------------------------------------


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], foreign: tuple[str, ...] = ()) -> None:
    ours = [name for name, module in model.named_modules() if parametrize.is_parametrized(module) and name not in foreign]
    assert not ours, f"parametrizations left behind on {ours}"
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("wrap", ["weight_norm", "orthogonal"])
def test_a_weight_that_already_carries_a_parametrization_stays_dense_with_it(tiny_mlp, wrap):
    """wav2vec2's positional conv carries weight_norm, a GAN's layers spectral_norm: such a weight is left
    dense with its parametrization (PDP's mask would change or remove it), named with the reason; the
    rest is pruned. With on_incompatible="error" it is refused, the model untouched."""
    from torch.nn.utils import parametrizations

    getattr(parametrizations, wrap)(tiny_mlp[2])
    before = _snapshot(tiny_mlp)
    reason = r"2.weight already carries a parametrization \(_(WeightNorm|Orthogonal)\); PDP masks plain weights.*exclude=\('2',\)"
    with pytest.raises(ValueError, match=reason + r"; or pass on_incompatible='skip'"):
        PDPPruner(tiny_mlp, PruningConfig(on_incompatible="error"))
    _assert_untouched(tiny_mlp, before, foreign=("2",))
    with pytest.warns(UserWarning, match=r"left dense: \['2.weight'\] \(another parametrization"):
        pruner = PDPPruner(tiny_mlp, PruningConfig(schedule=IMMEDIATE))
    assert "2.weight" not in pruner.tensor_names and pruner.tensor_names
    assert re.search(reason, pruner.report().skipped["2.weight"])
    tiny_mlp(torch.randn(2, tiny_mlp[0].in_features)).sum().backward()
    pruner.finalize()
    assert parametrize.is_parametrized(tiny_mlp[2], "weight"), "the user's own parametrization stays"
    assert not any(isinstance(p, (SoftMask, ChannelMask)) for p in tiny_mlp[2].parametrizations.weight)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"0.weight is on the meta device .*Materialize and load the weights first"):
        PDPPruner(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_a_lazy_layer_not_yet_run_is_refused_with_the_fix():
    model = nn.Sequential(nn.Linear(4, 8), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"1.weight of the LazyLinear has no shape yet .*run the model once on a batch"):
        PDPPruner(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    left_out = PDPPruner(model, PruningConfig(exclude=("1",)))
    assert left_out.tensor_names == ["0.weight"], "a lazy layer left out is no obstacle"
    left_out.detach()
    model(torch.randn(1, 4))
    assert sorted(PDPPruner(model).tensor_names) == ["0.weight", "1.weight"]


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda s: s.pop("budgets"), r"the pruner state lacks \['budgets'\]"),
        (lambda s: s["budgets"].pop("conv1.weight"), r"budgets are missing or out of \[0, 1\] for \['conv1.weight'\]"),
        (lambda s: s["budgets"].update({"fc.weight": 7.0}), r"budgets are missing or out of \[0, 1\] for \['fc.weight'\]"),
        (lambda s: s["schedule"].update({"steps_done": "12"}), r"the pruner state's 'schedule' entry is damaged"),
        (lambda s: s.update({"config": "nonsense"}), r"the pruner state's 'config' entry is damaged"),
        (lambda s: s.update({"tensors": 3}), r"the pruner state's 'tensors' entry is damaged"),
    ],
)
def test_a_damaged_pruner_state_is_refused_before_anything_changes(tiny_convnet, damage, message):
    config = PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=1, ramp_end_epoch=3, steps_per_epoch=2))
    saved = PDPPruner(copy.deepcopy(tiny_convnet), config)
    for _ in range(4):
        saved.step()
    state = copy.deepcopy(saved.state_dict())
    damage(state)
    pruner = PDPPruner(tiny_convnet, config)
    pruner.step()
    before = (copy.deepcopy(pruner.state_dict()), {name: unit.sparsity for name, unit in pruner.units.items()})
    with pytest.raises(ValueError, match=message):
        pruner.load_state_dict(state)
    assert (pruner.state_dict(), {name: unit.sparsity for name, unit in pruner.units.items()}) == before


@pytest.mark.parametrize("action", ["save_sparse", "compact", "save_compacted", "export_onnx"])
def test_saving_or_compacting_a_model_whose_masks_are_attached_is_refused(tiny_convnet, tmp_path, action):
    from pdprune import compact, save_compacted
    from pdprune.export import export_onnx, save_sparse

    PDPPruner(tiny_convnet, PruningConfig(schedule=IMMEDIATE))
    calls = {
        "save_sparse": lambda: save_sparse(tmp_path / "m.pt", tiny_convnet),
        "compact": lambda: compact(tiny_convnet, torch.randn(1, 3, 8, 8)),
        "save_compacted": lambda: save_compacted(tmp_path / "m.pt", tiny_convnet, torch.randn(1, 3, 8, 8)),
        "export_onnx": lambda: export_onnx(tiny_convnet, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx"),
    }
    with pytest.raises(ValueError, match=rf"{action}\(\) needs a plain model, but \['conv1', 'conv2', 'fc'\] still carry parametrizations .*finalize\(\) first"):
        calls[action]()
    assert not list(tmp_path.iterdir()), "nothing written"
    with pytest.raises(ValueError, match=r"save_sparse\(\) needs plain weights, but the state_dict holds PDP's masks"):
        save_sparse(tmp_path / "m.pt", tiny_convnet.state_dict())


@pytest.mark.parametrize("config,message", [
    (0.9, r"config must be a PruningConfig or None, got float 0.9; for a sparsity, pass PDPPruner\(model, PruningConfig\(sparsity=0.9\)\)"),
    ({"sparsity": 0.5}, r"got dict \{'sparsity': 0.5\}; build it from the dict: PDPPruner\(model, PruningConfig.from_dict\(\{'sparsity': 0.5\}\)\)"),
], ids=["number", "dict"])
def test_a_config_that_is_not_a_pruning_config_is_refused_with_the_way_to_build_one(tiny_mlp, config, message):
    before = _snapshot(tiny_mlp)
    with pytest.raises(TypeError, match=message):
        PDPPruner(tiny_mlp, config)
    _assert_untouched(tiny_mlp, before)


def test_a_failure_after_attaching_takes_off_exactly_the_masks_it_put_on(tiny_convnet, monkeypatch):
    """Budgets are computed once the masks are on: whatever fails there, the model is left as it was."""
    before, originals = _snapshot(tiny_convnet), {name: p for name, p in tiny_convnet.named_parameters()}

    def broken(self):
        raise RuntimeError("allocation failed")

    monkeypatch.setattr(PDPPruner, "_allocate", broken)
    with pytest.raises(RuntimeError, match="allocation failed"):
        PDPPruner(tiny_convnet, PruningConfig(schedule=IMMEDIATE))
    _assert_untouched(tiny_convnet, before)
    assert all(parameter is originals[name] for name, parameter in tiny_convnet.named_parameters()), "the very same Parameters"


def test_a_warning_raised_as_an_error_after_attaching_leaves_the_model_untouched():
    import warnings

    model = nn.Sequential(nn.Linear(2, 1))
    before = _snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match=r"global allocation prunes every weight of \['0.weight'\]"):
            PDPPruner(model, PruningConfig(sparsity=0.9, allocation="global", schedule=IMMEDIATE))
    _assert_untouched(model, before)
    PDPPruner(model, PruningConfig(sparsity=0.5, allocation="uniform", schedule=IMMEDIATE)).finalize()  # attaching again works


def test_the_emptied_layer_warning_names_the_allocation_that_emptied_it(monkeypatch):
    import pdprune.pruner

    monkeypatch.setattr(pdprune.pruner, "lamp_budgets", lambda magnitudes, sparsity: {name: 1.0 for name in magnitudes})
    with pytest.warns(UserWarning, match=r"^lamp allocation prunes every weight of \['0.weight'\].*Use allocation='uniform'"):
        PDPPruner(nn.Sequential(nn.Linear(4, 4)), PruningConfig(schedule=IMMEDIATE))


def test_a_zero_element_weight_is_left_dense_with_the_reason():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))
    with pytest.warns(UserWarning, match=r"left dense: \['1.weight'\] \(no elements; pruner.report\(\) says why\)"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    assert pruner.tensor_names == ["0.weight"] and pruner.budgets == {"0.weight": 0.5}
    assert pruner.report().skipped["1.weight"] == "its shape (0, 4) holds no elements: nothing to prune"
    assert not parametrize.is_parametrized(model[1])
    pruner.finalize()
    assert int((model[0].weight == 0).sum()) == 8
    only_empty = nn.Sequential(nn.Linear(4, 0))
    before = _snapshot(only_empty)
    with pytest.raises(ValueError, match=r"nothing to prune: every selected weight holds no elements \(0.weight has shape \(0, 4\)\)"):
        PDPPruner(only_empty)
    _assert_untouched(only_empty, before)


def test_a_registered_layer_type_without_a_weight_is_refused_naming_the_module(monkeypatch):
    import pdprune
    from pdprune import layers

    monkeypatch.setattr(layers, "_REGISTERED", dict(layers._REGISTERED))  # the registration ends with the test
    pdprune.register_layer_type("LSTM", nn.LSTM)
    model = nn.Sequential(nn.LSTM(4, 8), nn.Linear(8, 2))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"'0' is a LSTM of layer type 'LSTM', which module_types selects, but it has no `weight` tensor "
                                         r"\(its matrices: \['weight_ih_l0', 'weight_hh_l0'\]\).*exclude=\('0',\)"):
        PDPPruner(model, PruningConfig(module_types=("Linear", "LSTM")))
    _assert_untouched(model, before)
    pruner = PDPPruner(model, PruningConfig(module_types=("Linear", "LSTM"), exclude=("0",)))  # the way out the message names
    assert pruner.tensor_names == ["1.weight"] and pruner.report().skipped == {"0": "matched by exclude"}


@pytest.mark.parametrize("end", ["finalize", "detach"])
def test_a_copy_taken_during_training_outlives_the_pruner(end):
    """An EMA model or a snapshot (copy.deepcopy) shares the class parametrize made: taking the masks off the
    original must leave the copy its weights and masks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0)))
    snapshot = copy.deepcopy(model)
    inputs = torch.randn(4, 8)
    expected = snapshot(inputs)
    getattr(pruner, end)()
    assert not parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(snapshot[0])
    torch.testing.assert_close(snapshot(inputs), expected)


def test_warnings_come_from_the_caller_s_line_under_its_filters():
    """module= filters match the caller's module, and the default action says a warning once per line."""
    class Scale(nn.Module):  # a weight of no layer type pdprune knows: a warning
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 4))

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), Scale())

    with warnings.catch_warnings(record=True) as said:
        warnings.resetwarnings()
        warnings.filterwarnings("ignore", module=__name__)
        PDPPruner(build()).detach()
    assert said == []
    with warnings.catch_warnings(record=True) as said:
        warnings.resetwarnings()
        warnings.simplefilter("default")
        for _ in range(2):
            PDPPruner(build()).detach()
    assert len(said) == 1 and said[0].filename == __file__


def test_a_layer_structures_pattern_that_matches_only_layers_left_out_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"pattern '2' matches only layers that are not pruned: \{'2': 'not matched by include'\}; .* from layer_structures"):
        PDPPruner(model, PruningConfig(include=("0",), layer_structures={"2": "2:4"}))
    assert not parametrize.is_parametrized(model[0])
