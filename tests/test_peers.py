"""The third-party peers (pip install 'pdprune[peers]'): PQuantML's PDP and coremltools' MagnitudePruner,
each trained through the harness's `train()` on a tiny conv net. Each reaches what the peer guarantees,
resumes from an epoch checkpoint bit-exact, and refuses what it cannot do. A missing peer fails in CI
and skips elsewhere, like the real data."""

from __future__ import annotations

import io
import math
import os
import sys

import pytest
import torch
from torch import nn

from pdprune import is_nm_sparse, model_sparsity
from pdprune.baselines import BASELINES, MethodSpec, build_baseline
from pdprune.baselines.coreml import CoreMLMagnitude, _import_pruning
from pdprune.baselines.pquant import PQuantPDP, _import_pquant
from pdprune.data import load_dataset
from pdprune.train import TrainConfig, train

PEERS = [("pquant_pdp", "unstructured", 0.8), ("pquant_pdp", "channel", 0.5), ("coreml_magnitude", "unstructured", 0.8),
         ("coreml_magnitude", "2:4", 0.5), ("coreml_magnitude", "1:4", 0.75), ("coreml_magnitude", "channel", 0.5)]
PRODUCERS = ("conv1", "conv2", "fc")  # the layers of TinyDigitsNet's channel groups; the classifier is an output


class SimulatedCrash(RuntimeError):
    """Stands for a kill in the middle of a run."""


