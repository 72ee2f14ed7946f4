"""N:M and channel PDP, compaction, and saving compacted models."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from pdprune import PDPPruner, PruningConfig, ScheduleConfig, compact, is_nm_sparse, load_compacted, save_compacted
from pdprune.masks import group_along_inputs
from pdprune.models import build_model
from pdprune.models.mobilenet import MobileNetV1
from tests.conftest import TinyResNet, randomize_batchnorm

IMMEDIATE = ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)


def _train(model, pruner, inputs_shape, steps=3, classes=4):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(inputs_shape, generator=generator)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, classes, (inputs_shape[0],), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.step()


# --- N:M ------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    pattern=st.sampled_from([(1, 4), (2, 4), (1, 8), (2, 8), (4, 8), (3, 4)]),
    out_features=st.integers(1, 6),
    groups=st.integers(1, 4),
    kernel=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 999),
)
def test_nm_pattern_is_exact_after_finalize(pattern, out_features, groups, kernel, seed):
    n, m = pattern
    torch.manual_seed(seed)
    layer = nn.Linear(groups * m, out_features) if kernel is None else nn.Conv2d(groups * m, out_features, kernel)
    model = nn.Sequential(layer)
    pruner = PDPPruner(model, PruningConfig(structure=f"{n}:{m}", schedule=IMMEDIATE))
    pruner.finalize()
    assert is_nm_sparse(layer.weight, n, m)
    nonzeros = (group_along_inputs(layer.weight, m) != 0).sum(dim=1)
    assert bool((nonzeros == n).all()), "exactly N non-zeros in every group"
    assert not is_nm_sparse(layer.weight, n - 1, m) if n > 1 else True


def test_nm_soft_mask_is_half_at_each_group_threshold_and_ramps_in_whole_steps():
    layer = nn.Linear(8, 2)
    pruner = PDPPruner(nn.Sequential(layer), PruningConfig(structure="2:4", schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=0.5)))
    mask = layer.parametrizations.weight[0]
    assert pruner.current_sparsity("0.weight") == 0.25  # half the ramp: 1 of 4 pruned per group
    soft = mask.soft_mask(layer.parametrizations.weight.original.detach(), 0.25)
    below = (group_along_inputs(soft, 4) < 0.5).sum(dim=1)
    assert bool((below == 1).all())


def test_nm_mixed_with_unstructured_per_layer_and_incompatible_layers_skipped_with_a_warning(tiny_convnet):
    config = PruningConfig(sparsity=0.8, structure="unstructured", layer_structures={"conv*": "2:4"}, schedule=IMMEDIATE)
    with pytest.warns(UserWarning, match=r"left dense: \['conv1.weight'\]"):
        pruner = PDPPruner(tiny_convnet, config)
    assert not parametrize.is_parametrized(tiny_convnet.conv1)
    pruner.finalize()
    report = pruner.report()
    structures = {layer.name: layer.structure for layer in report.layers}
    assert structures == {"conv2.weight": "2:4", "fc.weight": "unstructured"}
    assert "conv1.weight" in report.skipped and "left dense: conv1.weight" in report.table()
    assert is_nm_sparse(tiny_convnet.conv2.weight, 2, 4)
    assert int((tiny_convnet.fc.weight == 0).sum()) == round(0.8 * tiny_convnet.fc.weight.numel())


def test_depthwise_conv_cannot_hold_nm_and_errors_when_asked():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ValueError, match=r"2:4 needs the input dimension of '0.weight' \(dimension 1 of shape \(8, 1, 3, 3\)\) to be a multiple of 4"):
        PDPPruner(model, PruningConfig(structure="2:4", on_incompatible="error"))


@pytest.mark.parametrize("structure,message", [("4:4", r"needs 0 < N < M"), ("5:4", r"needs 0 < N < M"), ("0:4", r"needs 0 < N < M")])
def test_nm_bad_patterns(structure, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(structure=structure)


def test_semi_structured_conversion_says_plainly_when_unavailable():
    from pdprune.semi_structured import to_semi_structured

    layer = nn.Linear(64, 64)
    PDPPruner(nn.Sequential(layer), PruningConfig(structure="2:4", schedule=IMMEDIATE)).finalize()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"semi-structured sparse kernels need a CUDA GPU"):
            to_semi_structured(nn.Sequential(layer))
    else:
        with pytest.raises(ValueError, match=r"0.weight is torch.float32 on cpu; move the model first"):
            to_semi_structured(nn.Sequential(layer))
    with pytest.raises(ValueError, match=r"no Linear layer of the model is 2:4 sparse"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


# --- channels -------------------------------------------------------------------------------------


def _effective_channel_scales(model: nn.Module, pruner: PDPPruner, group_name: str) -> list[torch.Tensor]:
    """For every member tensor of a group, the per-root-channel ratio effective / original."""
    group = pruner.units[group_name]
    scales = []
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name, masks in module.parametrizations.items():
            for mask in masks:
                if getattr(mask, "group", None) is group:
                    original = masks.original.detach()
                    effective = getattr(module, tensor_name).detach()
                    ratio = (effective / original).reshape(original.shape[0], -1)[mask.positions[:, 0]]
                    scales.append(ratio[:, 0])
    return scales


@pytest.mark.parametrize("build,shape", [(TinyResNet, (2, 3, 8, 8)), (lambda: build_model("mobilenet_v1", (3, 32, 32), 10), (2, 3, 32, 32))])
def test_channel_masks_agree_across_coupled_layers(build, shape):
    model = build()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=torch.randn(shape))
    groups = [name for name, unit in pruner.units.items() if unit.structure == "channel"]
    assert groups, "some channel groups found"
    _train(model, pruner, shape, steps=2, classes=4 if isinstance(model, TinyResNet) else 10)
    for name in groups:
        scales = _effective_channel_scales(model, pruner, name)
        assert len(scales) >= 2, f"group {name} couples several tensors"
        for other in scales[1:]:
            torch.testing.assert_close(other, scales[0], rtol=1e-5, atol=1e-6)
        assert bool((scales[0] < 0.5).sum() == pruner.units[name].pruned(pruner.current_sparsity(name)))


def test_residual_streams_are_one_group_and_depthwise_convs_join_their_producer():
    model = TinyResNet()
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(1, 3, 8, 8))
    members = {group.name: set(group.members) for group in pruner.report().groups}
    assert {"stem.weight", "block1_conv2.weight", "stem_bn.weight", "block1_bn2.bias"} <= members["stem"]
    assert {"block2_conv2.weight", "block2_shortcut.weight", "block2_shortcut_bn.weight"} <= members["block2_conv1"] | members.get("block2_conv2", set()) | members.get("block2_shortcut", set())
    mobilenet = build_model("mobilenet_v1", (3, 32, 32), 10)
    pruner = PDPPruner(mobilenet, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(1, 3, 32, 32))
    group = next(g.members for g in pruner.report().groups if g.name == "features.1.1.0")
    assert {"features.1.1.0.weight", "features.1.1.1.weight", "features.2.0.0.weight", "features.2.0.1.bias"} <= set(group)


def test_option_a_resnet_keeps_its_padded_residual_stream_dense_and_prunes_the_blocks():
    model = build_model("resnet20", (3, 32, 32), 10)
    with pytest.warns(UserWarning, match=r"channel groups left dense: \{'conv1': 'Torch-Pruning cannot remove these channels exactly"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(1, 3, 32, 32))
    assert sorted(pruner.units) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _resnet20_without_half_of_each_block_s_inner_channels() -> int:
    """ResNet-20's parameters once every block loses half of conv1's filters (and bn1's channels, and
    conv2's matching inputs); its zero-padded residual stream stays whole."""
    dense = build_model("resnet20", (3, 32, 32), 10)
    removed = 0
    for name, module in dense.named_modules():
        if name.startswith("layer") and name.endswith(".conv1"):
            out_channels, in_channels, height, width = module.weight.shape
            gone = out_channels // 2
            removed += gone * in_channels * height * width  # conv1's filters
            removed += 2 * gone  # bn1's scale and shift
            removed += out_channels * gone * height * width  # conv2's inputs from them
    return _parameters(dense) - removed


# At 50% channels, each architecture compacts to a known one: half of every prunable coupled group.
COMPACTED_PARAMETERS = {
    "tiny_resnet": lambda: _parameters(TinyResNet(width=4)),
    "mobilenet_v1": lambda: _parameters(MobileNetV1(10, 3, width=0.5)),
    "resnet20": _resnet20_without_half_of_each_block_s_inner_channels,
}


class _WithOddParameters(nn.Module):
    """A frozen -inf logit bias and a float8 scale beside two prunable layers: the exactness check moves
    parameters a little, and must leave what has no arithmetic or no finite value alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.logit_bias = nn.Parameter(torch.tensor([-float("inf"), 0.0, 0.0, 0.0]), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(8).to(torch.float8_e4m3fn), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc2(torch.relu(self.fc1(x * self.scale.float()))) + self.logit_bias, dim=-1)


def test_channels_of_a_model_with_infinite_and_float8_parameters_prune():
    pruner = PDPPruner(_WithOddParameters(), PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(4, 8))
    assert list(pruner.units) == ["fc1"]


@pytest.mark.parametrize("name,build,shape", [("tiny_resnet", TinyResNet, (2, 3, 8, 8)),
                                              ("mobilenet_v1", lambda: build_model("mobilenet_v1", (3, 32, 32), 10), (2, 3, 32, 32)),
                                              ("resnet20", lambda: build_model("resnet20", (3, 32, 32), 10), (2, 3, 32, 32))])
def test_finalize_then_compact_keeps_outputs_and_removes_the_channels(name, build, shape):
    model = randomize_batchnorm(build())
    example = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ResNet-20 warns that its padded residual stream stays dense
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example)
    pruner.finalize()
    report = pruner.report()
    for group in report.groups:
        assert group.pruned == round(0.5 * group.channels)
    with pytest.raises(TypeError, match=r"rejected example_inputs tensor\(2, 5\) float32 when called as model\(example_inputs\)") as caught:
        compact(model, torch.randn(2, 5))
    assert "needs a dict" not in str(caught.value), "a shape error is no sign of a keyword model"
    small = compact(model, example)
    model.eval(), small.eval()
    x = torch.randn(shape)
    assert (small(x) - model(x)).abs().max() < 1e-5
    assert _parameters(small) == COMPACTED_PARAMETERS[name](), "every pruned channel of every group is gone"


def test_compacted_model_saves_and_loads_in_a_new_process(tmp_path):
    model = randomize_batchnorm(build_model("mobilenet_v1", (3, 32, 32), 10))
    example = torch.randn(1, 3, 32, 32)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example)
    pruner.finalize()
    small = compact(model, example).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    torch.save(small(x).detach(), tmp_path / "expected.pt")
    save_compacted(tmp_path / "small.pt", small, example)
    script = textwrap.dedent(f"""
        import torch
        from pdprune import load_compacted
        from pdprune.models import build_model
        model = load_compacted({str(tmp_path / 'small.pt')!r}, build_model("mobilenet_v1", (3, 32, 32), 10)).eval()
        x = torch.load({str(tmp_path / 'x.pt')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert (model(x) - expected).abs().max() < 1e-6, "outputs differ"
        assert sum(p.numel() for p in model.parameters()) == {_parameters(small)}
        print("loaded")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "loaded" in result.stdout


def test_loading_a_compacted_file_into_another_architecture_is_refused(tmp_path):
    model = TinyResNet()
    example = torch.randn(1, 3, 8, 8)
    PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example).finalize()
    save_compacted(tmp_path / "small.pt", compact(model, example), example)
    with pytest.raises(ValueError, match=r"does not fit this architecture"):
        load_compacted(tmp_path / "small.pt", build_model("mobilenet_v1", (3, 32, 32), 10))


def test_channel_structure_without_example_inputs_is_refused(tiny_resnet):
    with pytest.raises(ValueError, match=r"structure 'channel' needs example_inputs=\.\.\."):
        PDPPruner(tiny_resnet, PruningConfig(structure="channel"))
    assert not any(parametrize.is_parametrized(m) for m in tiny_resnet.modules())


def test_channel_group_coupled_with_an_unselected_layer_stays_dense(tiny_resnet):
    config = PruningConfig(structure="channel", exclude=("block1_conv2",))
    with pytest.warns(UserWarning, match=r"'stem': \"coupled with layers not selected for channel pruning: \['block1_conv2'\]"):
        pruner = PDPPruner(tiny_resnet, config, example_inputs=torch.randn(1, 3, 8, 8))
    assert "stem" not in pruner.units and "block1_conv1" in pruner.units


def test_channel_pruning_resumes_from_model_state_alone(tiny_resnet):
    example = torch.randn(2, 3, 8, 8)
    pruner = PDPPruner(tiny_resnet, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example)
    other = TinyResNet()
    PDPPruner(other, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=example)
    other.load_state_dict(tiny_resnet.state_dict())
    tiny_resnet.eval(), other.eval()
    torch.testing.assert_close(other(example), tiny_resnet(example))
    assert pruner.current_sparsity("stem") == 0.5


def test_channel_mask_gradient_is_the_derivative_of_what_the_forward_computes():
    """The soft mask of a channel depends on its filters' norms, and the gradient flows through that:
    autograd agrees with central differences for every weight of a channel away from the threshold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    model = randomize_batchnorm(model).double().eval()  # eval: BatchNorm is a fixed function of its input
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    config = PruningConfig(sparsity=0.5, structure="channel", temperature=0.5, schedule=IMMEDIATE)  # a soft mask: a real slope
    PDPPruner(model, config, example_inputs=x)
    original = model[0].parametrizations.weight.original

    def loss() -> float:
        return model(x).square().sum()

    loss().backward()
    order = original.detach().square().flatten(1).sum(dim=1).argsort()  # (8,) channels by filter norm
    step = 1e-6
    # The threshold sits between the 4th and 5th channels; moving any other channel leaves it in place.
    for channel in (int(order[0]), int(order[1]), int(order[-1])):
        for index in itertools.product([channel], range(3), range(3), range(3)):
            with torch.no_grad():
                original[index] += step
                up = float(loss())
                original[index] -= 2 * step
                down = float(loss())
                original[index] += step
            assert float(original.grad[index]) == pytest.approx((up - down) / (2 * step), rel=1e-5, abs=1e-9), index


def test_a_grouped_convolution_s_channels_stay_dense_and_the_rest_compacts():
    """A grouped conv (groups=2, not depthwise) needs as many channels removed from each of its groups;
    PDP's scores do not keep that, so its groups are refused at attach, whatever the exactness probe says."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    example = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"'0': \"'2' is a grouped convolution \(groups=2\): removing its channels needs as many from each"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example)
    assert sorted(pruner.units) == ["4"] and {"channel group 0", "channel group 2"} <= set(pruner.report().skipped)
    pruner.finalize()
    small = compact(model, example)
    assert small[4].out_channels == 4 and small[2].weight.shape == model[2].weight.shape


def test_an_error_inside_torch_pruning_leaves_that_group_dense_and_names_its_layer(monkeypatch):
    """Torch-Pruning's index mappings can fail (Falcon's grouped heads divide by zero): that group is
    reported with the error, the others are pruned."""
    import torch_pruning

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    original = torch_pruning.DependencyGraph.get_pruning_group

    def failing(graph, module, *args, **kwargs):
        if module is model[0]:
            raise ZeroDivisionError("integer division or modulo by zero")
        return original(graph, module, *args, **kwargs)

    monkeypatch.setattr(torch_pruning.DependencyGraph, "get_pruning_group", failing)
    with pytest.warns(UserWarning, match=r"'0': 'Torch-Pruning could not follow these channels through the model \(ZeroDivisionError"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=torch.randn(2, 8))
    assert sorted(pruner.units) == ["2"]


def test_loading_into_a_model_of_other_sizes_names_the_mismatched_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    example = torch.randn(2, 8)
    PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example).finalize()
    save_compacted(tmp_path / "small.pt", compact(model, example), example)
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    before = {key: value.clone() for key, value in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit this architecture: 2\.bias: \(4,\) saved, \(5,\) here; 2\.weight: \(4, 8\) saved, \(5, 8\) here"):
        load_compacted(tmp_path / "small.pt", other)
    assert other[0].out_features == 16 and other[2].in_features == 16, "the model is left as it was"
    assert all(torch.equal(value, before[key]) for key, value in other.state_dict().items()) and list(other.state_dict()) == list(before)
    with pytest.raises(ValueError, match=r"does not fit this architecture: missing \['3\.bias', '3\.weight'\]"):
        load_compacted(tmp_path / "small.pt", nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"does not fit this architecture: Sequential rejected example_inputs tensor\(2, 8\)"):
        load_compacted(tmp_path / "small.pt", nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4)))


