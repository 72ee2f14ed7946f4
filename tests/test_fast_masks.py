"""The fast paths against the straightforward oracle (sort-based thresholds, autograd soft mask)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pdprune import PDPPruner, PruningConfig, ScheduleConfig
from pdprune.masks import (
    band_order_statistics,
    batched_order_statistics,
    group_threshold_squares,
    KEEP_OUTPUT_FROM,
    inverse_temperature,
    masked_weight,
    midpoint_threshold,
    order_statistics,
    soft_mask,
    temperature_for,
)
from pdprune.parametrizations import BAND_FROM, NMMask, UnstructuredMask


def _masked(weight: torch.Tensor, t: torch.Tensor, temperature: float, relative: bool, gradient_temperature: float | None = None, **options) -> torch.Tensor:
    """masked_weight with the coefficients of threshold t and a temperature."""
    slope = None if gradient_temperature is None else inverse_temperature(t.square(), gradient_temperature, relative)
    return masked_weight(weight, t.square(), inverse_temperature(t.square(), temperature, relative), gradient_inverse_tau=slope, **options)


def _sorted_pair(values: torch.Tensor, pruned: int) -> tuple[torch.Tensor, torch.Tensor]:
    ordered = values.sort(dim=-1).values
    return ordered[..., pruned - 1 : pruned], ordered[..., pruned : pruned + 1]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 4), numel=st.integers(2, 300), data=st.data())
def test_order_statistics_equal_the_sort_even_with_ties(rows, numel, data):
    pruned = data.draw(st.integers(1, numel - 1))
    distinct = data.draw(st.sampled_from([3, 1000]))
    values = torch.randint(0, distinct, (rows, numel), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999)))).float()
    for fast, expected in zip(order_statistics(values, pruned), _sorted_pair(values, pruned)):
        assert torch.equal(fast, expected)


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(65, 5000), sparsity=st.floats(0.05, 0.95), width=st.floats(1e-3, 0.5), seed=st.integers(0, 999), fused=st.booleans())
def test_band_order_statistics_are_exact_or_say_they_missed(numel, sparsity, width, seed, fused):
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    weight[::7] = weight[3]  # ties
    squares = weight.square()
    pruned = max(1, min(numel - 1, round(sparsity * numel)))
    a, b = _sorted_pair(squares, pruned)
    centre = float((a + b) / 2) * (1 + (seed % 5 - 2) * width / 3)  # sometimes off-centre: may miss
    result = band_order_statistics(weight, pruned, centre * (1 - width), centre * (1 + width), fused=fused)
    inside = centre * (1 - width) <= float(a) and float(b) <= centre * (1 + width)
    if not inside:
        assert result is None
    else:
        assert result is not None
        assert torch.equal(result[0], a) and torch.equal(result[1], b)


def _assert_same_values_and_gradients(fast: torch.Tensor, fast_w: torch.Tensor, reference: torch.Tensor, reference_w: torch.Tensor) -> None:
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-15)
    upstream = torch.randn_like(fast)
    fast.backward(upstream)
    reference.backward(upstream)
    torch.testing.assert_close(fast_w.grad, reference_w.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("relative", [True, False])
def test_masked_weight_matches_the_autograd_reference_values_and_gradients(compiled, relative):
    weight = torch.randn(64, 33, dtype=torch.float64) * 0.1
    weight[0, :3] = 0.0
    t = midpoint_threshold(weight.square().reshape(1, -1), 1500).reshape(())
    tau = temperature_for(t, 0.05 if relative else 1e-3, relative)
    fast_w = weight.clone().requires_grad_()
    reference_w = weight.clone().requires_grad_()
    fast = _masked(fast_w, t, 0.05 if relative else 1e-3, relative, compiled=compiled)
    reference = reference_w * soft_mask(reference_w.square(), t, tau)
    _assert_same_values_and_gradients(fast, fast_w, reference, reference_w)


@pytest.mark.parametrize("compiled", [False, True])
def test_the_fused_surrogate_gradient_matches_the_autograd_reference(compiled):
    weight = torch.randn(64, 33, dtype=torch.float64) * 0.1
    t = midpoint_threshold(weight.square().reshape(1, -1), 1500).reshape(())
    fast_w, reference_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    fast = _masked(fast_w, t, 5e-5, True, gradient_temperature=0.05, compiled=compiled)
    reference = reference_w * soft_mask(reference_w.square(), t, temperature_for(t, 5e-5, True), temperature_for(t, 0.05, True))
    _assert_same_values_and_gradients(fast, fast_w, reference, reference_w)


@pytest.mark.parametrize("gradient_temperature", [None, 0.05])
def test_a_large_tensor_inside_a_compiled_graph_matches_the_autograd_reference(gradient_temperature):
    """From KEEP_OUTPUT_FROM weights on, the custom function is traced into the graph (exp2 forward,
    m recovered from the output in the backward): the same values and gradients as the oracle."""
    weight = torch.randn(512, 512, dtype=torch.float64) * 0.1
    assert weight.numel() >= KEEP_OUTPUT_FROM
    t = midpoint_threshold(weight.square().reshape(1, -1), 200_000).reshape(())
    tau = temperature_for(t, 5e-3, True)
    slope_tau = None if gradient_temperature is None else temperature_for(t, gradient_temperature, True)
    compiled = torch.compile(lambda w: _masked(w, t, 5e-3, True, gradient_temperature=gradient_temperature), fullgraph=True, dynamic=False)
    fast_w, reference_w = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = reference_w * soft_mask(reference_w.square(), t, tau, slope_tau)
    _assert_same_values_and_gradients(compiled(fast_w), fast_w, reference, reference_w)


@pytest.mark.parametrize("relative", [True, False])
def test_an_annealed_temperature_does_not_recompile_the_kernels(relative):
    from torch._dynamo.utils import counters

    weight = torch.randn(37, 29, requires_grad=True)  # a shape no other test compiles for
    t = midpoint_threshold(weight.detach().square().reshape(1, -1), 500).reshape(())
    graphs = []
    for temperature in (0.05, 0.01, 0.002, 4e-4):
        _masked(weight, t, temperature if relative else temperature * 0.01, relative, compiled=True).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1:] == graphs[:1] * 3  # compiled once (forward and backward), then reused at every temperature


@pytest.mark.parametrize("compiled", [False, True, "in a compiled graph"])
def test_grouped_thresholds_broadcast_in_the_fused_function(compiled):
    groups = torch.randn(10, 5, 4, dtype=torch.float64, requires_grad=True)
    t = midpoint_threshold(groups.detach().square(), 2)  # (10, 5, 1): one threshold per group
    tau = temperature_for(t, 0.05, True)
    if compiled == "in a compiled graph":
        function = torch.compile(lambda w: _masked(w, t, 0.05, True), fullgraph=True, dynamic=False)
    else:
        function = lambda w: _masked(w, t, 0.05, True, compiled=compiled)  # noqa: E731
    reference_w = groups.detach().clone().requires_grad_()
    _assert_same_values_and_gradients(function(groups), groups, reference_w * soft_mask(reference_w.square(), t, tau), reference_w)


def _reference_forward(mask, weight):
    """The straightforward PDP forward: sort-based threshold, autograd soft mask."""
    return weight * mask.soft_mask(weight, mask.sparsity)


@pytest.mark.parametrize("shape,structure", [((300, 256), "unstructured"), ((40, 30), "unstructured"), ((16, 32, 3, 3), "2:4"), ((64, 96), "1:4")])
def test_every_training_step_uses_the_reference_threshold_and_mask(shape, structure):
    torch.manual_seed(0)
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], 3)
    model = nn.Sequential(layer)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.9, structure=structure, schedule=ScheduleConfig(warmup_epochs=0, ramp_end_epoch=3, steps_per_epoch=4)))
    mask = layer.parametrizations.weight[0]
    assert isinstance(mask, UnstructuredMask if structure == "unstructured" else NMMask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    inputs = torch.randn(8, shape[1]) if len(shape) == 2 else torch.randn(8, shape[1], 6, 6)
    for _ in range(16):
        original = layer.parametrizations.weight.original
        torch.testing.assert_close(layer.weight, _reference_forward(mask, original), rtol=1e-5, atol=1e-7)
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()
    if structure == "unstructured" and layer.weight.numel() >= BAND_FROM:
        assert mask._band is not None, "the band path ran"


def _manual_sgd(parameters):
    parameters = list(parameters)

    class ManualSGD:  # what tutorials write: updates through .data bump no version counter, and no hook runs
        def step(self) -> None:
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.data.add_(parameter.grad, alpha=-0.5)

        def zero_grad(self) -> None:
            for parameter in parameters:
                parameter.grad = None

    return ManualSGD()


@pytest.mark.parametrize("updates", ["fused AdamW", "manual .data", "pruner stepped once per epoch"])
def test_the_thresholds_follow_every_update_of_the_weights(updates):
    """Fused optimizers change weights without bumping their version counters, and hand-written updates
    run no optimizer hook: the masks must follow all of them, as the paper's t does."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 30)
    model = nn.Sequential(layer)
    per_epoch = updates == "pruner stepped once per epoch"
    schedule = ScheduleConfig(warmup_epochs=0, ramp_end_epoch=1 if per_epoch else 3, steps_per_epoch=1 if per_epoch else 4)
    pruner = PDPPruner(model, PruningConfig(sparsity=0.9, schedule=schedule))
    mask = layer.parametrizations.weight[0]
    if updates == "manual .data":
        optimizer = _manual_sgd(model.parameters())
    elif updates == "fused AdamW":
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs = torch.randn(8, 40)
    for step in range(12):
        original = layer.parametrizations.weight.original
        version = original._version
        torch.testing.assert_close(layer.weight, _reference_forward(mask, original), rtol=1e-5, atol=1e-7, msg=f"step {step}")
        model(inputs).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if not per_epoch or step % 4 == 3:
            pruner.step()
    assert updates == "pruner stepped once per epoch" or original._version == version, "updates that bump no version counter"


