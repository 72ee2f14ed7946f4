"""The pure tensor math of PDP (Cho, Adya, Naik, NeurIPS 2023): thresholds, soft masks, hard masks.

Every function takes tensors and numbers and returns new tensors; nothing here knows about modules.
Selections run along the last dimension of a tensor of scores: the whole flattened weight for
unstructured pruning, each group of M weights for N:M, the vector of channel scores for channels.
Scores are *squared* magnitudes, so that the soft mask is m = sigmoid((s - t^2) / tau) with no square
root on the gradient path.
"""

from __future__ import annotations

import warnings

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
    "group_thresholds",
    "hard_keep_mask",
    "group_along_inputs",
    "ungroup_along_inputs",
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
    """The `pruned`-th and (`pruned`+1)-th smallest along the last dimension, with one selection.

    Same values as sorting: a kth-value selection for the first, then the smallest score above it
    (or the same value when it is tied with the next one); on CUDA, one sort. No host synchronization.

    Returns:
        Two (..., 1) tensors: the largest pruned and the smallest kept squared score.
    """
    values = squared_scores.detach()
    if values.is_cuda:  # CUDA's kthvalue gives each row one thread block; a sort uses the whole GPU
        ordered = values.sort(dim=-1).values
        return ordered[..., pruned - 1 : pruned], ordered[..., pruned : pruned + 1]
    largest_pruned = values.kthvalue(pruned, dim=-1, keepdim=True).values
    above = torch.where(values > largest_pruned, values, torch.inf).amin(dim=-1, keepdim=True)
    tied = (values <= largest_pruned).sum(dim=-1, keepdim=True) > pruned
    return largest_pruned, torch.where(tied, largest_pruned, above)


BAND_ROW = 64