class _UpsamplingDecoder(nn.Module):
    """The decoder half of a U-Net or a GAN generator: a strided conv down, transposed convs up (one
    depthwise, whose weight keeps its channels along dimension 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 32, 4, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(32)
        self.smooth = nn.ConvTranspose2d(32, 32, 3, padding=1, groups=32)
        self.refine = nn.ConvTranspose2d(32, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.refine(torch.relu(self.smooth(self.norm(self.up(self.down(x))))))))


@pytest.mark.parametrize("structure,sparsity", [("unstructured", 0.9), ("2:4", 0.5), ("channel", 0.5)])
def test_transposed_convolutions_are_pruned_along_their_in_out_layout(structure, sparsity, tmp_path):
    """ConvTranspose keeps its weight as (in, out, *kernel): N:M groups run along dimension 0, its
    channels along dimension 1, and compaction removes them there."""
    torch.manual_seed(0)
    model = randomize_batchnorm(_UpsamplingDecoder())
    example = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's channels are the model's outputs: left dense
        pruner = PDPPruner(model, PruningConfig(sparsity=sparsity, structure=structure, schedule=IMMEDIATE), example_inputs=example)
        pruner.finalize()  # and the hard cut at once warns
    report = pruner.report()
    if structure == "unstructured":
        assert {"up.weight", "refine.weight"} <= {row.name for row in report.layers}
        assert sum(row.zeros for row in report.layers) == round(0.9 * sum(row.parameters for row in report.layers))
    elif structure == "2:4":
        for layer in (model.up, model.refine):
            assert is_nm_sparse(layer.weight, 2, 4, input_dim=0)
            assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2
    else:
        assert {"up", "refine"} <= set(pruner.units)
        model.eval()
        expected = model(example)
        small = compact(model, example).eval()
        assert (small.up.out_channels, small.smooth.groups, small.refine.in_channels, small.refine.out_channels) == (16, 16, 16, 4)
        assert (small(example) - expected).abs().max() < 1e-5
        save_compacted(tmp_path / "small.pt", small, example)
        reloaded = load_compacted(tmp_path / "small.pt", _UpsamplingDecoder()).eval()
        assert (reloaded(example) - expected).abs().max() < 1e-5


def test_a_layer_whose_channels_are_the_model_s_outputs_is_left_dense_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"'2': \"Torch-Pruning's graph gives its output channels no group: they are outputs of the model"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(2, 8))
    assert sorted(pruner.units) == ["0"] and "channel group 2" in pruner.report().skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused: the error says it all, no warning before it
        with pytest.raises(ValueError, match=r"nothing left to prune: channel group 0: Torch-Pruning's graph gives its output channels no group"):
            PDPPruner(nn.Sequential(nn.Linear(8, 4)), PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(2, 8))
        with pytest.raises(ValueError, match=r"nothing left to prune: channel group \(the model\): Torch-Pruning"):
            PDPPruner(nn.Linear(8, 4), PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(2, 8))


def test_a_layer_under_weight_norm_keeps_it_and_the_channels_it_reads_stay_dense():
    """Torch-Pruning cannot shrink a weight under another parametrization: the group whose channels run
    into it stays dense with the reason, the rest is pruned and compacts exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Conv2d(8, 8, 3)), nn.ReLU(),
                          nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    example = torch.randn(2, 3, 10, 10)
    with pytest.warns(UserWarning, match=r"'0': \"its channels run through '2', which carries another parametrization \(weight_norm"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example)
    assert sorted(pruner.units) == ["4"] and "already carries a parametrization (_WeightNorm)" in pruner.report().skipped["2.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner.finalize()
    model.eval()
    small = compact(model, example).eval()
    assert small[4].out_channels == 4 and parametrize.is_parametrized(small[2], "weight")
    assert (small(example) - model(example)).abs().max() < 1e-5


class _AttentionGate(nn.Module):
    """CBAM's channel attention: named like attention, but it gates channels and has no heads."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.squeeze, self.excite = nn.Conv2d(channels, channels // 2, 1), nn.Conv2d(channels // 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(dim=(2, 3), keepdim=True)))))


class AttentionGateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.gate, self.body, self.head = nn.Conv2d(3, 8, 3), _AttentionGate(8), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.gate(torch.relu(self.stem(x))))))


def test_modules_named_like_attention_without_heads_are_pruned_like_any_other():
    """Only attention with heads (a head count or size, a config) keeps its layers out of channel
    groups: a model named AttentionGateNet, or CBAM's gate, is no attention."""
    pruner = PDPPruner(AttentionGateNet(), PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=torch.randn(2, 3, 10, 10))
    assert sorted(pruner.units) == ["body", "gate.squeeze", "stem"]


def test_hook_based_weight_norm_is_left_dense_and_refused_for_channels_with_the_reason():
    """HiFi-GAN's `torch.nn.utils.weight_norm` computes `weight` in a hook: left dense with the reason;
    channel pruning cannot copy such a model (PyTorch refuses), and says so."""
    def build() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch deprecates the hook-based weight_norm
            return nn.Sequential(nn.utils.weight_norm(nn.Conv1d(8, 16, 3)), nn.ReLU(), nn.Conv1d(16, 8, 3), nn.ReLU(), nn.Conv1d(8, 1, 1))

    model = build()
    with pytest.warns(UserWarning, match=r"left dense: \['0.weight'\] \(another parametrization or a hook computes them"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, schedule=IMMEDIATE))
    assert pruner.tensor_names == ["2.weight", "4.weight"] and "remove_weight_norm" in pruner.report().skipped["0.weight"]
    with pytest.raises(ValueError, match=r"PyTorch cannot copy \['0.weight'\]: tensors a hook computes"):
        PDPPruner(build(), PruningConfig(structure="channel"), example_inputs=torch.randn(2, 8, 12))
    only_hooked = nn.Sequential(build()[0])
    with pytest.raises(ValueError, match=r"nothing to prune: every selected weight is computed from other tensors: 0.weight is no Parameter"):
        PDPPruner(only_hooked, PruningConfig())


