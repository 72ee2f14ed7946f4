"""The pure tensor math of PDP (Cho, Adya, Naik, NeurIPS 2023): thresholds, soft masks, hard masks.

Every function takes tensors and numbers and returns new tensors; nothing here knows about modules.
Selections run along the last dimension of a tensor of scores: the whole flattened weight for
unstructured pruning, each group of M weights for N:M, the vector of channel scores for channels.
Scores are *squared* magnitudes, so that the soft mask is m = sigmoid((s - t^2) / tau) with no square
root on the gradient path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "pruned_count",
    "midpoint_threshold",
    "temperature_for",
    "soft_mask",
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


def temperature_for(threshold: Tensor, temperature: float, relative: bool) -> Tensor | float:
    """The tau of the soft mask: absolute as in the paper, or relative to t^2 so that one value suits
    layers of any weight scale. A zero threshold falls back to the smallest normal float, never 0."""
    if not relative:
        return temperature
    return (temperature * threshold.square()).clamp_min(torch.finfo(threshold.dtype).tiny)


def soft_mask(squared_scores: Tensor, threshold: Tensor, temperature: Tensor | float) -> Tensor:
    """PDP's soft mask exp(s/tau) / (exp(s/tau) + exp(t^2/tau)) = sigmoid((s - t^2) / tau).

    Stable for every finite input (sigmoid saturates instead of overflowing). Gradients flow through
    `squared_scores`; `threshold` and `temperature` are constants of the step.
    """
    return torch.sigmoid((squared_scores - threshold.square()) / temperature)


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
