from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdprune.masks import (
    channel_squared_norms,
    group_along_inputs,
    hard_keep_mask,
    is_nm_sparse,
    midpoint_threshold,
    pruned_count,
    inverse_temperature,
    masked_weight,
    soft_mask,
    temperature_for,
)


def _threshold(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = weight.square().reshape(1, -1)
    return midpoint_threshold(flat, pruned_count(sparsity, flat.shape[-1]))


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(2, 400),
    sparsity=st.floats(0.0, 0.999),
    temperature=st.floats(1e-6, 10.0),
    relative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_threshold_splits_pruned_from_kept_and_mask_is_half_at_threshold(numel, sparsity, temperature, relative, seed):
    weight = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pruned = pruned_count(sparsity, numel)
    if not 0 < pruned < numel:
        return
    magnitudes = weight.abs().sort().values
    t = _threshold(weight, sparsity).squeeze()
    assert magnitudes[pruned - 1] <= t <= magnitudes[pruned]
    tau = temperature_for(t, temperature, relative)
    torch.testing.assert_close(soft_mask(t.square(), t, tau), torch.full_like(t, 0.5))
    mask = soft_mask(weight.square(), t, tau)
    order = weight.abs().argsort()
    assert bool((mask[order].diff() >= 0).all()), "m must be monotone in |w|"
    assert bool(((mask >= 0.5) == (weight.abs() >= t)).all())


def test_threshold_is_the_midpoint_of_the_two_magnitudes_around_the_cut():
    weight = torch.tensor([0.1, -0.4, 0.2, 0.8, -0.3])
    t = _threshold(weight, 0.4)  # prune 2 of 5: |0.1|, |0.2|; smallest kept |−0.3|
    torch.testing.assert_close(t, torch.tensor([[0.25]]))


def test_gradient_of_masked_weight_matches_closed_form():
    weight = torch.randn(200, dtype=torch.float64, requires_grad=True)
    t = _threshold(weight.detach(), 0.7).squeeze()
    tau = 0.01
    masked = weight * soft_mask(weight.square(), t, tau)
    (gradient,) = torch.autograd.grad(masked.sum(), weight)
    m = soft_mask(weight.detach().square(), t, tau)
    expected = m + (2 * weight.detach().square() / tau) * m * (1 - m)
    torch.testing.assert_close(gradient, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda w: w * soft_mask(w.square(), t, tau), (weight,))


def test_straight_through_keeps_the_forward_and_lets_pruned_weights_learn_as_if_kept():
    weight = torch.randn(200, dtype=torch.float64, requires_grad=True)
    t = _threshold(weight.detach(), 0.7).squeeze()
    sharp = (t.square(), inverse_temperature(t.square(), 1e-6, relative=True))  # tau = 1e-6 t^2, nearly hard: PDP's own gradient below t is about 0
    masked = masked_weight(weight, *sharp)
    upstream = torch.randn(200, dtype=torch.float64)
    (plain,) = torch.autograd.grad(masked, weight, upstream)
    through = masked_weight(weight, *sharp, straight_through=True)
    torch.testing.assert_close(through, masked, rtol=0, atol=0)
    (gradient,) = torch.autograd.grad(through, weight, upstream)
    m = masked.detach() / weight.detach()
    torch.testing.assert_close(gradient, plain + (1 - m) * upstream)
    pruned = weight.detach().abs() < t
    assert float(plain[pruned].abs().max()) < 1e-12, "without it, pruned weights get no gradient"
    torch.testing.assert_close(gradient[pruned], upstream[pruned])


def test_a_sharp_mask_with_a_soft_gradient_has_the_sharp_values_and_a_bounded_slope():
    # a group of 1:4 whose two largest weights nearly tie: t lies between them, 5e-5 from each
    weight = torch.tensor([1.0, 1.0 + 1e-4, 0.1, 0.2], dtype=torch.float64, requires_grad=True)
    t = midpoint_threshold(weight.detach().square().reshape(1, -1), 3).squeeze()
    sharp_tau, soft_tau = 5e-5 * t.square(), 0.05 * t.square()
    sharp = weight * soft_mask(weight.square(), t, sharp_tau)
    surrogate = weight * soft_mask(weight.square(), t, sharp_tau, soft_tau)
    torch.testing.assert_close(surrogate, sharp)
    (sharp_gradient,) = torch.autograd.grad(sharp.sum(), weight)
    (surrogate_gradient,) = torch.autograd.grad(surrogate.sum(), weight)
    assert float(sharp_gradient.abs().max()) > 1000, "the sharpened mask's own slope at t"
    assert float(surrogate_gradient.abs().max()) < 1 + 2 / 0.05 / 4 + 1e-6  # m + (2 w^2 / tau) m (1 - m), at most
    soft = soft_mask(weight.detach().square(), t, soft_tau)
    m = soft_mask(weight.detach().square(), t, sharp_tau)
    torch.testing.assert_close(surrogate_gradient, m + 2 * weight.detach().square() / soft_tau * soft * (1 - soft))


@pytest.mark.parametrize("scale", [1e20, 1e-30, 0.0])
@pytest.mark.parametrize("relative", [True, False])
def test_no_nan_for_extreme_weights(scale, relative):
    weight = torch.tensor([scale, -scale, 1.0, 1e-3, 0.0, 2.0], requires_grad=True)
    t = _threshold(weight.detach(), 0.5)
    tau = temperature_for(t, 1e-4, relative)
    masked = weight * soft_mask(weight.square(), t, tau)
    masked.sum().backward()
    assert torch.isfinite(masked).all() and torch.isfinite(weight.grad).all()


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), numel=st.integers(1, 60), data=st.data())
def test_hard_mask_prunes_exactly_the_smallest(rows, numel, data):
    pruned = data.draw(st.integers(0, numel))
    # Few distinct values force ties; the count must still be exact and deterministic.
    values = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=rows * numel, max_size=rows * numel)))
    scores = values.float().reshape(rows, numel)
    keep = hard_keep_mask(scores, pruned)
    assert bool(((~keep).sum(dim=-1) == pruned).all())
    if 0 < pruned < numel:
        assert bool((scores.masked_fill(keep, -1).amax(-1) <= scores.masked_fill(~keep, 99).amin(-1)).all())
    assert torch.equal(keep, hard_keep_mask(scores.clone(), pruned))


