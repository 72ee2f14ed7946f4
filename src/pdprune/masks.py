"""The pure tensor math of PDP (Cho, Adya, Naik, NeurIPS 2023): thresholds, soft masks, hard masks.

Every function takes tensors and numbers and returns new tensors; nothing here knows about modules.
Selections run along the last dimension of a tensor of scores: the whole flattened weight for
unstructured pruning, each group of M weights for N:M, the vector of channel scores for channels.
Scores are *squared* magnitudes, so that the soft mask is m = sigmoid((s - t^2) / tau) with no square
root on the gradient path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "pruned_count",
    "midpoint_threshold",
    "order_statistics",
    "band_order_statistics",
    "midpoint",
    "temperature_for",
    "soft_mask",
    "masked_weight",
    "inverse_temperature",
    "soft_mask_from_inverse",
    "KEEP_OUTPUT_FROM",
    "group_threshold_squares",
    "batched_order_statistics",
    "hard_keep_mask",
    "group_along_inputs",
    "nm_keep_mask",
    "is_nm_sparse",
    "channel_squared_norms",
]


def pruned_count(sparsity: float, total: int) -> int:
    """How many of `total` entries a `sparsity` prunes: round(sparsity * total), the one rounding rule."""
    return int(round(sparsity * total))


def midpoint_threshold(squared_scores: Tensor, pruned: int) -> Tensor:
    """Magnitude threshold halfway between the largest pruned and the smallest kept score.

    Args:
        squared_scores: (..., n) squared magnitudes; the selection runs along the last dimension.
        pruned: how many entries of each row fall in the pruned fraction, 0 < pruned < n.
    Returns:
        (..., 1) thresholds t on the magnitude scale (not squared), without gradient.
    """
    n = squared_scores.shape[-1]
    if not 0 < pruned < n:
        raise ValueError(f"pruned must be in (0, {n}) for rows of {n} scores, got {pruned}")
    ordered = squared_scores.detach().sort(dim=-1).values
    largest_pruned = ordered[..., pruned - 1 : pruned].sqrt()
    smallest_kept = ordered[..., pruned : pruned + 1].sqrt()
    return (largest_pruned + smallest_kept) / 2


def order_statistics(squared_scores: Tensor, pruned: int) -> tuple[Tensor, Tensor]:
    """The `pruned`-th and (`pruned`+1)-th smallest along the last dimension: the values a sort gives,
    from two selections (on CUDA one sort: its kthvalue gives each row one thread block). No host
    synchronization.

    Returns:
        Two (..., 1) tensors: the largest pruned and the smallest kept squared score.
    """
    values = squared_scores.detach()
    if values.is_cuda:
        ordered = values.sort(dim=-1).values
        return ordered[..., pruned - 1 : pruned], ordered[..., pruned : pruned + 1]
    return values.kthvalue(pruned, dim=-1, keepdim=True).values, values.kthvalue(pruned + 1, dim=-1, keepdim=True).values


BAND_ROW = 64


def _band_rows(rows: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over (r, BAND_ROW) weights: per row, how many squares lie below `low`, how many in
    [low, high], and the smallest of those (inf if none). Counts in the weights' float type (exact up
    to BAND_ROW), which vectorizes better than integer counts."""
    squares = rows * rows
    inside = (squares >= low) & (squares <= high)
    counts_below = (squares < low).to(rows.dtype).sum(dim=1)
    return counts_below, inside.to(rows.dtype).sum(dim=1), torch.where(inside, squares, torch.inf).amin(dim=1)


