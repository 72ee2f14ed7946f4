"""Soft masks as `torch.nn.utils.parametrize` parametrizations: the model computes with w * m(w).

The forward pass reads t^2 and tau from buffers and does elementwise math only: no selection, no host
read, no branch on a tensor's value, so `torch.compile` fuses it into the layer and compiles it once.
The thresholds are the paper's t of the current weights: `refresh()` recomputes them, which the pruner
does after every optimizer step (`PDPPruner.step()`, and a hook on every optimizer's step); in eager
mode a forward pass that sees a weight changed since (a new tensor version) refreshes it first.

Each mask keeps its current sparsity in a buffer of the model, so `model.state_dict()` alone restores
a pruned model mid-training (given a pruner created with the same config). The pruner only decides
*which* sparsity each mask has at each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pdprune.masks import (
    band_order_statistics,
    group_along_inputs,
    group_threshold_squares,
    hard_keep_mask,
    masked_weight,
    midpoint,
    midpoint_threshold,
    nm_keep_mask,
    order_statistics,
    pruned_count,
    soft_mask,
    inverse_temperature,
    soft_mask_from_inverse,
    temperature_for,
)

COMPILE_FROM = 1 << 18
"""On a CPU, tensors of at least this many elements run PDP's elementwise passes as compiled kernels."""
BAND_FROM = 1 << 14
"""On a CPU, tensors of at least this many elements find their threshold in a band around the last one
(below, two selections cost less than the band's few passes and host reads)."""
FUSED_BAND_FROM = 1 << 17
"""From this many elements on, the band's counting pass is one compiled kernel."""

__all__ = ["MaskState", "SoftMask", "UnstructuredMask", "NMMask", "ChannelGroup", "ChannelMask", "BoundSlice", "scale_units"]


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the masks of weights of `dtype` compute in: float32 for float16, whose range holds neither
    a sharp mask's 1/tau (above 65504) nor the squares of small weights (below 6e-5 they lose precision)."""
    return torch.float32 if dtype == torch.float16 else dtype


def in_mask_dtype(tensor: Tensor) -> Tensor:
    """`tensor` in its masks' dtype (`mask_dtype`): the tensor itself where that is its own."""
    dtype = mask_dtype(tensor.dtype)
    return tensor if dtype == tensor.dtype else tensor.to(dtype)


@dataclass(frozen=True)
class _Gathered:
    """The staleness key of thresholds the pruner computed from a gathered sharded weight."""

    pruned: int