class TinyDigitsNet(nn.Module):
    """Conv(1 -> 8) -> BN -> Conv(8 -> 16) -> BN -> pool -> Linear(16 -> 16) -> Linear(16 -> 10), for 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc, self.classifier = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.classifier(torch.relu(self.fc(x.mean(dim=(2, 3)))))


@pytest.fixture(autouse=True)
def peers_installed() -> None:
    """The peers are in the dev extra: missing, they fail in CI and skip elsewhere."""
    try:
        _import_pquant()
        _import_pruning()
    except ImportError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(str(error))
        pytest.skip(str(error))


def _digits():
    return load_dataset("digits").subset(128, 32)


def _run(method: str, structure: str, sparsity: float, epochs: int = 2, channels_last: bool = False, checkpoint=None, crash_at: int | None = None):
    """Train TinyDigitsNet with the peer (warm-up half an epoch, target at 1.5); returns the model and the peer."""
    data = _digits()
    torch.manual_seed(0)
    model = TinyDigitsNet()
    spec = MethodSpec(sparsity, structure, warmup_epochs=0.5, ramp_end_epoch=1.5, steps_per_epoch=data.steps_per_epoch(32))
    peer = build_baseline(method, model, spec, data.train_inputs[:2])
    stepper = peer if crash_at is None else _CrashAt(peer, crash_at)
    train(model, data, TrainConfig(epochs=epochs, batch_size=32, channels_last=channels_last), stepper, checkpoint_path=checkpoint, progress=False)
    return model, peer


class _CrashAt:
    """A pruning method that dies after its `step`-th step."""

    def __init__(self, method, step: int) -> None:
        self.method, self.crash_step = method, step

    def step(self) -> None:
        self.method.step()
        if self.method.steps_done == self.crash_step:
            raise SimulatedCrash

    def finalize(self):
        return self.method.finalize()

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, state) -> None:
        self.method.load_state_dict(state)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach() for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}


def _zero_rows(weight: torch.Tensor) -> int:
    return int((weight.flatten(1) == 0).all(dim=1).sum())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("method,structure,sparsity", PEERS)
def test_every_peer_trains_and_finalizes_to_what_it_guarantees(method, structure, sparsity, channels_last):
    model, peer = _run(method, structure, sparsity, channels_last=channels_last)
    weights = _weights(model)
    assert {type(module) for module in model.modules()} == {TinyDigitsNet, nn.Conv2d, nn.BatchNorm2d, nn.Linear}  # plain layers
    assert not any(name.startswith("_COREML_") or "mask" in name for name in model.state_dict())
    if method == "pquant_pdp":
        budgets = peer.state_dict()["budgets"]  # the fractions below PQuantML's global threshold
        if structure == "unstructured":
            for name, weight in weights.items():  # the top int((1 - r) n) magnitudes kept
                assert int((weight == 0).sum()) - round(budgets[name] * weight.numel()) in (0, 1), name
            total = sum(w.numel() for w in weights.values())
            assert model_sparsity(model).sparsity == pytest.approx(sparsity, abs=(len(weights) + 1) / total)
        else:
            for name, weight in weights.items():  # whole output channels, as many as the budget says
                rows = _zero_rows(weight)
                assert int((weight == 0).sum()) == rows * weight[0].numel(), name
                expected = budgets[name] * weight.shape[0] if name in PRODUCERS else 0
                assert abs(rows - expected) <= 1, (name, rows, expected)
    elif structure == "unstructured":  # coremltools: every layer keeps ceil(n (1 - s)) weights
        for name, weight in weights.items():
            assert int((weight != 0).sum()) == math.ceil(round(weight.numel() * (1 - sparsity), 6)), name
    elif structure == "channel":  # Conv output filters only: coremltools treats 2-D weights per scalar
        for name, weight in weights.items():
            rows = _zero_rows(weight)
            assert int((weight == 0).sum()) == rows * weight[0].numel(), name
            assert weight.shape[0] - rows == (math.ceil(weight.shape[0] * (1 - sparsity)) if name in ("conv1", "conv2") else weight.shape[0]), name
    else:
        n, m = map(int, structure.split(":"))
        for name, weight in weights.items():
            if name == "conv1":  # one input channel: left dense, as by every N:M method here
                assert int((weight == 0).sum()) == 0
            else:
                assert is_nm_sparse(weight, n, m), name


@pytest.mark.parametrize("method,structure,sparsity", PEERS)
def test_a_killed_run_resumes_from_its_epoch_checkpoint_bit_exact(method, structure, sparsity, tmp_path):
    """Killed mid-ramp in epoch 2 (step 6, 4 steps per epoch, target at step 6), resumed by a fresh
    process from the checkpoint of epoch 1: the same final weights as a run never interrupted."""
    reference, _ = _run(method, structure, sparsity, epochs=3)
    checkpoint = tmp_path / "run.pt"
    with pytest.raises(SimulatedCrash):
        _run(method, structure, sparsity, epochs=3, checkpoint=checkpoint, crash_at=6)
    assert checkpoint.exists()
    resumed, peer = _run(method, structure, sparsity, epochs=3, checkpoint=checkpoint)
    for name, weight in _weights(reference).items():
        torch.testing.assert_close(_weights(resumed)[name], weight, rtol=0, atol=0, msg=name)
    buffer = io.BytesIO()
    torch.save(peer.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == peer.state_dict()


def test_unsupported_structures_are_refused_and_named():
    assert BASELINES["pquant_pdp"][0] == ("unstructured", "channel")
    assert BASELINES["coreml_magnitude"][0] == ("unstructured", "N:M", "channel")
    data = _digits()
    spec = MethodSpec(0.5, "2:4", 0.5, 1.5, data.steps_per_epoch(32))
    with pytest.raises(ValueError, match=r"baseline 'pquant_pdp' handles \['unstructured', 'channel'\] sparsity, not '2:4'"):
        build_baseline("pquant_pdp", TinyDigitsNet(), spec, data.train_inputs[:2])
    with pytest.raises(ValueError, match=r"PQuantML's PDP prunes 'unstructured' or 'channel' sparsity, not '2:4'"):
        PQuantPDP(TinyDigitsNet(), spec, data.train_inputs[:2])
    linear_only = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.raises(ValueError, match=r"MagnitudePruner finds no layer to prune at 'channel'"):
        CoreMLMagnitude(linear_only, MethodSpec(0.5, "channel", 0.5, 1.5, 8), data.train_inputs[:2])
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(ValueError, match=r"PQuantML replaces nn.MultiheadAttention"):
        PQuantPDP(attention, MethodSpec(0.5, "unstructured", 0.5, 1.5, 8), torch.randn(2, 8))


def test_a_missing_peer_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pquant", None)
    monkeypatch.setitem(sys.modules, "coremltools.optimize.torch", None)
    data = _digits()
    spec = MethodSpec(0.5, "unstructured", 0.5, 1.5, 8)
    for name in ("pquant_pdp", "coreml_magnitude"):
        with pytest.raises(ImportError, match=rf"the '{name}' baseline needs .* pip install 'pdprune\[peers\]'"):
            build_baseline(name, TinyDigitsNet(), spec, data.train_inputs[:2])


def test_pquantml_needs_its_torch_backend(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(RuntimeError, match=r"needs KERAS_BACKEND=torch, got KERAS_BACKEND='tensorflow'"):
        PQuantPDP(TinyDigitsNet(), MethodSpec(0.5, "unstructured", 0.5, 1.5, 8), torch.randn(2, 1, 8, 8))


def test_pquantml_s_temperature_is_an_option_and_its_default_stays_its_own():
    data = _digits()
    default = build_baseline("pquant_pdp", TinyDigitsNet(), MethodSpec(0.5, "unstructured", 0.5, 1.5, 8), data.train_inputs[:2])
    assert {layer.pruning_layer.temp for layer in default.layers.values()} == {1e-5}
    spec = MethodSpec(0.5, "unstructured", 0.5, 1.5, 8, options={"temperature": 3e-4})
    tuned = build_baseline("pquant_pdp", TinyDigitsNet(), spec, data.train_inputs[:2])
    assert {layer.pruning_layer.temp for layer in tuned.layers.values()} == {3e-4}
    with pytest.raises(ValueError, match=r"PQuantML's temperature must be a number > 0, got -1"):
        PQuantPDP(TinyDigitsNet(), MethodSpec(0.5, "unstructured", 0.5, 1.5, 8, options={"temperature": -1}), data.train_inputs[:2])
    with pytest.raises(ValueError, match=r"CoreMLMagnitude has no option \['temperature'\]; its options: \[\]"):
        CoreMLMagnitude(TinyDigitsNet(), spec, data.train_inputs[:2])