def band_order_statistics(weight: Tensor, pruned: int, low: float, high: float, fused: bool = True) -> tuple[Tensor, Tensor, int] | None:
    """The same two order statistics of the squared weights (and the band's size) when both lie in
    [low, high], else None.

    Weights move little per training step, so a narrow band around the last threshold holds the new
    one: counting the squares below it and selecting among the few inside gives the very values a sort
    would, in passes without a branch on the data (a selection's comparisons are unpredictable branches,
    which make it cost several times a pass from a few ten thousand weights up). With `fused`, one
    compiled pass counts the squares below the band and finds, per row of 64 weights, how many fall
    inside and the smallest; rows holding one band value give it directly, the few holding more are gathered.
    """
    flat = weight.detach().reshape(-1)
    if fused:
        body = flat.numel() - flat.numel() % BAND_ROW
        rows = flat[:body].view(-1, BAND_ROW)
        # the row count varies, the row length does not: inductor then splits the rows over threads
        # (with every dimension dynamic it runs them on one, and the pass takes twice as long on two)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        below_per_row, counts, minimums = _BAND(rows, torch.tensor(low, dtype=flat.dtype), torch.tensor(high, dtype=flat.dtype))  # (r,) each
        crowded = rows[counts > 1].square().reshape(-1)
        candidates = torch.cat([minimums[counts == 1], crowded[(crowded >= low) & (crowded <= high)]])
        below = int(below_per_row.sum(dtype=torch.float64))  # exact: integers far below 2^53
        if body < flat.numel():
            tail = flat[body:].square()
            candidates = torch.cat([candidates, tail[(tail >= low) & (tail <= high)]])
            below += int((tail < low).sum())
    else:
        squares = flat.square()
        candidates = squares[(squares >= low) & (squares <= high)]
        below = int((squares < low).sum())
    rank = pruned - below  # position of the largest pruned inside the band
    if rank < 1 or rank + 1 > candidates.numel():
        return None
    return candidates.kthvalue(rank).values.reshape(1), candidates.kthvalue(rank + 1).values.reshape(1), candidates.numel()


def midpoint(largest_pruned: Tensor, smallest_kept: Tensor) -> Tensor:
    """The threshold t on the magnitude scale, halfway between two squared scores."""
    return (largest_pruned.sqrt() + smallest_kept.sqrt()) / 2


def temperature_for(threshold: Tensor, temperature: float, relative: bool) -> Tensor | float:
    """The tau of the soft mask: absolute as in the paper, or relative to t^2 so that one value suits
    layers of any weight scale. A zero threshold falls back to the smallest normal float, never 0."""
    if not relative:
        return temperature
    return (temperature * threshold.square()).clamp_min(torch.finfo(threshold.dtype).tiny)


def soft_mask(
    squared_scores: Tensor, threshold: Tensor, temperature: Tensor | float, gradient_temperature: Tensor | float | None = None
) -> Tensor:
    """PDP's soft mask exp(s/tau) / (exp(s/tau) + exp(t^2/tau)) = sigmoid((s - t^2) / tau).

    Stable for every finite input (sigmoid saturates instead of overflowing). Gradients flow through
    `squared_scores`; `threshold` and `temperature` are constants of the step. With
    `gradient_temperature`, the values are those of `temperature` and the gradient that of the mask at
    `gradient_temperature` (a surrogate gradient: a sharpened mask keeps a soft mask's slope).
    """
    shifted = squared_scores - threshold.square()
    mask = torch.sigmoid(shifted / temperature)
    if gradient_temperature is None:
        return mask
    slope = torch.sigmoid(shifted / gradient_temperature)
    return slope + (mask - slope).detach()


def inverse_temperature(threshold_squared: Tensor, temperature: Tensor | float, relative: bool, compiled: bool = False) -> Tensor:
    """1 / tau for each threshold, finite and above 0, so that m = sigmoid((s - t^2) * (1 / tau)) costs a
    multiply, not a divide, and the sentinels t^2 = -inf (m = 1) and +inf (m = 0) give no NaN.

    Args:
        threshold_squared: t^2, any shape (one per threshold).
        temperature: tau / t^2 if `relative`, else tau (a number or a tensor that broadcasts).
        compiled: one fused kernel instead of four passes (worth it for one threshold per N:M group).
    Returns:
        A tensor of the shape of `threshold_squared`.
    """
    return (_INVERSE if compiled else _inverse_temperature)(threshold_squared, temperature, relative)


