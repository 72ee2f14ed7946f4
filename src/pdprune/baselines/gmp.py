"""Gradual magnitude pruning (Zhu & Gupta, 2017, "To prune, or not to prune"), our implementation.

Sparsity follows s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3 from the end of warm-up to the
end of the ramp; every `dt` steps the global magnitude masks are recomputed. The forward pass uses
w * mask, so pruned weights get no gradient; `finalize` bakes the mask in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pdprune.baselines.base import Baseline, MethodSpec, selected_weights
from pdprune.masks import hard_keep_mask, pruned_count
from pdprune.schedule import global_budgets

__all__ = ["GradualMagnitude", "FixedMask", "cubic_sparsity"]

UPDATES_PER_EPOCH = 10


class FixedMask(nn.Module):
    """Parametrization w -> w * mask with the mask a buffer (saved with the model)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight))  # on the weight's device: the model may be on a GPU already

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask


def cubic_sparsity(step: int, start: int, end: int, target: float) -> float:
    """Zhu & Gupta's cubic schedule from 0 at `start` to `target` at `end`."""
    if step < start:
        return 0.0
    if step >= end:
        return target
    return target * (1 - (1 - (step - start) / (end - start)) ** 3)


class GradualMagnitude(Baseline):
    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model, spec)
        self.layers = selected_weights(model)
        self.interval = max(1, spec.steps_per_epoch // UPDATES_PER_EPOCH)
        for module in self.layers.values():
            parametrize.register_parametrization(module, "weight", FixedMask(module.weight.detach()))

    def on_step(self) -> None:
        if self.steps_done < self.spec.start_step or (self.steps_done - self.spec.start_step) % self.interval:
            return
        sparsity = cubic_sparsity(self.steps_done, self.spec.start_step, self.spec.end_step, self.spec.sparsity)
        weights = {name: module.parametrizations.weight.original for name, module in self.layers.items()}
        with torch.no_grad():
            # Pruned weights keep their old values underneath the mask; rank what the network uses.
            effective = {name: (w * self.layers[name].parametrizations.weight[0].mask).square() for name, w in weights.items()}
            budgets = global_budgets(effective, sparsity)
            for name, module in self.layers.items():
                keep = hard_keep_mask(effective[name].reshape(1, -1), pruned_count(budgets[name], effective[name].numel()))
                module.parametrizations.weight[0].mask.copy_(keep.view_as(effective[name]))

    def finalize(self) -> nn.Module:
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self.model
