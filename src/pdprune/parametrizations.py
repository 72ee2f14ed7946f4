"""Soft masks as `torch.nn.utils.parametrize` parametrizations: the model computes with w * m(w).

Each mask keeps its current sparsity in a buffer of the model, so `model.state_dict()` alone restores
a pruned model mid-training (given a pruner created with the same config). The pruner only decides
*which* sparsity each mask has at each step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pdprune.masks import (
    band_order_statistics,
    group_along_inputs,
    group_thresholds,
    hard_keep_mask,
    masked_weight,
    midpoint,
    midpoint_threshold,
    order_statistics,
    pruned_count,
    soft_mask,
    temperature_for,
    ungroup_along_inputs,
)

COMPILE_FROM = 1 << 18
"""On a CPU, tensors of at least this many elements run PDP's elementwise passes as compiled kernels."""
BAND_FROM = 1 << 16
"""On a CPU, tensors of at least this many elements find their threshold in a band around the last one."""

__all__ = ["MaskState", "SoftMask", "UnstructuredMask", "NMMask", "ChannelGroup", "ChannelMask"]


class MaskState(nn.Module):
    """The state of one pruning unit (a tensor, or a group of coupled channels), saved with the model.

    The current sparsity lives in a buffer, so `model.state_dict()` (tensors only: safetensors and
    Hugging Face checkpoints take it) restores it; a Python float mirrors it, so that the forward pass
    never waits for the GPU to read it back.
    """

    structure = "?"

    def __init__(self, temperature: float, relative_temperature: bool) -> None:
        super().__init__()
        self.register_buffer("current_sparsity", torch.zeros((), dtype=torch.float64))
        self._sparsity = 0.0
        self.temperature = temperature
        self.gradient_temperature: float | None = None  # the surrogate slope while annealing, if asked for
        self.relative_temperature = relative_temperature

    @property
    def sparsity(self) -> float:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self._sparsity = float(value)
        self.current_sparsity.fill_(self._sparsity)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sparsity = float(self.current_sparsity)

    def _mask_rows(self, squared_scores: Tensor, pruned: int) -> Tensor:
        """Soft mask along the last dimension of `squared_scores`, with `pruned` of each row below t."""
        if pruned == 0:
            return torch.ones_like(squared_scores)
        if pruned >= squared_scores.shape[-1]:
            return torch.zeros_like(squared_scores)
        threshold = midpoint_threshold(squared_scores, pruned)
        tau = temperature_for(threshold, self.temperature, self.relative_temperature)
        slope_tau = None if self.gradient_temperature is None else temperature_for(threshold, self.gradient_temperature, self.relative_temperature)
        return soft_mask(squared_scores, threshold, tau, slope_tau)

    def extra_repr(self) -> str:
        mode = "relative" if self.relative_temperature else "absolute"
        return f"sparsity={self.sparsity:.4f}, temperature={self.temperature:g} ({mode})"


class SoftMask(MaskState):
    """Base of the per-tensor masks: a parametrization w -> w * m(w) at the current `sparsity`.

    Subclasses say how scores are grouped (`soft_mask`, the straightforward form, also used by
    `finalize`) and which weights a hard cut keeps (`keep_mask`); `forward` is the fast path.
    """

    def __init__(
        self, temperature: float, relative_temperature: bool, compile_kernels: bool = True, straight_through: bool = False
    ) -> None:
        super().__init__(temperature, relative_temperature)
        self.compile_kernels = compile_kernels
        self.straight_through = straight_through

    def _compiled(self, weight: Tensor) -> bool:
        # On a CPU the fused kernels halve PDP's memory traffic; on CUDA these passes are launch-bound
        # and a compiled call's guards cost more than they save (benchmarks/results/step_overhead_cuda.md).
        return self.compile_kernels and weight.device.type == "cpu" and weight.numel() >= COMPILE_FROM

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The soft mask m(w) of `weight` pruned at `sparsity` (same shape as `weight`)."""
        raise NotImplementedError

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The hard mask (m >= 0.5) at `sparsity` with the exact count: True where a weight stays."""
        raise NotImplementedError

    def soft(self, weight: Tensor, sparsity: float) -> Tensor:
        """w * m(w) at `sparsity`: what the network computes with before the hard cut."""
        return weight * self.soft_mask(weight, sparsity)

    def finalized(self, weight: Tensor, sparsity: float) -> Tensor:
        """What `finalize()` bakes in: kept weights as the network trained with them (w * m), others 0."""
        return self.soft(weight, sparsity) * self.keep_mask(weight, sparsity)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", straight-through" if self.straight_through else "")