def _inverse_temperature(threshold_squared: Tensor, temperature: Tensor | float, relative: bool) -> Tensor:
    finite = torch.finfo(threshold_squared.dtype)
    if relative:
        tau = temperature * threshold_squared
    else:
        tau = torch.as_tensor(temperature, dtype=threshold_squared.dtype, device=threshold_squared.device).expand_as(threshold_squared)
    return (1 / tau.clamp(finite.tiny, finite.max)).clamp(finite.tiny, finite.max)


def soft_mask_from_inverse(
    squared_scores: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, gradient_inverse_tau: Tensor | None = None
) -> Tensor:
    """m = sigmoid((s - t^2) / tau) (the channel masks' fast form of `soft_mask`), with the slope of the mask
    at `gradient_inverse_tau` in the backward if given. Gradients flow through `squared_scores`."""
    shifted = squared_scores - threshold_squared
    mask = torch.sigmoid(shifted * inverse_tau)
    if gradient_inverse_tau is None:
        return mask
    slope = torch.sigmoid(shifted * gradient_inverse_tau)
    return slope + (mask - slope).detach()


def _mask_of(weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor) -> Tensor:
    return torch.sigmoid((weight * weight - threshold_squared) * inverse_tau)


def _masked_weight_forward(weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor) -> Tensor:
    return weight * _mask_of(weight, threshold_squared, inverse_tau)


LOG2_E = math.log2(math.e)


def _fused_masked_weight_forward(weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor) -> Tensor:
    """w * m(w) with exp((t^2 - w^2) / tau) as a power of two, for compiled kernels: a CPU's vectorized
    exp2 costs less than the sigmoid's exp (eagerly, its extra operations cost more than they save).
    1 / tau is at most 1 / the smallest normal float, so 1 / tau * log2(e) stays finite."""
    return weight / (1 + torch.exp2((threshold_squared - weight * weight) * (inverse_tau * LOG2_E)))


def _recovered_mask(weight: Tensor, output: Tensor, threshold_squared: Tensor, inverse_tau: Tensor) -> Tensor:
    """m from the output (m = out / w): no exp, and nothing kept but the output, which the layer keeps
    for its own backward anyway. Where w = 0, m = sigmoid(-t^2 / tau)."""
    return torch.where(weight != 0, output / weight, torch.sigmoid(-threshold_squared * inverse_tau))


def _local_gradient(weight: Tensor, mask: Tensor, slope: Tensor, slope_inverse_tau: Tensor, straight_through: bool) -> Tensor:
    # d(w m)/dw = m + 2 w^2 s (1 - s) / tau, s the mask at the slope's temperature (s = m without a
    # surrogate); s (1 - s) / tau is formed first: a saturated mask gives 0 however small tau is.
    local = torch.addcmul(mask, slope * (1 - slope) * slope_inverse_tau, weight * weight, value=2)
    return local + (1 - mask) if straight_through else local


def _masked_weight_backward(
    grad: Tensor, weight: Tensor, output: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, straight_through: bool
) -> Tensor:
    mask = _recovered_mask(weight, output, threshold_squared, inverse_tau)
    return grad * _local_gradient(weight, mask, mask, inverse_tau, straight_through)


def _masked_weight_backward_surrogate(
    grad: Tensor, weight: Tensor, output: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, gradient_inverse_tau: Tensor,
    straight_through: bool,
) -> Tensor:
    mask = _recovered_mask(weight, output, threshold_squared, inverse_tau)
    slope = _mask_of(weight, threshold_squared, gradient_inverse_tau)
    return grad * _local_gradient(weight, mask, slope, gradient_inverse_tau, straight_through)


def _masked_weight_expression(
    weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, gradient_inverse_tau: Tensor | None, straight_through: bool,
) -> Tensor:
    """The same values and gradients through autograd's own rules: what `torch.compile` traces and fuses
    for small tensors (fewer kernels than the custom function's backward)."""
    mask = _mask_of(weight, threshold_squared, inverse_tau)
    if gradient_inverse_tau is not None:  # the values of `mask`, the slope of the mask at the gradient temperature
        slope = _mask_of(weight, threshold_squared, gradient_inverse_tau)
        mask = slope + (mask - slope).detach()
    output = weight * mask
    if straight_through:  # value w m; gradient as if the pruned part (1 - m) were kept too
        rest = weight * (1 - mask).detach()
        output = output + (rest - rest.detach())
    return output


