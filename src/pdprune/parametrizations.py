"""Soft masks as `torch.nn.utils.parametrize` parametrizations: the model computes with w * m(w).

Each parametrization keeps what its forward pass needs (the layer's current sparsity and temperature)
in the model itself, through `get_extra_state`, so `model.state_dict()` alone restores a pruned model
mid-training. The pruner only decides *which* sparsity each layer has at each step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pdprune.masks import (
    group_along_inputs,
    hard_keep_mask,
    midpoint_threshold,
    pruned_count,
    soft_mask,
    temperature_for,
    ungroup_along_inputs,
)

__all__ = ["SoftMask", "UnstructuredMask", "NMMask"]


class SoftMask(nn.Module):
    """Base of PDP's parametrizations: maps a weight to w * m(w) at the current `sparsity`.

    Subclasses say how scores are grouped (`soft_mask`) and which weights a hard cut keeps (`keep_mask`).
    """

    structure = "?"

    def __init__(self, temperature: float, relative_temperature: bool) -> None:
        super().__init__()
        self.sparsity = 0.0
        self.temperature = temperature
        self.relative_temperature = relative_temperature

    def forward(self, weight: Tensor) -> Tensor:
        if self.sparsity == 0.0:
            return weight
        return weight * self.soft_mask(weight, self.sparsity)

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The soft mask m(w) of `weight` pruned at `sparsity` (same shape as `weight`)."""
        raise NotImplementedError

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        """The hard mask (m >= 0.5) at `sparsity` with the exact count: True where a weight stays."""
        raise NotImplementedError

    def _mask_rows(self, squared_scores: Tensor, pruned: int) -> Tensor:
        """Soft mask along the last dimension of `squared_scores`, `pruned` of each row below t."""
        if pruned == 0:
            return torch.ones_like(squared_scores)
        if pruned >= squared_scores.shape[-1]:
            return torch.zeros_like(squared_scores)
        threshold = midpoint_threshold(squared_scores, pruned)
        tau = temperature_for(threshold, self.temperature, self.relative_temperature)
        return soft_mask(squared_scores, threshold, tau)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "temperature": self.temperature,
            "relative_temperature": self.relative_temperature,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sparsity = float(state["sparsity"])
        self.temperature = float(state["temperature"])
        self.relative_temperature = bool(state["relative_temperature"])

    def extra_repr(self) -> str:
        mode = "relative" if self.relative_temperature else "absolute"
        return f"sparsity={self.sparsity:.4f}, temperature={self.temperature:g} ({mode})"


class UnstructuredMask(SoftMask):
    """One threshold over the whole tensor: any weight may go."""

    structure = "unstructured"

    def soft_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        squared = weight.square()
        flat = squared.reshape(1, -1)  # (1, n): the whole tensor is one row
        return self._mask_rows(flat, pruned_count(sparsity, flat.shape[-1])).view_as(weight)

    def keep_mask(self, weight: Tensor, sparsity: float) -> Tensor:
        flat = weight.detach().square().reshape(1, -1)  # (1, n)
        return hard_keep_mask(flat, pruned_count(sparsity, flat.shape[-1])).view_as(weight)


class NMMask(SoftMask):
    """A threshold inside every group of `m` weights along the input dimension; `n` of each stay.

    The layer's sparsity ramps up to 1 - n/m like an unstructured budget; at sparsity s each group
    prunes round(s * m) weights, so the pattern tightens in whole steps (for 2:4: 0, then 1, then 2).
    """

    def __init__(self, n: int, m: int, temperature: float, relative_temperature: bool) -> None:
        super().__init__(temperature, relative_temperature)
        self.n, self.m = n, m

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

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "n": self.n, "m": self.m}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.n, self.m = int(state["n"]), int(state["m"])

    def extra_repr(self) -> str:
        return f"{self.n}:{self.m}, " + super().extra_repr()