class UnstructuredMask(SoftMask):
    """One threshold over the whole tensor: any weight may go."""

    structure = "unstructured"

    def __init__(
        self, temperature: float, relative_temperature: bool, compile_kernels: bool = True, straight_through: bool = False
    ) -> None:
        super().__init__(temperature, relative_temperature, compile_kernels, straight_through)
        self._band: tuple[float, float] | None = None  # squared-score bracket of the last threshold
        self._band_width = 4e-3
        self._cached: tuple[tuple[int, int, int], Tensor] | None = None  # (weight version, storage, pruned), t

    def forward(self, weight: Tensor) -> Tensor:
        if self.sparsity == 0.0:
            return weight
        pruned = pruned_count(self.sparsity, weight.numel())
        if pruned == 0:
            return weight
        if pruned >= weight.numel():
            return weight * 0
        threshold = self.threshold(weight, pruned)
        return masked_weight(
            weight, threshold, self.temperature, self.relative_temperature, self._compiled(weight),
            self.gradient_temperature, self.straight_through,
        )

    def threshold(self, weight: Tensor, pruned: int) -> Tensor:
        """t (a one-element tensor), from a band around the last threshold when possible, else one selection.

        Reused while the weight is unchanged (same tensor version and storage): evaluation batches and
        gradient-accumulation micro-batches pay for one selection per optimizer step, not per batch.
        """
        key = (weight._version, weight.data_ptr(), pruned)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        threshold = self._select(weight, pruned)
        self._cached = (key, threshold)
        return threshold

    def _select(self, weight: Tensor, pruned: int) -> Tensor:
        stats = None
        if self._band is not None and weight.device.type == "cpu" and weight.numel() >= BAND_FROM:
            stats = band_order_statistics(weight, pruned, *self._band)
            if stats is None:
                self._band_width *= 4
            elif stats[2] > 4096:
                self._band_width /= 2
            elif stats[2] < 256:
                self._band_width *= 1.5
        if stats is None:
            stats = order_statistics(weight.detach().reshape(1, -1).square(), pruned)
        largest_pruned, smallest_kept = stats[0].reshape(()), stats[1].reshape(())
        if weight.device.type == "cpu" and weight.numel() >= BAND_FROM:
            self._band = (float(largest_pruned) * (1 - self._band_width), float(smallest_kept) * (1 + self._band_width))
        return midpoint(largest_pruned, smallest_kept)

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        flat = weight.square().reshape(1, -1)  # (1, n): the whole tensor is one row
        return self._mask_rows(flat, pruned_count(sparsity, flat.shape[-1])).view_as(weight)

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        flat = weight.detach().square().reshape(1, -1)  # (1, n)
        return hard_keep_mask(flat, pruned_count(sparsity, flat.shape[-1])).view_as(weight)