def _band_rows(rows: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One pass over (r, BAND_ROW) weights: per row, how many squares lie below `low`, how many in
    [low, high], and the smallest of those (inf if none). Counts in the weights' float type (exact up
    to BAND_ROW), which vectorizes better than integer counts."""
    squares = rows * rows
    inside = (squares >= low) & (squares <= high)
    counts_below = (squares < low).to(rows.dtype).sum(dim=1)
    return counts_below, inside.to(rows.dtype).sum(dim=1), torch.where(inside, squares, torch.inf).amin(dim=1)


def band_order_statistics(weight: Tensor, pruned: int, low: float, high: float) -> tuple[Tensor, Tensor, int] | None:
    """The same two order statistics of the squared weights (and the band's size) when both lie in
    [low, high], else None.

    Weights move little per training step, so a narrow band around the last threshold holds the new
    one. One fused pass counts the squares below the band and finds, per row of 64 weights, how many
    fall inside and the smallest; rows holding one band value give it directly, the few holding more
    are gathered. Exact (the very values a sort would give), for about the cost of one pass.
    """
    flat = weight.detach().reshape(-1)
    body = flat.numel() - flat.numel() % BAND_ROW
    low_t, high_t = torch.tensor(low, dtype=flat.dtype), torch.tensor(high, dtype=flat.dtype)
    below_per_row, counts, minimums = _BAND(flat[:body].view(-1, BAND_ROW), low_t, high_t)  # (r,) each
    below = below_per_row.sum(dtype=torch.float64)  # exact: integers far below 2^53
    crowded = (counts > 1).nonzero().squeeze(1)
    crowded_squares = flat[:body].view(-1, BAND_ROW)[crowded].square().reshape(-1)
    tail = flat[body:].square()
    candidates = torch.cat([minimums[counts == 1], crowded_squares, tail])
    band = candidates[(candidates >= low) & (candidates <= high)].sort().values
    rank = pruned - int(below) - int((tail < low).sum())  # position of the largest pruned inside the band
    if rank < 1 or rank + 1 > band.numel():
        return None
    return band[rank - 1 : rank], band[rank : rank + 1], band.numel()


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


def _tau(threshold_squared: Tensor, temperature: float | Tensor, relative: bool) -> Tensor | float:
    return (temperature * threshold_squared).clamp_min(torch.finfo(threshold_squared.dtype).tiny) if relative else temperature


def _masked_weight_forward(weight: Tensor, threshold_squared: Tensor, temperature: float | Tensor, relative: bool) -> Tensor:
    return weight * torch.sigmoid((weight * weight - threshold_squared) / _tau(threshold_squared, temperature, relative))


def _masked_weight_backward(
    grad: Tensor, weight: Tensor, output: Tensor, threshold_squared: Tensor, temperature: float | Tensor, relative: bool,
    gradient_temperature: float | None, straight_through: bool,
) -> Tensor:
    # m is recovered from the output (m = out / w): no exp, and nothing kept beyond the output that
    # the layer keeps for its own backward anyway (and t^2: one number per threshold).
    tau = _tau(threshold_squared, temperature, relative)
    m = torch.where(weight != 0, output / weight, torch.sigmoid(-threshold_squared / tau))
    if gradient_temperature is None:
        local = m * (1 + 2 * (weight * weight) / tau * (1 - m))
    else:  # the surrogate: the slope of the mask at gradient_temperature
        slope_tau = _tau(threshold_squared, gradient_temperature, relative)
        slope = torch.sigmoid((weight * weight - threshold_squared) / slope_tau)
        local = m + 2 * (weight * weight) / slope_tau * slope * (1 - slope)
    if straight_through:
        local = local + (1 - m)
    return grad * local


class _MaskedWeight(torch.autograd.Function):
    """w * sigmoid((w^2 - t^2) / tau) with dw = m + (2 w^2 / tau) m (1 - m), in one pass each way."""

    @staticmethod
    def forward(
        ctx, weight: Tensor, threshold_squared: Tensor, temperature: float | Tensor, relative: bool, compiled: bool,
        gradient_temperature: float | None, straight_through: bool,
    ) -> Tensor:
        output = (_FORWARD if compiled else _masked_weight_forward)(weight, threshold_squared, temperature, relative)
        ctx.save_for_backward(weight, output, threshold_squared)
        ctx.settings = (temperature, relative, compiled, gradient_temperature, straight_through)
        return output

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, output, threshold_squared = ctx.saved_tensors
        temperature, relative, compiled, gradient_temperature, straight_through = ctx.settings
        kernel = _BACKWARD if compiled else _masked_weight_backward
        gradient = kernel(grad.contiguous(), weight, output, threshold_squared, temperature, relative, gradient_temperature, straight_through)
        return gradient, None, None, None, None, None, None


def masked_weight(
    weight: Tensor, threshold: Tensor, temperature: float, relative: bool, compiled: bool = False,
    gradient_temperature: float | None = None, straight_through: bool = False,
) -> Tensor:
    """PDP's w * m(w), the values of `soft_mask` with `temperature_for`, fused: nothing but the output
    (which the layer keeps anyway) and t^2 is kept for the backward.

    Args:
        weight: any shape; `threshold` broadcasts against it (a scalar, or (..., 1) per group).
        compiled: run the two elementwise passes as `torch.compile` kernels (worth it on large tensors).
        gradient_temperature: the backward uses the mask's slope at this temperature (`soft_mask`'s
            surrogate gradient); the values stay those of `temperature`.
        straight_through: each weight also gets (1 - m) times the gradient of its masked value, so a
            pruned weight learns as if kept (SR-STE's estimator, Zhou et al. 2021; not in the PDP paper;
            on ResNet-20 at 1:4 it gained nothing: README).
    """
    threshold_squared = threshold.detach().square().to(weight.dtype)
    temperature = float(temperature)
    if compiled:  # as a float it would be a guard, and an anneal would recompile the kernels at every step
        temperature = torch.full((), temperature, dtype=weight.dtype, device=weight.device)
    return _MaskedWeight.apply(
        weight, threshold_squared, temperature, bool(relative), compiled,
        None if gradient_temperature is None else float(gradient_temperature), bool(straight_through),
    )


def _group_thresholds(groups: Tensor, pruned: int) -> Tensor:
    """t of every group of m (last dimension) through an odd-even transposition sorting network:
    elementwise minimum/maximum only, so it vectorizes where a sort along a tiny dimension does not."""
    columns = [groups[..., i] * groups[..., i] for i in range(groups.shape[-1])]
    for round_ in range(len(columns)):
        for i in range(round_ % 2, len(columns) - 1, 2):
            columns[i], columns[i + 1] = torch.minimum(columns[i], columns[i + 1]), torch.maximum(columns[i], columns[i + 1])
    return ((columns[pruned - 1].sqrt() + columns[pruned].sqrt()) / 2).unsqueeze(-1)  # (..., 1)


def group_thresholds(groups: Tensor, pruned: int, compiled: bool = False) -> Tensor:
    """`midpoint_threshold` of every group of m (last dimension), without sorting. (..., m) -> (..., 1)."""
    return (_GROUPS if compiled else _group_thresholds)(groups.detach(), pruned)


class _Kernel:
    """A `torch.compile`d elementwise kernel that falls back, once and for good, to eager PyTorch when
    compiling is not possible here (no C++ compiler, an unsupported backend)."""

    def __init__(self, function) -> None:
        self.function = function
        self.compiled = None

    def __call__(self, *args: Tensor):
        if self.compiled is None:
            try:
                self.compiled = torch.compile(self.function, dynamic=False)  # one specialization per shape: faster
                return self.compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
                warnings.warn(f"torch.compile unavailable ({type(error).__name__}); PDP runs its kernels eagerly", stacklevel=2)
                self.compiled = self.function
        return self.compiled(*args)


_FORWARD, _BACKWARD, _BAND = _Kernel(_masked_weight_forward), _Kernel(_masked_weight_backward), _Kernel(_band_rows)
_GROUPS = _Kernel(_group_thresholds)


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


def group_along_inputs(weight: Tensor, m: int) -> Tensor:
    """Groups of `m` consecutive weights along the input dimension, as sparse hardware lays them out.

    Linear (out, in) -> (out, in // m, m); Conv (out, in, *kernel) is read as (out, *kernel, in), so each
    group spans `m` input channels at one kernel position -> (out, *kernel, in // m, m).
    """
    inputs = weight.shape[1]
    if inputs % m:
        raise ValueError(
            f"the input dimension ({inputs}) of a weight of shape {tuple(weight.shape)} is not a "
            f"multiple of m={m}; exclude this layer or pick an m that divides {inputs}"
        )
    channels_last = weight.movedim(1, -1)  # (out, *kernel, in)
    return channels_last.reshape(*channels_last.shape[:-1], inputs // m, m)  # (out, *kernel, in // m, m)


def ungroup_along_inputs(groups: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `group_along_inputs`: back to the weight's own `shape`."""
    channels_last = groups.reshape(shape[0], *shape[2:], shape[1])  # (out, *kernel, in)
    return channels_last.movedim(-1, 1)  # (out, in, *kernel)


def is_nm_sparse(tensor: Tensor, n: int, m: int) -> bool:
    """Whether every group of `m` weights along the input dimension holds at most `n` non-zeros."""
    if tensor.dim() < 2 or tensor.shape[1] % m:
        return False
    nonzeros = (group_along_inputs(tensor, m) != 0).sum(dim=-1)
    return bool((nonzeros <= n).all())


def channel_squared_norms(weight: Tensor) -> Tensor:
    """Squared L2 norm of each output channel's slice: (out, ...) -> (out,)."""
    return weight.square().flatten(1).sum(dim=1) if weight.dim() > 1 else weight.square()