def test_the_band_path_follows_moving_weights_exactly():
    weight = torch.randn(400, 400)
    mask = UnstructuredMask(weight, 0.05, True)
    mask.sparsity = 0.9
    generator = torch.Generator().manual_seed(0)
    misses = 0
    for step in range(30):
        pruned = round(0.9 * weight.numel())
        band = mask._band
        expected = midpoint_threshold(weight.square().reshape(1, -1), pruned).reshape(())
        assert torch.equal(mask.threshold_squares(weight), expected.square())
        misses += band is not None and band_order_statistics(weight, pruned, *band) is None
        weight = weight + 0.01 * torch.randn(weight.shape, generator=generator) * (10 if step == 15 else 1)
    assert misses <= 3


def test_the_fused_function_saves_no_more_than_the_weight_and_its_output_for_large_tensors():
    weight = torch.randn(512, 512, requires_grad=True)
    assert weight.numel() >= KEEP_OUTPUT_FROM
    t = midpoint_threshold(weight.detach().square().reshape(1, -1), 200_000).reshape(())
    tau = temperature_for(t, 0.05, True)

    def saved_bytes(function) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel() * tensor.element_size() if tensor.data_ptr() != weight.data_ptr() else 0)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            function()
        return sum(sizes)

    fast = saved_bytes(lambda: _masked(weight, t, 0.05, True))
    reference = saved_bytes(lambda: weight * soft_mask(weight.square(), t, tau))
    assert fast <= weight.numel() * 4 + 64, "only the output (which the layer keeps anyway) and scalars"
    assert reference >= 2 * weight.numel() * 4


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("m,pruned", [(4, 2), (4, 3), (8, 4), (8, 1), (16, 12)])
def test_group_thresholds_equal_the_sort_even_with_ties(compiled, m, pruned):
    groups = torch.randn(30, m, 7, dtype=torch.float64) * 0.1  # (groups, m, positions)
    groups[0, :, 0] = 0.25  # a group of ties
    groups[1, :2, 1] = 0.0
    groups[2, ::2, 2] = -groups[2, 1::2, 2]  # ties in magnitude, opposite signs
    expected = midpoint_threshold(groups.square().transpose(1, 2), pruned).square().transpose(1, 2)  # (groups, 1, positions)
    assert torch.equal(group_threshold_squares(groups, pruned, dim=1, compiled=compiled), expected)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(2, 400), min_size=1, max_size=6), data=st.data())