def test_hard_mask_breaks_ties_by_lower_index_first():
    keep = hard_keep_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 2)
    assert keep.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("shape,m", [((6, 8), 4), ((5, 8, 3, 3), 4), ((4, 16, 3), 8), ((2, 8, 1, 1, 1), 2)])
def test_grouping_along_inputs_round_trips_and_groups_input_channels(shape, m):
    weight = torch.randn(shape)
    groups = group_along_inputs(weight, m)  # (groups, m, positions)
    assert groups.shape[1] == m and groups.data_ptr() == weight.data_ptr(), "a view of the weight"
    torch.testing.assert_close(groups.reshape(weight.shape), weight)
    # The first group holds input channels 0..m-1 of output 0 at the first kernel position.
    first = weight[0, :m].reshape(m, -1)[:, 0]
    torch.testing.assert_close(groups[0, :, 0], first)
    # Another: input channels m..2m-1 of the last output at the last kernel position.
    last = weight[-1, m : 2 * m].reshape(m, -1)[:, -1]
    torch.testing.assert_close(groups[weight.shape[1] // m * (weight.shape[0] - 1) + 1, :, -1], last)


def test_grouping_rejects_an_input_dimension_not_divisible_by_m():
    with pytest.raises(ValueError, match=r"input dimension \(6\).*not a multiple of m=4"):
        group_along_inputs(torch.randn(3, 6), 4)


def test_nm_checker():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert is_nm_sparse(weight, 2, 4)
    assert not is_nm_sparse(weight, 1, 4)
    assert not is_nm_sparse(torch.ones(2, 6), 2, 4)


def test_channel_squared_norms():
    weight = torch.arange(12.0).reshape(3, 2, 2)
    torch.testing.assert_close(channel_squared_norms(weight), weight.square().sum(dim=(1, 2)))


def test_pruned_count_rounds():
    assert pruned_count(0.9, 10) == 9
    assert pruned_count(0.7, 10) == 7
    assert pruned_count(0.0, 10) == 0
    assert pruned_count(1 / 3, 3) == 1
    assert math.isclose(pruned_count(0.5, 1001), 500)


def test_midpoint_threshold_rejects_empty_selection():
    with pytest.raises(ValueError, match=r"pruned must be in \(0, 4\)"):
        midpoint_threshold(torch.ones(1, 4), 0)