class MaskState(nn.Module):
    """The state of one pruning unit (a tensor, or a group of coupled channels), saved with the model.

    The current sparsity lives in a buffer, so `model.state_dict()` (tensors only: safetensors and
    Hugging Face checkpoints take it) restores it; a Python float mirrors it, so that the schedule never
    waits for a GPU. t^2, the temperatures and, for a unit with one threshold, the mask's coefficients
    (`mask_coefficients`: tau folded in) live in buffers that the forward pass reads.

    Args:
        threshold_shape: the shape of t^2: () for one threshold, one per group otherwise.
        like: the weight: the masks compute on its device, in `mask_dtype` of its dtype.
        soft_gradient: the backward uses the mask's slope at `gradient_temperature` (see `set_temperature`).
    """

    structure = "?"

    def __init__(self, threshold_shape: tuple[int, ...], like: Tensor, temperature: float, relative_temperature: bool, soft_gradient: bool = False) -> None:
        super().__init__()

        dtype = mask_dtype(like.dtype)

        def scalar(value: float, wanted: bool = True) -> Tensor | None:
            return torch.tensor(value, dtype=dtype, device=like.device) if wanted else None

        self._scalar = threshold_shape == ()
        self.register_buffer("current_sparsity", torch.zeros((), dtype=torch.float64, device=like.device))
        self.register_buffer("threshold_squared", torch.full(threshold_shape, -math.inf, dtype=dtype, device=like.device), persistent=False)
        self.register_buffer("temperature_value", scalar(temperature), persistent=False)
        self.register_buffer("gradient_temperature_value", scalar(temperature, soft_gradient), persistent=False)
        # 1 / tau of the mask (and of the backward's slope), folded in once per refresh where t^2 is one number
        self.register_buffer("inverse_tau", scalar(1.0, self._scalar), persistent=False)
        self.register_buffer("slope_inverse_tau", scalar(1.0, self._scalar and soft_gradient), persistent=False)
        self._sparsity = 0.0
        self.temperature = self._gradient_temperature = float(temperature)
        self.relative_temperature = relative_temperature
        self._key: object = None  # (versions of the weights, pruned count) the thresholds hold; None: recompute
        self.compiled_forward = False  # set when a compiled forward pass, which cannot refresh, used the mask
        self.coefficients_stale = False

    @property
    def sparsity(self) -> float:
        return self._sparsity

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self._sparsity = float(value)

    @property
    def gradient_temperature(self) -> float | None:
        """The temperature whose slope the backward uses, or None for the mask's own slope."""
        if self.gradient_temperature_value is None or self._gradient_temperature == self.temperature:
            return None
        return self._gradient_temperature

    def set_temperature(self, temperature: float, gradient_temperature: float | None = None) -> None:
        """Set tau (relative or absolute) and, with a soft gradient, the temperature of the backward's slope."""
        if temperature != self.temperature:
            self.temperature = float(temperature)
            self.temperature_value.fill_(self.temperature)
            self.coefficients_stale = True
        if self.gradient_temperature_value is not None:
            slope = self.temperature if gradient_temperature is None else float(gradient_temperature)
            if slope != self._gradient_temperature:
                self._gradient_temperature = slope
                self.gradient_temperature_value.fill_(slope)
                self.coefficients_stale = True

    def mark_gathered(self, pruned: int) -> None:
        """Record that the pruner computed the thresholds, at `pruned`, from the whole of a sharded weight
        after the optimizer's step (FSDP2 under torch.compile): they hold until the pruned count changes."""
        self._key = _Gathered(pruned)

    def _differs(self, key: tuple) -> bool:
        """Whether `key` (the weights' versions and addresses, then the pruned count) is not the one the
        thresholds were computed for; after `mark_gathered`, only the pruned count is compared."""
        if isinstance(self._key, _Gathered):
            return self._key.pruned != key[-1]
        return self._key != key

    def mark_stale(self) -> None:
        """Make the next eager forward pass recompute the thresholds. Staleness is otherwise read from the
        weight's version and address, which a weight refilled in place without a version bump (FSDP2's
        gathered weight, whose buffer may come back at the same address) does not change."""
        self._key = None

    def update_coefficients(self) -> None:
        """Fold the temperatures and t^2 into the `inverse_tau` buffers (units with one threshold)."""
        if self._scalar:
            with torch.no_grad():
                self.inverse_tau.copy_(inverse_temperature(self.threshold_squared, self.temperature, self.relative_temperature))
                if self.slope_inverse_tau is not None:
                    self.slope_inverse_tau.copy_(inverse_temperature(self.threshold_squared, self._gradient_temperature, self.relative_temperature))
        self.coefficients_stale = False

    def coefficients(self, compiled: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """t^2, 1 / tau of the mask now, and 1 / tau of the backward's slope with a soft gradient (else None);
        with one threshold per group, `compiled` computes each 1 / tau in one fused kernel."""
        if self._scalar:
            if self.coefficients_stale and not _is_compiling():
                self.update_coefficients()
            return self.threshold_squared, self.inverse_tau, self.slope_inverse_tau
        compiled = compiled and not _is_compiling()  # inside a compiled model, the model's graph fuses it
        inverse_tau = inverse_temperature(self.threshold_squared, self.temperature_value, self.relative_temperature, compiled)
        if self.gradient_temperature_value is None:
            return self.threshold_squared, inverse_tau, None
        return self.threshold_squared, inverse_tau, inverse_temperature(
            self.threshold_squared, self.gradient_temperature_value, self.relative_temperature, compiled)

    def _apply(self, fn: Any, recurse: bool = True) -> MaskState:
        """model.half() (or .to(float16), twice or more) moves the masks' buffers but keeps their values and
        dtypes: a buffer cast to float16 is restored from its value before, on the new device; so is the
        float64 sparsity under any cast."""
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dtype != before[name].dtype and (buffer.dtype != mask_dtype(buffer.dtype) or name == "current_sparsity"):
                self._buffers[name] = before[name].to(buffer.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        self.current_sparsity.fill_(self._sparsity)  # written when saved, not at every step
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._sparsity = float(self.current_sparsity)
        self._key = None
        self.coefficients_stale = True

    def _mask_rows(self, squared_scores: Tensor, pruned: int) -> Tensor:
        """The straightforward soft mask along the last dimension, with `pruned` of each row below t
        (a sort per row; `finalize` and the tests' oracle use it)."""
        if pruned == 0:
            return torch.ones_like(squared_scores)
        if pruned >= squared_scores.shape[-1]:
            return torch.zeros_like(squared_scores)
        threshold = midpoint_threshold(squared_scores, pruned)
        tau = temperature_for(threshold, self.temperature, self.relative_temperature)
        slope = self.gradient_temperature
        slope_tau = None if slope is None or slope == self.temperature else temperature_for(threshold, slope, self.relative_temperature)
        return soft_mask(squared_scores, threshold, tau, slope_tau)

    def extra_repr(self) -> str:
        mode = "relative" if self.relative_temperature else "absolute"
        return f"sparsity={self.sparsity:.4f}, temperature={self.temperature:g} ({mode})"


def _version_key(tensor: Tensor) -> tuple[int, int]:
    return tensor._version, tensor.data_ptr()


class SoftMask(MaskState):
    """Base of the per-tensor masks: a parametrization w -> w * m(w) at the current `sparsity`.

    Subclasses say how thresholds are grouped (`threshold_squares`, the fast path, and `soft_mask`,
    the straightforward form that `finalize` uses) and which weights a hard cut keeps (`keep_mask`).
    """

    def __init__(
        self, threshold_shape: tuple[int, ...], like: Tensor, temperature: float, relative_temperature: bool,
        compile_kernels: bool = True, straight_through: bool = False, soft_gradient: bool = False,
    ) -> None:
        super().__init__(threshold_shape, like, temperature, relative_temperature, soft_gradient)
        self.compile_kernels = compile_kernels
        self.straight_through = straight_through

    def forward(self, weight: Tensor) -> Tensor:
        if _is_compiling():
            self.compiled_forward = True
        elif self.is_stale(weight):
            self.refresh(weight)  # eager: a weight changed outside an optimizer's step is caught here
        if mask_dtype(weight.dtype) != weight.dtype:  # float16: computed in float32, and again in the backward
            return checkpoint(self._masked_in_mask_dtype, weight, use_reentrant=False)  # instead of keeping float32 copies
        return self._masked(weight)

    def _masked_in_mask_dtype(self, weight: Tensor) -> Tensor:
        return self._masked(in_mask_dtype(weight)).to(weight.dtype)

    def pruned_of(self, weight: Tensor) -> int:
        """How many weights of `weight` (of each group, for N:M) the current sparsity prunes."""
        raise NotImplementedError

    def _key_of(self, weight: Tensor) -> tuple[int, int, int]:
        return weight._version, weight.data_ptr(), self.pruned_of(weight)

    def is_stale(self, weight: Tensor) -> bool:
        """Whether `weight` or the pruned count changed since the thresholds were computed."""
        return self._differs(self._key_of(weight))

    def refresh(self, weight: Tensor) -> None:
        """Recompute t^2 (and the coefficients) from `weight` at the current sparsity (after an optimizer step)."""
        with torch.no_grad():
            self.threshold_squared.copy_(self.threshold_squares(in_mask_dtype(weight.detach())))
        self.update_coefficients()
        self.mark_fresh(weight)

    def mark_fresh(self, weight: Tensor) -> None:
        """Record that `threshold_squared` now holds the thresholds of `weight` (for batched refreshes)."""
        self._key = self._key_of(weight)

    def _compiled(self, weight: Tensor) -> bool:
        # On a CPU the fused kernels halve PDP's memory traffic; on CUDA these passes are launch-bound
        # and a compiled call's guards cost more than they save (benchmarks/results/step_overhead_cuda.md).
        return self.compile_kernels and weight.device.type == "cpu" and weight.numel() >= COMPILE_FROM

    def _masked(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def threshold_squares(self, weight: Tensor) -> Tensor:
        """t^2 for `weight` at the current sparsity, in the shape of the `threshold_squared` buffer."""
        raise NotImplementedError

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The soft mask m(w) of `weight` pruned at `sparsity` (same shape as `weight`)."""
        raise NotImplementedError

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The hard mask (m >= 0.5) at `sparsity` with the exact count: True where a weight stays."""
        raise NotImplementedError

    def soft(self, weight: Tensor, sparsity: float) -> Tensor:
        """w * m(w) at `sparsity`: what the network computes with before the hard cut."""
        computed = in_mask_dtype(weight)
        return (computed * self.soft_mask(computed, sparsity)).to(weight.dtype)

    def finalized(self, weight: Tensor, sparsity: float) -> Tensor:
        """What `finalize()` bakes in: kept weights as the network trained with them (w * m), others 0."""
        computed = in_mask_dtype(weight)
        kept = (computed * self.soft_mask(computed, sparsity)).where(self.keep_mask(computed, sparsity), 0.0)  # +0.0: no -0.0 bits
        return kept.to(weight.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", straight-through" if self.straight_through else "")


class UnstructuredMask(SoftMask):
    """One threshold over the whole tensor: any weight may go."""

    structure = "unstructured"

    def __init__(
        self, like: Tensor, temperature: float, relative_temperature: bool, compile_kernels: bool = True,
        straight_through: bool = False, soft_gradient: bool = False,
    ) -> None:
        super().__init__((), like, temperature, relative_temperature, compile_kernels, straight_through, soft_gradient)
        self._band: tuple[float, float] | None = None  # squared-score bracket of the last threshold
        self._band_width = 4e-3

    def _masked(self, weight: Tensor) -> Tensor:
        threshold_squared, inverse_tau, slope_inverse_tau = self.coefficients()
        flat = weight.reshape(-1)  # (numel,): one rank for every layer, one compiled kernel for all
        return masked_weight(
            flat, threshold_squared, inverse_tau, gradient_inverse_tau=slope_inverse_tau,
            straight_through=self.straight_through, compiled=self._compiled(weight),
        ).view_as(weight)

    def pruned_of(self, weight: Tensor) -> int:
        return pruned_count(self.sparsity, weight.numel())

    def threshold_squares(self, weight: Tensor) -> Tensor:
        selected = self.selection(weight)
        if isinstance(selected, float):
            return torch.full((), selected, dtype=weight.dtype, device=weight.device)
        return midpoint(*selected).square()

    def selection(self, weight: Tensor) -> tuple[Tensor, Tensor] | float:
        """The largest pruned and the smallest kept squared weight at the current sparsity (0-dim each),
        or t^2 itself when nothing (-inf) or everything (+inf) is pruned."""
        weight = in_mask_dtype(weight)
        pruned = self.pruned_of(weight)
        if pruned == 0:
            return -math.inf
        if pruned >= weight.numel():
            return math.inf
        return self._order_statistics(weight, pruned)

    def _order_statistics(self, weight: Tensor, pruned: int) -> tuple[Tensor, Tensor]:
        """The largest pruned and the smallest kept squared weight: from a band around the last threshold
        when it holds them (large CPU tensors, whose weights move little per step), else one selection."""
        banded = weight.device.type == "cpu" and weight.numel() >= BAND_FROM
        stats = None
        if banded and self._band is not None:
            stats = band_order_statistics(weight, pruned, *self._band, fused=weight.numel() >= FUSED_BAND_FROM)
            if stats is None:
                self._band_width *= 4
            elif stats[2] > 4096:
                self._band_width /= 2
            elif stats[2] < 256:
                self._band_width *= 1.5
        if stats is None:
            stats = order_statistics(weight.reshape(1, -1).square(), pruned)
        largest_pruned, smallest_kept = stats[0].reshape(()), stats[1].reshape(())
        if banded:
            self._band = (float(largest_pruned) * (1 - self._band_width), float(smallest_kept) * (1 + self._band_width))
        return largest_pruned, smallest_kept

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
    t^2 is kept per group, (groups, 1, positions) as `group_along_inputs` lays the weight out.
    """

    def __init__(
        self, n: int, m: int, like: Tensor, temperature: float, relative_temperature: bool, compile_kernels: bool = True,
        straight_through: bool = False, soft_gradient: bool = False, input_dim: int = 1,
    ) -> None:
        groups, _, positions = group_along_inputs(like, m, input_dim).shape
        super().__init__((groups, 1, positions), like, temperature, relative_temperature, compile_kernels, straight_through, soft_gradient)
        self.n, self.m, self.input_dim = n, m, input_dim

    @property
    def structure(self) -> str:  # type: ignore[override]
        return f"{self.n}:{self.m}"

    def _masked(self, weight: Tensor) -> Tensor:
        threshold_squared, inverse_tau, slope_inverse_tau = self.coefficients(self._compiled(weight))  # (groups, 1, positions) each
        groups = group_along_inputs(weight, self.m, self.input_dim)  # (groups, m, positions), a view
        masked = masked_weight(
            groups, threshold_squared, inverse_tau, gradient_inverse_tau=slope_inverse_tau,
            straight_through=self.straight_through, compiled=self._compiled(weight),
        )
        return masked.reshape(weight.shape)

    def pruned_of(self, weight: Tensor) -> int:
        return pruned_count(self.sparsity, self.m)

    def threshold_squares(self, weight: Tensor) -> Tensor:
        pruned = self.pruned_of(weight)
        if pruned == 0:
            return torch.full(self.threshold_squared.shape, -math.inf, dtype=weight.dtype, device=weight.device)
        groups = group_along_inputs(weight, self.m, self.input_dim)  # (groups, m, positions)
        return group_threshold_squares(groups, pruned, dim=1, compiled=self._compiled(weight))  # (groups, 1, positions)

    def _rows(self, weight: Tensor) -> Tensor:
        return group_along_inputs(weight, self.m, self.input_dim).transpose(1, 2)  # (groups, positions, m)

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        mask = self._mask_rows(self._rows(weight.square()), pruned_count(sparsity, self.m))  # (groups, positions, m)
        return mask.transpose(1, 2).reshape(weight.shape)

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        return nm_keep_mask(weight.detach().square(), pruned_count(sparsity, self.m), self.m, self.input_dim)

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, " + super().extra_repr()


class BoundSlice:
    """A `pdprune.units.Slice` bound to the model: along `dim` of `module.tensor_name`, unit i owns the
    entries `positions[i]` ((units, k): a conv channel is k=1 filter; an attention head k=head_dim rows)."""

    def __init__(self, module: nn.Module, tensor_name: str, dim: int, positions: Tensor) -> None:
        self.module, self.tensor_name, self.dim, self.positions = module, tensor_name, dim, positions

    def tensor(self) -> Tensor:
        """The dense tensor (under a parametrization, the original)."""
        if hasattr(self.module, "parametrizations") and self.tensor_name in self.module.parametrizations:
            return self.module.parametrizations[self.tensor_name].original
        return getattr(self.module, self.tensor_name)

    def whole(self) -> Tensor:
        """`tensor()`, gathered whole where FSDP2 shards it (outside the forward pass: a collective that
        every rank makes at the same step)."""
        tensor = self.tensor()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

    def unit_norms(self, tensor: Tensor) -> Tensor:
        """(units,) the squared L2 norm of each unit's entries of `tensor` (float16: in float32, computed
        again in the backward rather than kept)."""
        if mask_dtype(tensor.dtype) != tensor.dtype and tensor.requires_grad:
            return checkpoint(self._unit_norms, tensor, use_reentrant=False)
        return self._unit_norms(tensor)

    def _unit_norms(self, tensor: Tensor) -> Tensor:
        entries = in_mask_dtype(tensor).square().movedim(self.dim, 0).reshape(tensor.shape[self.dim], -1).sum(dim=1)  # (entries,)
        return entries[self.positions].sum(dim=1)  # (units,)


def scale_units(tensor: Tensor, dim: int, positions: Tensor, unit_values: Tensor) -> Tensor:
    """`tensor` with the entries `positions[i]` along `dim` multiplied by `unit_values[i]`; the others unchanged."""
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    factors = unit_values.to(tensor.dtype).unsqueeze(1).expand_as(positions).reshape(-1)  # (units * k,)
    scale = torch.ones(tensor.shape[dim], dtype=tensor.dtype, device=tensor.device).index_copy(0, positions.reshape(-1), factors)
    return tensor * scale.reshape(shape)  # broadcast over the rest of each entry


class ChannelGroup(MaskState):
    """Coupled channels that live or die together (a residual stream, a depthwise pair, an attention
    head with its query, key, value and output projections, ...).

    A channel's score is the sum of the squared L2 norms of its slices in every scoring tensor; PDP's
    soft mask runs over those scores. The group is a child of each gated tensor's `ChannelMask`, so its
    sparsity travels in `model.state_dict()`; it reads the scoring tensors' dense values at every call.

    Args:
        scoring: the slices whose norms score the channels (with gradient through them).
        gated: the slices the soft mask scales during training (each has its `ChannelMask`).
        cleared: slices of tensors not gated during training that `finalize()` zeroes for pruned
            channels too (e.g. a head's query and key rows: gating its values alone is what removing it does).
        kind: what a unit is, for reports: "channel" or "head".
    """

    structure = "channel"
    ROLES = ("scoring", "gated", "cleared")

    def __init__(
        self, name: str, size: int, slices: dict[str, list[BoundSlice]], like: Tensor, temperature: float,
        relative_temperature: bool, kind: str = "channel", soft_gradient: bool = False,
    ) -> None:
        super().__init__((), like, temperature, relative_temperature, soft_gradient)
        self.name, self.size, self.kind = name, size, kind
        self._slices = {role: [(s.module, s.tensor_name, s.dim) for s in slices.get(role, [])] for role in self.ROLES}  # not modules
        for role in self.ROLES:
            for position, piece in enumerate(slices.get(role, [])):
                self.register_buffer(f"{role}_positions_{position}", piece.positions, persistent=False)

    def slices(self, role: str) -> list[BoundSlice]:
        """The group's slices of one role ("scoring", "gated", "cleared"), positions on the model's device."""
        return [BoundSlice(module, tensor_name, dim, getattr(self, f"{role}_positions_{i}"))
                for i, (module, tensor_name, dim) in enumerate(self._slices[role])]

    @property
    def producers(self) -> tuple[nn.Module, ...]:
        """The modules whose tensors score the channels."""
        return tuple(dict.fromkeys(module for module, _, _ in self._slices["scoring"]))

    def squared_scores(self) -> Tensor:
        """(size,) sum over scoring tensors of each channel's squared norm (with gradient)."""
        scores = [piece.unit_norms(piece.whole()) for piece in self.slices("scoring")]
        return torch.stack(scores).sum(dim=0)

    def dead_units(self) -> int:
        """Units at exactly zero in every tensor of the group (as the model computes with it now)."""
        alive = torch.zeros(self.size, dtype=torch.bool, device=self.threshold_squared.device)
        for role in self.ROLES:
            for piece in self.slices(role):
                alive |= piece.unit_norms(getattr(piece.module, piece.tensor_name).detach()) != 0
        return int((~alive).sum())

    def _versions(self) -> tuple:
        return (*(_version_key(piece.tensor()) for piece in self.slices("scoring")), self.pruned(self.sparsity))

    def is_stale(self) -> bool:
        return self._differs(self._versions())

    def refresh(self) -> None:
        """Recompute t^2 over the channel scores at the current sparsity (after an optimizer step)."""
        with torch.no_grad():
            pruned = self.pruned(self.sparsity)
            if pruned == 0:
                self.threshold_squared.fill_(-math.inf)
            else:
                scores = self.squared_scores().reshape(1, -1)  # (1, size)
                self.threshold_squared.copy_(midpoint(*order_statistics(scores, pruned)).square().reshape(()))
        self.update_coefficients()
        self._key = self._versions()

    def mask(self) -> Tensor:
        """(size,) the soft mask the network computes with now (with gradient through the scores)."""
        if _is_compiling():
            self.compiled_forward = True
        elif self.is_stale():
            self.refresh()
        return soft_mask_from_inverse(self.squared_scores(), *self.coefficients())

    def pruned(self, sparsity: float) -> int:
        """Channels pruned at `sparsity`; at least one channel always stays."""
        return min(pruned_count(sparsity, self.size), self.size - 1)

    def soft_mask(self, sparsity: float) -> Tensor:
        """(size,) the straightforward soft mask over the group's channels at `sparsity`."""
        return self._mask_rows(self.squared_scores().reshape(1, -1), self.pruned(sparsity)).reshape(-1)

    def keep_mask(self, sparsity: float) -> Tensor:
        """(size,) True for the channels a hard cut keeps."""
        return hard_keep_mask(self.squared_scores().detach().reshape(1, -1), self.pruned(sparsity)).reshape(-1)

    def extra_repr(self) -> str:
        return f"{self.name!r}, {self.size} {self.kind}s, " + super().extra_repr()


class ChannelMask(nn.Module):
    """Parametrization of one gated tensor (a weight, bias or norm affine): scales each channel's
    entries along `dim` by the group's mask and leaves the tensor's other entries alone."""

    structure = "channel"

    def __init__(self, group: ChannelGroup, dim: int, positions: Tensor, owns_group: bool = True) -> None:
        super().__init__()
        if owns_group:
            self.group = group
        else:  # not a submodule: the group's state is saved once, under the tensor that owns it (safetensors refuses a tensor saved twice)
            self.__dict__["group"] = group
        self.dim = dim
        self.register_buffer("positions", positions, persistent=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Checkpoints of the first 0.1.0 saved the group's state under every gated tensor: a copy of the
        owner's, dropped here so that they load strictly."""
        if "group" not in self._modules:
            for key in [key for key in state_dict if key.startswith(prefix + "group.")]:
                del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _scale(self, tensor: Tensor, mask: Tensor) -> Tensor:
        return scale_units(tensor, self.dim, self.positions, mask)

    def forward(self, tensor: Tensor) -> Tensor:
        return self._scale(tensor, self.group.mask())

    def soft(self, tensor: Tensor, sparsity: float) -> Tensor:
        """Every channel scaled by its soft mask: what the network computes with before the hard cut."""
        return self._scale(tensor, self.group.soft_mask(sparsity))

    def finalized(self, tensor: Tensor, sparsity: float) -> Tensor:
        """Kept channels as trained (scaled by m), pruned channels exactly 0."""
        scaled = self._scale(tensor, self.group.soft_mask(sparsity) * self.group.keep_mask(sparsity))
        return scaled.where(scaled != 0, 0.0)  # a negative entry times 0 is -0.0: store +0.0