def test_batched_order_statistics_equal_a_sort_per_tensor(sizes, data):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 999)))
    squares = [torch.randint(0, data.draw(st.sampled_from([3, 1000])), (size,), generator=generator).float() / 7 for size in sizes]
    pruned = [data.draw(st.integers(1, size - 1)) for size in sizes]
    largest_pruned, smallest_kept = batched_order_statistics(squares, pruned)
    for i, (values, count) in enumerate(zip(squares, pruned)):
        a, b = _sorted_pair(values, count)
        assert float(largest_pruned[i]) == float(a) and float(smallest_kept[i]) == float(b)


def test_a_weight_changed_outside_the_optimizer_is_refreshed_in_the_next_eager_forward():
    layer = nn.Linear(64, 64)
    PDPPruner(nn.Sequential(layer), PruningConfig(sparsity=0.5, schedule=ScheduleConfig(warmup_epochs=0, ramp_rate=1.0)))
    mask = layer.parametrizations.weight[0]
    torch.testing.assert_close(layer.weight, _reference_forward(mask, layer.parametrizations.weight.original))
    assert not mask.is_stale(layer.parametrizations.weight.original)
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(1.5).add_(torch.randn(64, 64))
    assert mask.is_stale(layer.parametrizations.weight.original)
    torch.testing.assert_close(layer.weight, _reference_forward(mask, layer.parametrizations.weight.original))


def test_a_large_nm_layer_takes_the_compiled_kernels_and_computes_what_the_eager_ones_do():
    """Above COMPILE_FROM weights, 1/tau of every group comes from one fused kernel: same values, same gradient."""
    weight = torch.randn(512, 1024, dtype=torch.float32)
    results = []
    for compiled in (False, True):
        mask = NMMask(2, 4, weight, 0.05, True, compile_kernels=compiled)
        assert mask._compiled(weight) == compiled
        mask.sparsity = 0.5
        with torch.no_grad():
            mask.threshold_squared.copy_(mask.threshold_squares(weight))
        leaf = weight.clone().requires_grad_()
        out = mask._masked(leaf)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), leaf.grad))
    (eager_out, eager_grad), (fast_out, fast_grad) = results
    torch.testing.assert_close(fast_out, eager_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fast_grad, eager_grad, rtol=1e-5, atol=1e-6)
    expected = weight * NMMask(2, 4, weight, 0.05, True, compile_kernels=False).soft_mask(weight, 0.5)
    torch.testing.assert_close(fast_out, expected, rtol=1e-5, atol=1e-6)