def test_transposed_convs_hold_n_m_groups_within_each_of_their_groups():
    model = nn.Sequential(nn.ConvTranspose2d(8, 8, 3, groups=8), nn.ConvTranspose2d(8, 16, 3, groups=2), nn.Conv2d(16, 4, 1))
    with pytest.warns(UserWarning, match=r"left dense: \['0.weight'\]"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="2:4", schedule=IMMEDIATE))
    assert pruner.report().skipped["0.weight"].endswith("(dimension 0 of shape (8, 1, 3, 3), 1 per group) to be a multiple of 4")
    pruner.finalize()
    assert is_nm_sparse(model[1].weight, 2, 4, input_dim=0)


def test_macs_count_pytorch_s_fused_attention():
    """In eval mode nn.MultiheadAttention runs fused kernels that FlopCounterMode misses."""
    from pdprune import count_macs_and_parameters

    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2, enable_nested_tensor=False)
    x = torch.randn(2, 8, 32)
    projections = 2 * 8 * 2 * (3 * 32 * 32 + 32 * 32 + 2 * 32 * 64)  # batch x tokens x layers x (qkv, out, ffn)
    scores = 2 * 2 * 4 * 2 * 8 * 8 * 8  # batch x layers x heads x (q k^T, p v) x tokens^2 x head width
    assert count_macs_and_parameters(model, x)[0] == projections + scores
    assert torch.backends.mha.get_fastpath_enabled()


