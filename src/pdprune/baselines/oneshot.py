"""One-shot global magnitude pruning with `torch.nn.utils.prune` at the end of warm-up, then
fine-tuning with the fixed mask for the rest of training (peer code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from pdprune.baselines.base import Baseline, MethodSpec, selected_weights

__all__ = ["OneShotMagnitude"]


class OneShotMagnitude(Baseline):
    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model, spec)
        self.layers = selected_weights(model)
        self.pruned = False
        if spec.start_step == 0:
            self._prune()

    def _prune(self) -> None:
        for layer in self.layers.values():  # the peer flattens weights with view(), which channels-last ones refuse
            layer.weight.data = layer.weight.data.contiguous()
        prune.global_unstructured([(m, "weight") for m in self.layers.values()], pruning_method=prune.L1Unstructured, amount=self.spec.sparsity)
        self.pruned = True

    def on_step(self) -> None:
        if not self.pruned and self.steps_done >= self.spec.start_step:
            self._prune()

    def finalize(self) -> nn.Module:
        if not self.pruned:
            self._prune()
        for module in self.layers.values():
            prune.remove(module, "weight")
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruned": self.pruned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-create the pruning hooks (masks all ones) so that the saved `weight_orig`/`weight_mask` load."""
        super().load_state_dict(state)
        if state["pruned"] and not self.pruned:
            for module in self.layers.values():
                prune.custom_from_mask(module, "weight", torch.ones_like(module.weight))
            self.pruned = True