class NMMask(SoftMask):
    """A threshold inside every group of `m` weights along the input dimension; `n` of each stay.

    The layer's sparsity ramps up to 1 - n/m like an unstructured budget; at sparsity s each group
    prunes round(s * m) weights, so the pattern tightens in whole steps (for 2:4: 0, then 1, then 2).
    """

    def __init__(
        self, n: int, m: int, temperature: float, relative_temperature: bool, compile_kernels: bool = True,
        straight_through: bool = False,
    ) -> None:
        super().__init__(temperature, relative_temperature, compile_kernels, straight_through)
        self.n, self.m = n, m

    def forward(self, weight: Tensor) -> Tensor:
        if self.sparsity == 0.0:
            return weight
        pruned = pruned_count(self.sparsity, self.m)
        if pruned == 0:
            return weight
        groups = group_along_inputs(weight, self.m)  # (out, *kernel, in // m, m)
        compiled = self._compiled(weight)
        threshold = group_thresholds(groups, pruned, compiled)  # (out, *kernel, in // m, 1)
        masked = masked_weight(
            groups, threshold, self.temperature, self.relative_temperature, compiled, self.gradient_temperature, self.straight_through
        )
        return ungroup_along_inputs(masked, weight.shape)

    @property
    def structure(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        groups = group_along_inputs(weight.square(), self.m)  # (out, *kernel, in // m, m)
        mask = self._mask_rows(groups, pruned_count(sparsity, self.m))
        return ungroup_along_inputs(mask, weight.shape)

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        groups = group_along_inputs(weight.detach().square(), self.m)  # (out, *kernel, in // m, m)
        return ungroup_along_inputs(hard_keep_mask(groups, pruned_count(sparsity, self.m)), weight.shape)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, " + super().extra_repr()


class ChannelGroup(MaskState):
    """Coupled output channels that live or die together (a residual stream, a depthwise pair, ...).

    Root channel i of the group is channel `indices[i]` of each member. A channel's score is the sum of
    the squared L2 norms of its filters in every producing Conv/Linear weight; PDP's soft mask runs over
    those scores. The group is a child of each member's `ChannelMask`, so its sparsity travels in
    `model.state_dict()`; it reads the producers' dense weights at every call.
    """

    structure = "channel"

    def __init__(
        self, name: str, size: int, producers: list[tuple[nn.Module, Tensor]], temperature: float, relative_temperature: bool
    ) -> None:
        super().__init__(temperature, relative_temperature)
        self.name, self.size = name, size
        self._producers = tuple(module for module, _ in producers)  # a tuple: not registered as children
        for position, (_, indices) in enumerate(producers):
            self.register_buffer(f"producer_indices_{position}", indices, persistent=False)

    def squared_scores(self) -> Tensor:
        """(size,) sum over producers of each root channel's squared filter norm (with gradient)."""
        total = torch.zeros(())
        for position, module in enumerate(self._producers):
            weight = module.parametrizations.weight.original
            norms = weight.square().flatten(1).sum(dim=1)  # (out,)
            total = total + norms[getattr(self, f"producer_indices_{position}")]  # (size,)
        return total

    def pruned(self, sparsity: float) -> int:
        """Channels pruned at `sparsity`; at least one channel always stays."""
        return min(pruned_count(sparsity, self.size), self.size - 1)

    def soft_mask(self, sparsity: float) -> Tensor:
        """(size,) soft mask over the group's channels."""
        return self._mask_rows(self.squared_scores().reshape(1, -1), self.pruned(sparsity)).reshape(-1)

    def keep_mask(self, sparsity: float) -> Tensor:
        """(size,) True for the channels a hard cut keeps."""
        return hard_keep_mask(self.squared_scores().detach().reshape(1, -1), self.pruned(sparsity)).reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.size} channels, " + super().extra_repr()


class ChannelMask(nn.Module):
    """Parametrization of one member tensor (weight, bias or norm affine): scales its channel
    `indices[i]` along dim 0 by the group's mask entry i and leaves its other channels alone."""

    structure = "channel"

    def __init__(self, group: ChannelGroup, indices: Tensor) -> None:
        super().__init__()
        self.group = group
        self.register_buffer("indices", indices, persistent=False)

    def _scale(self, tensor: Tensor, mask: Tensor) -> Tensor:
        scale = torch.ones(tensor.shape[0], dtype=tensor.dtype, device=tensor.device).index_copy(0, self.indices, mask.to(tensor.dtype))
        return tensor * scale.reshape(-1, *([1] * (tensor.dim() - 1)))  # (out, 1, ...) broadcast over the filter

    def forward(self, tensor: Tensor) -> Tensor:
        if self.group.sparsity == 0.0:
            return tensor
        return self._scale(tensor, self.group.soft_mask(self.group.sparsity))

    def soft(self, tensor: Tensor, sparsity: float) -> Tensor:
        """Every channel scaled by its soft mask: what the network computes with before the hard cut."""
        return self._scale(tensor, self.group.soft_mask(sparsity))

    def finalized(self, tensor: Tensor, sparsity: float) -> Tensor:
        """Kept channels as trained (scaled by m), pruned channels exactly 0."""
        return self._scale(tensor, self.group.soft_mask(sparsity) * self.group.keep_mask(sparsity))