def test_a_checkpoint_holding_the_group_state_under_every_gated_tensor_loads_strictly():
    """The first 0.1.0 saved each channel group's state under all its gated tensors (now under the first):
    such a checkpoint still loads with strict=True, and the group state it holds is the one used."""
    def pruned():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        return model, PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(1, 3, 8, 8))

    model, pruner = pruned()
    for _ in range(3):
        pruner.step()
    state = model.state_dict()
    owner = [key for key in state if ".group." in key]
    assert owner and all(key.startswith("0.parametrizations.weight.0.group.") for key in owner)
    for key in owner:  # the old layout: a copy under every other gated tensor of the group
        for other in ("0.parametrizations.bias.0.", "1.parametrizations.weight.0.", "1.parametrizations.bias.0."):
            state[key.replace("0.parametrizations.weight.0.", other)] = state[key].clone()
    fresh, _ = pruned()
    fresh.load_state_dict(state, strict=True)
    assert fresh.state_dict()[owner[0]] == state[owner[0]] > 0
    example = torch.randn(2, 3, 8, 8)
    assert torch.equal(fresh.eval()(example), model.eval()(example))


class _TiedLanguageModel(nn.Module):
    """An output layer tied to an embedding whose padding row is zero, and a bias buffer on the logits
    (Marian's final_logits_bias): the zero row is a class of the output, not a pruned channel."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=0)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("logits_bias", torch.randn(1, 20))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        return self.head(hidden + self.down(torch.relu(self.up(hidden)))) + self.logits_bias


def test_compact_keeps_zero_channels_the_outputs_need_and_removes_the_pruned_ones():
    torch.manual_seed(0)
    model, ids = _TiedLanguageModel(), torch.randint(1, 20, (2, 6))
    with pytest.warns(UserWarning, match="left dense"):
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=0)),
                           example_inputs=ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hard cut of an untrained soft mask
        pruner.finalize()
    with pytest.warns(UserWarning, match=r"compact\(\) keeps the zero channels or heads of \['head'\]"):
        small = compact(model.eval(), ids)
    assert small.up.out_features == 8 and small.head.out_features == 20
    torch.testing.assert_close(small(ids), model(ids))


class _CountsMarkers(nn.Module):
    """A model whose inputs' values decide whether it runs: as many marker tokens as feature rows (a
    multimodal model's image tokens)."""

    MARKER = 7

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.project = nn.Embedding(10, 8), nn.Linear(4, 8)
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        markers = ids == self.MARKER
        if int(markers.sum()) != features.shape[0]:
            raise ValueError(f"{int(markers.sum())} marker tokens for {features.shape[0]} feature rows")
        hidden = hidden.masked_scatter(markers.unsqueeze(-1), self.project(features))
        return self.down(torch.relu(self.up(hidden))).mean(dim=1)


