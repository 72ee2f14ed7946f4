"""PyTorch's own `torch.ao.pruning.WeightNormSparsifier` with its cubic scheduler (peer code, as is).

Its mask update works on the last two dimensions of a weight, so it only prunes Linear layers
correctly: convolutions stay dense (the benchmark reports the sparsity it really reached).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

from pdprune.baselines.base import Baseline, MethodSpec, selected_weights

__all__ = ["TorchAOSparsifier"]

UPDATES_PER_EPOCH = 10


class TorchAOSparsifier(Baseline):
    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        super().__init__(model, spec)
        linears = [name for name in selected_weights(model, (nn.Linear,))]
        if not linears:
            raise ValueError("torch.ao's WeightNormSparsifier prunes only Linear layers, and this model has none")
        self.interval = max(1, spec.steps_per_epoch // UPDATES_PER_EPOCH)
        self.sparsifier = WeightNormSparsifier(sparsity_level=spec.sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
        self.sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in linears])
        updates = max(1, (spec.end_step - spec.start_step) // self.interval)
        self.scheduler = CubicSL(self.sparsifier, init_sl=0.0, init_t=spec.start_step // self.interval, delta_t=1,
                                 total_t=updates, initially_zero=True)

    def on_step(self) -> None:
        if self.steps_done % self.interval == 0:
            self.sparsifier.step()
            self.scheduler.step()

    def finalize(self) -> nn.Module:
        self.sparsifier.squash_mask()
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scheduler_epoch": self.scheduler.last_epoch,
                "levels": [group["sparsity_level"] for group in self.sparsifier.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scheduler.last_epoch = int(state["scheduler_epoch"])
        for group, level in zip(self.sparsifier.groups, state["levels"]):
            group["sparsity_level"] = float(level)
