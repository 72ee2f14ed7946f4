"""N:M training with a straight-through estimator and SR-STE's sparse-refined decay (Zhou et al.,
ICLR 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"); ours.

After warm-up, every forward pass uses the magnitude N:M mask of the current weights; the backward
pass hands the gradient straight to every weight and adds lambda * (1 - mask) * w, which pulls the
pruned weights towards zero so that the mask settles.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pdprune.baselines.base import Baseline, MethodSpec, selected_weights
from pdprune.config import parse_structure
from pdprune.masks import nm_keep_mask as _keep

__all__ = ["SRSTE", "SPARSE_REFINED_DECAY"]

SPARSE_REFINED_DECAY = 2e-4  # lambda_W of the paper


def nm_keep_mask(weight: Tensor, n: int, m: int) -> Tensor:
    return _keep(weight.detach().square(), m - n, m)


class _SparseRefinedSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask).to(weight.dtype) * weight, None, None


class NMStraightThrough(nn.Module):
    def __init__(self, n: int, m: int, decay: float) -> None:
        super().__init__()
        self.n, self.m, self.decay = n, m, decay
        self.active = False

    def forward(self, weight: Tensor) -> Tensor:
        if not self.active:
            return weight
        return _SparseRefinedSTE.apply(weight, nm_keep_mask(weight, self.n, self.m), self.decay)


class SRSTE(Baseline):
    def __init__(self, model: nn.Module, spec: MethodSpec, decay: float = SPARSE_REFINED_DECAY) -> None:
        super().__init__(model, spec)
        structure = parse_structure(spec.structure)
        if not isinstance(structure, tuple):
            raise ValueError(f"SR-STE trains N:M sparsity; got structure {spec.structure!r}")
        n, m = structure
        self.layers = {name: module for name, module in selected_weights(model).items() if module.weight.dim() >= 2 and module.weight.shape[1] % m == 0}
        self.masks = {}
        for name, module in self.layers.items():
            self.masks[name] = NMStraightThrough(n, m, decay)
            parametrize.register_parametrization(module, "weight", self.masks[name])
        self.on_step()

    def on_step(self) -> None:
        for mask in self.masks.values():
            mask.active = self.steps_done >= self.spec.start_step

    def finalize(self) -> nn.Module:
        for mask in self.masks.values():
            mask.active = True
        for module in self.layers.values():
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self.model

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.on_step()