def test_a_model_whose_inputs_values_decide_whether_it_runs_reloads(tmp_path):
    torch.manual_seed(0)
    ids = torch.tensor([[1, 7, 7, 2], [3, 7, 4, 5]])
    example = (ids, torch.randn(3, 4))
    model = _CountsMarkers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example).finalize()
    small = compact(model.eval(), example)
    save_compacted(tmp_path / "small.pt", small, example)
    reloaded = load_compacted(tmp_path / "small.pt", _CountsMarkers()).eval()
    assert reloaded.up.out_features == small.up.out_features == 8
    torch.testing.assert_close(reloaded(*example), model(*example))
    again = load_compacted(tmp_path / "small.pt", _CountsMarkers(), example_inputs=(torch.tensor([[7, 1]]), torch.randn(1, 4))).eval()
    torch.testing.assert_close(again(*example), model(*example))


class _SummedIntoLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.norm, self.head = nn.Linear(8, 16), nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.left(x) + self.right(x)))


def test_a_group_left_dense_names_all_its_layers_and_the_one_that_keeps_it():
    with pytest.raises(ValueError, match="nothing left to prune") as caught:
        PDPPruner(_SummedIntoLayerNorm(), PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(2, 8))
    assert "the coupled layer 'norm' (LayerNorm) is not one whose channels pdprune removes" in str(caught.value)
    assert "(the group's other layers: ['right'])" in str(caught.value)