KEEP_OUTPUT_FROM = 1 << 18
"""In eager mode, tensors of at least this many elements keep only their output for the backward and
recover m from it; smaller ones keep m itself (one more small tensor, and fewer operations in the
backward). Inside a compiled model such tensors keep their output too, which the layer keeps anyway;
smaller ones are left to autograd's rule of the expression, which compiles to fewer kernels."""


class _MaskedWeight(torch.autograd.Function):
    """w * sigmoid((w^2 - t^2) / tau) with its gradient, in one pass each way."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, gradient_inverse_tau: Tensor | None,
        straight_through: bool, compiled: bool, keep_output: bool,
    ) -> Tensor:
        if keep_output:  # traced into a compiled model's graph, the fused form is fused into the layer
            forward = _fused_masked_weight_forward if torch.compiler.is_compiling() else _FORWARD if compiled else _masked_weight_forward
            output = saved = forward(weight, threshold_squared, inverse_tau)
        else:
            saved = _mask_of(weight, threshold_squared, inverse_tau)
            output = weight * saved
        ctx.save_for_backward(weight, saved, threshold_squared, inverse_tau, gradient_inverse_tau)
        ctx.settings = (straight_through, compiled, keep_output)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, saved, threshold_squared, inverse_tau, gradient_inverse_tau = ctx.saved_tensors
        straight_through, compiled, keep_output = ctx.settings
        grad = grad.contiguous()
        if keep_output and gradient_inverse_tau is None:
            kernel = _BACKWARD if compiled else _masked_weight_backward
            gradient = kernel(grad, weight, saved, threshold_squared, inverse_tau, straight_through)
        elif keep_output:
            kernel = _BACKWARD_SURROGATE if compiled else _masked_weight_backward_surrogate
            gradient = kernel(grad, weight, saved, threshold_squared, inverse_tau, gradient_inverse_tau, straight_through)
        else:
            slope, slope_inverse_tau = (saved, inverse_tau) if gradient_inverse_tau is None else (
                _mask_of(weight, threshold_squared, gradient_inverse_tau), gradient_inverse_tau)
            gradient = grad * _local_gradient(weight, saved, slope, slope_inverse_tau, straight_through)
        return gradient, None, None, None, None, None, None


def masked_weight(
    weight: Tensor, threshold_squared: Tensor, inverse_tau: Tensor, *, gradient_inverse_tau: Tensor | None = None,
    straight_through: bool = False, compiled: bool = False,
) -> Tensor:
    """PDP's w * m(w) with m = sigmoid((w^2 - t^2) / tau): the values of `soft_mask` with `temperature_for`.

    Every argument that changes during training is a tensor, so that nothing here reads a value back to
    the host or branches on one, and `torch.compile` compiles it once for the whole run. In eager mode
    one fused function keeps little for the backward (`KEEP_OUTPUT_FROM`); under `torch.compile` it is
    traced into the model's graph and fused into the layer, and for large tensors its backward recovers
    m from the output (which the layer keeps for its own backward): a division, where autograd's rule of
    the expression would compute the exponential again, the most costly part of PDP's elementwise work.

    Args:
        weight: any shape.
        threshold_squared: t^2, broadcastable against `weight` (0-dim, or one per group with a size-1
            dimension); -inf keeps every weight (m = 1), +inf prunes every weight (m = 0).
        inverse_tau: 1 / tau (`inverse_temperature`), broadcastable likewise.
        gradient_inverse_tau: if given, the backward uses the slope of the mask at this 1 / tau
            (`soft_mask`'s surrogate gradient); the values stay those of `inverse_tau`.
        straight_through: each weight also gets (1 - m) times the gradient of its masked value, so a
            pruned weight learns as if kept (SR-STE's estimator, Zhou et al. 2021; not in the PDP paper).
        compiled: run the two elementwise passes as `torch.compile` kernels (worth it on large tensors).
    Returns:
        w * m(w), the shape of `weight`.
    """
    if torch.compiler.is_compiling():
        if weight.numel() < KEEP_OUTPUT_FROM:
            return _flattened(_masked_weight_expression, weight, threshold_squared, inverse_tau, gradient_inverse_tau, straight_through)
        return _flattened(_MaskedWeight.apply, weight, threshold_squared, inverse_tau, gradient_inverse_tau, straight_through, False, True)
    keep_output = compiled or weight.numel() >= KEEP_OUTPUT_FROM
    return _MaskedWeight.apply(weight, threshold_squared, inverse_tau, gradient_inverse_tau, straight_through, compiled, keep_output)


def group_threshold_squares(groups: Tensor, pruned: int, dim: int, compiled: bool = False) -> Tensor:
    """t^2 of every group of m weights along `dim` (size m), the midpoint between its `pruned`-th and
    (`pruned`+1)-th smallest magnitudes, with `dim` kept as size 1. Ties count once each, as in a sort."""
    return (_GROUPS if compiled else _group_threshold_squares)(groups.detach(), pruned, dim)


def _group_threshold_squares(groups: Tensor, pruned: int, dim: int) -> Tensor:
    """Through an odd-even transposition sorting network on magnitudes: `where` on a comparison only, so
    it vectorizes where a sort along a tiny dimension does not, and compiles to code without a branch
    on the data (as minimum/maximum do not: their NaN checks are branches). Magnitudes, not squares:
    sqrt(x * x) == |x| in binary floating point (barring underflow), so t is the same, without a square root."""
    columns = [column.abs() for column in groups.unbind(dim)]
    for round_ in range(len(columns)):
        for i in range(round_ % 2, len(columns) - 1, 2):
            smaller = columns[i] < columns[i + 1]
            columns[i], columns[i + 1] = torch.where(smaller, columns[i], columns[i + 1]), torch.where(smaller, columns[i + 1], columns[i])
    return ((columns[pruned - 1] + columns[pruned]) / 2).square().unsqueeze(dim)


def batched_order_statistics(squares: Sequence[Tensor], pruned: Sequence[int]) -> tuple[Tensor, Tensor]:
    """The `pruned[i]`-th and (`pruned[i]`+1)-th smallest of each tensor of `squares`, for all of them
    with one sort and no host synchronization (for GPUs, where one kernel per tensor is what costs).

    Squares are non-negative, so the bit patterns of float32 order like their values: a key of
    (tensor index, bits) sorts every tensor's values into its own ascending segment.

    Args:
        squares: T tensors of non-negative float16, bfloat16 or float32 values (any shapes), one device.
        pruned: for each, 0 < pruned[i] < numel.
    Returns:
        Two (T,) float32 tensors: the largest pruned and the smallest kept value of each.
    """
    device = squares[0].device
    sizes = [values.numel() for values in squares]
    flat = torch.cat([values.detach().reshape(-1).float() for values in squares])  # (N,)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))  # (N,)
    keys = (owner << 32) | flat.view(torch.int32).to(torch.int64)  # (N,) bits of a value >= 0 fit in 31 bits
    ordered = (keys.sort().values & 0xFFFFFFFF).to(torch.int32).view(torch.float32)  # (N,) per tensor, ascending
    starts = torch.tensor([sum(sizes[:i]) + count - 1 for i, count in enumerate(pruned)], device=device)  # (T,)
    return ordered[starts], ordered[starts + 1]


def _flattened(function, weight: Tensor, *rest):
    """`function(weight, *rest)` over the flattened weight, with per-group coefficients (a size-1
    dimension) spread to one per weight. Inside a compiled model, a group's coefficients then come from
    one indexed load in a loop that runs full vectors; laid out as (groups, m, positions), a group of 4
    along the contiguous dimension fills half a vector."""
    rest = [value.expand(weight.shape).reshape(-1) if isinstance(value, Tensor) and value.dim() else value for value in rest]
    return function(weight.reshape(-1), *rest).view(weight.shape)


class _Kernel:
    """A `torch.compile`d elementwise kernel that falls back, once and for good, to eager PyTorch when
    compiling is not possible here (no C++ compiler, an unsupported backend). Shapes are dynamic: one
    compile serves every layer of the same rank, however many shapes the model has (with
    `dynamic=None`, the dimensions the caller marks with `torch._dynamo.maybe_mark_dynamic`)."""

    def __init__(self, function, dynamic: bool | None = True) -> None:
        self.function = function
        self.dynamic = dynamic
        self.compiled = None

    def __call__(self, *args):
        if self.compiled is None:
            try:
                self.compiled = torch.compile(self.function, dynamic=self.dynamic)
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                warnings.warn(f"torch.compile unavailable ({type(error).__name__}); PDP runs its kernels eagerly", stacklevel=2)
                self.compiled = self.function
        return self.compiled(*args)


_FORWARD, _BACKWARD = _Kernel(_fused_masked_weight_forward), _Kernel(_masked_weight_backward)
_BACKWARD_SURROGATE, _BAND, _GROUPS = _Kernel(_masked_weight_backward_surrogate), _Kernel(_band_rows, dynamic=None), _Kernel(_group_threshold_squares)
_INVERSE = _Kernel(_inverse_temperature)


def hard_keep_mask(squared_scores: Tensor, pruned: int) -> Tensor:
    """Boolean keep-mask zeroing exactly the `pruned` smallest scores of each row (last dimension).

    Ties are broken deterministically: among equal scores the one with the lower index is pruned
    first (a stable sort), so every process and every run agrees on the mask.
    """
    n = squared_scores.shape[-1]
    if not 0 <= pruned <= n:
        raise ValueError(f"pruned must be in [0, {n}] for rows of {n} scores, got {pruned}")
    order = squared_scores.detach().argsort(dim=-1, stable=True)
    rank = torch.empty_like(order)
    positions = torch.arange(n, device=order.device).expand_as(order)
    rank.scatter_(-1, order, positions)
    return rank >= pruned


def group_along_inputs(weight: Tensor, m: int, input_dim: int = 1) -> Tensor:
    """Groups of `m` consecutive weights along the input dimension, as sparse hardware lays them out.

    A reshape, never a copy of a contiguous weight: Linear (out, in) -> (out * in // m, m, 1); Conv
    (out, in, *kernel) -> (out * in // m, m, prod(kernel)), so that each group spans `m` input channels
    at one kernel position; a layer that stores (in, out) (`input_dim=0`) -> (in // m, m, out).
    `weight.reshape(shape)` undoes it.

    Raises:
        ValueError: the input dimension is not a multiple of `m`.
    """
    inputs = weight.shape[input_dim]
    if inputs % m:
        raise ValueError(
            f"the input dimension ({inputs}) of a weight of shape {tuple(weight.shape)} is not a "
            f"multiple of m={m}; exclude this layer or pick an m that divides {inputs}"
        )
    before, after = math.prod(weight.shape[:input_dim]), math.prod(weight.shape[input_dim + 1 :])
    return weight.reshape(before * (inputs // m), m, after)  # (groups, m, positions)


def nm_keep_mask(squared_scores: Tensor, pruned: int, m: int, input_dim: int = 1) -> Tensor:
    """`hard_keep_mask` inside every group of `m` along the input dimension: True where a score stays."""
    rows = group_along_inputs(squared_scores, m, input_dim).transpose(1, 2)  # (groups, positions, m)
    return hard_keep_mask(rows, pruned).transpose(1, 2).reshape(squared_scores.shape)


def is_nm_sparse(tensor: Tensor, n: int, m: int, input_dim: int = 1) -> bool:
    """Whether every group of `m` weights along the input dimension holds at most `n` non-zeros."""
    if tensor.dim() < 2 or tensor.shape[input_dim] % m:
        return False
    nonzeros = (group_along_inputs(tensor, m, input_dim) != 0).sum(dim=1)
    return bool((nonzeros <= n).all())


def channel_squared_norms(weight: Tensor, output_dim: int = 0) -> Tensor:
    """Squared L2 norm of each output channel's slice: (..., out, ...) -> (out,)."""
    if weight.dim() == 1:
        return weight.square()
    return weight.square().movedim(output_dim, 0).flatten(1).sum(dim=1)
