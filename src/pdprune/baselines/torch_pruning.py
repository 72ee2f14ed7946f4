"""Torch-Pruning's magnitude pruner with its own iterative schedule (peer code), applied softly.

Torch-Pruning chooses which channels to remove at each of its iterative steps (L2 group magnitude,
linear ratio schedule); we zero them, in every coupled tensor, instead of removing them mid-training,
so the optimizer and the training loop stay the same as for every other method. A zeroed channel
scores 0, so Torch-Pruning's cumulative choice keeps it. `compact()` removes the channels afterwards,
exactly as Torch-Pruning would have. Groups that pdprune's removal check rejects stay dense here too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pdprune.baselines.base import Baseline, MethodSpec, channel_producers, selected_weights

__all__ = ["TorchPruningChannels"]


class TorchPruningChannels(Baseline):
    def __init__(self, model: nn.Module, spec: MethodSpec, example_inputs: Tensor) -> None:
        super().__init__(model, spec)
        import torch_pruning as tp

        layers = selected_weights(model)
        prunable = channel_producers(model, example_inputs, set(layers))
        ignored = [module for name, module in layers.items() if name not in prunable]
        self.events = max(1, round(spec.ramp_end_epoch - spec.warmup_epochs))  # one pruning step per ramp epoch
        was_training = model.training
        model.eval()
        self.pruner = tp.pruner.MagnitudePruner(
            model, example_inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=spec.sparsity, iterative_steps=self.events, ignored_layers=ignored,
        )
        model.train(was_training)
        self.zeroed: list[tuple[nn.Module, int, list[int]]] = []  # (module, dim, channels) to keep at zero
        self.events_done = 0

    def _event_steps(self) -> list[int]:
        span = self.spec.end_step - self.spec.start_step
        return [self.spec.start_step + round(span * k / self.events) for k in range(self.events)]

    def on_step(self) -> None:
        if self.events_done < self.events and self.steps_done >= self._event_steps()[self.events_done]:
            self._prune_event()
        self._rezero()

    def _prune_event(self) -> None:
        for group in self.pruner.step(interactive=True):
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
                    continue
                outputs = self.pruner.DG.is_out_channel_pruning_fn(handler)
                dim = 0 if outputs or isinstance(module, nn.modules.batchnorm._BatchNorm) else 1
                if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not outputs and module.groups > 1:
                    continue  # a depthwise conv's input channels are its output channels, zeroed as outputs
                self.zeroed.append((module, dim, list(item.idxs)))
        self.events_done += 1
        self._rezero()

    def _rezero(self) -> None:
        with torch.no_grad():
            for module, dim, channels in self.zeroed:
                for tensor in (module.weight, getattr(module, "bias", None) if dim == 0 else None):
                    if tensor is not None:
                        tensor.index_fill_(dim, torch.tensor(channels, device=tensor.device), 0)

    def finalize(self) -> nn.Module:
        self._rezero()
        return self.model

    def state_dict(self) -> dict[str, Any]:
        names = {module: name for name, module in self.model.named_modules()}
        return {**super().state_dict(), "events_done": self.events_done,
                "zeroed": [(names[module], dim, channels) for module, dim, channels in self.zeroed]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.events_done = int(state["events_done"])
        self.pruner.current_step = self.events_done
        self.zeroed = [(self.model.get_submodule(name), int(dim), list(channels)) for name, dim, channels in state["zeroed"]]