def test_compact_refuses_a_model_whose_outputs_vary_from_call_to_call():
    class Sampling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x))) + torch.rand(2)

    with pytest.raises(ValueError, match="Sampling gives other outputs at every call on the same example_inputs"):
        compact(Sampling(), torch.randn(3, 4))


def test_save_compacted_names_example_inputs_it_cannot_store_and_old_files_say_what_they_lack(tmp_path):
    model, ids = _CountsMarkers(), torch.tensor([[1, 7, 2]])
    example = (ids, torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"save_compacted\(\) stores example_inputs that are a tensor.*holds a bool"):
        save_compacted(tmp_path / "small.pt", model, {"ids": ids, "features": example[1], "use_cache": False})
    save_compacted(tmp_path / "small.pt", model, example)
    state = torch.load(tmp_path / "small.pt", weights_only=True)
    for item in state["example_inputs"]["inputs"]:
        item.pop("values", None)  # as files of earlier versions
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=r"example_inputs=\.\.\. if it needs input values to run: this file, written by an earlier pdprune"):
        load_compacted(tmp_path / "old.pt", _CountsMarkers())
    assert isinstance(load_compacted(tmp_path / "old.pt", _CountsMarkers(), example_inputs=example), _CountsMarkers)


def test_a_failed_load_compacted_leaves_no_hook_behind(tmp_path):
    """Torch-Pruning traces with forward hooks; a trace that fails on the wrong model must not leave them."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    example = torch.randn(2, 8)
    PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=example).finalize()
    save_compacted(tmp_path / "small.pt", compact(model, example), example)

    class BreaksWhenTraced(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if any(module._forward_hooks for module in self.modules()):
                raise RuntimeError("traced")
            return super().forward(x)

    other = BreaksWhenTraced(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="does not fit this architecture"):
        load_compacted(tmp_path / "small.pt", other)
    assert not any(module._forward_hooks for module in other.modules()) and other[0].out_features == 16


@dataclasses.dataclass
class _Prediction:
    logits: torch.Tensor


class _ReturnsADataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> _Prediction:
        return _Prediction(self.head(self.body(x)))


def test_a_model_returning_a_plain_dataclass_is_pruned_by_channels_and_compacts_exactly():
    """Its tensors are outputs like a tuple's (pytree does not open a plain @dataclass)."""
    torch.manual_seed(0)
    model, x = _ReturnsADataclass(), torch.randn(4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the head's channels are the model's outputs: left dense
        pruner = PDPPruner(model, PruningConfig(sparsity=0.5, structure="channel", schedule=IMMEDIATE), example_inputs=x)
    assert sorted(pruner.units) == ["body.0", "body.2"]
    pruner.finalize()
    expected = model(x).logits
    compacted = compact(model, x)
    assert compacted.body[0].out_features == 8
    torch.testing.assert_close(compacted(x).logits, expected)


class _UnscaledNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(8, affine=False)
        self.second = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.second(torch.relu(self.norm(self.first(x))))).mean((2, 3)))


def test_channels_into_a_batchnorm_without_affine_parameters_stay_dense_with_the_reason():
    """Its running mean, 0 when fresh, makes a zeroed channel a constant once trained, which compaction
    cannot remove: refused at attach, not found out after training."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="channel groups left dense"):
        pruner = PDPPruner(_UnscaledNorm(), PruningConfig(sparsity=0.5, structure="channel", exclude=("head",)),
                           example_inputs=torch.randn(4, 3, 8, 8))
    assert list(pruner.units) == ["second"]
    assert "removing them changes the outputs" in pruner.report().skipped["channel group first"]


class _ConvsIntoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 16, 3, padding=1)
        self.second = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(torch.relu(self.second(torch.relu(self.first(x)))).mean((2, 3)))))


@pytest.mark.parametrize("n_m_layer, dense_group", [("fc", "second"), ("second", "first")])
def test_channels_an_n_m_layer_reads_stay_dense_so_that_compaction_keeps_its_groups_of_m(n_m_layer, dense_group):
    torch.manual_seed(0)
    model, x = _ConvsIntoLinear().eval(), torch.randn(2, 3, 8, 8)
    config = PruningConfig(sparsity=0.5, structure="channel", layer_structures={n_m_layer: "2:4"}, exclude=("head",), schedule=IMMEDIATE)
    with pytest.warns(UserWarning, match="channel groups left dense"):
        pruner = PDPPruner(model, config, example_inputs=x)
    assert f"its channels are inputs of ['{n_m_layer}'], pruned N:M" in pruner.report().skipped[f"channel group {dense_group}"]
    pruner.finalize()
    compacted = compact(model, x)
    assert is_nm_sparse(compacted.get_submodule(n_m_layer).weight, 2, 4)


class _OddBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 16)
        self.second = nn.Linear(16, 4)
        self.register_buffer("offset", torch.zeros(1).expand(8), persistent=False)  # one memory location, stride 0
        self.register_buffer("unused", torch.empty(3, device="meta"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.relu(self.first(x + self.offset)))


def test_an_expanded_or_meta_buffer_does_not_stop_the_removal_check():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = PDPPruner(_OddBuffers(), PruningConfig(sparsity=0.5, structure="channel"), example_inputs=torch.randn(2, 8))
    assert list(pruner.units) == ["first"]
