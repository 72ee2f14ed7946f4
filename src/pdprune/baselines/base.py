"""What every pruning method in the benchmark shares: one spec, and a step counter aligned with PDP's schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from pdprune.structure import find_structured_units

__all__ = ["MethodSpec", "Baseline", "selected_weights", "channel_producers"]


@dataclass(frozen=True)
class MethodSpec:
    """The budget every method gets: the same target, structure and timing.

    Args:
        sparsity: fraction of weights (of channels, for "channel") to prune.
        structure: "unstructured", "N:M" or "channel".
        warmup_epochs: dense training before pruning starts.
        ramp_end_epoch: when gradual methods reach the target.
        steps_per_epoch: optimizer steps per epoch.
        options: the method's own settings, by the names in its `OPTIONS` (e.g. PQuantML's temperature).
    """

    sparsity: float
    structure: str
    warmup_epochs: float
    ramp_end_epoch: float
    steps_per_epoch: int
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def start_step(self) -> int:
        return round(self.warmup_epochs * self.steps_per_epoch)

    @property
    def end_step(self) -> int:
        return max(self.start_step, round(self.ramp_end_epoch * self.steps_per_epoch))


class Baseline:
    """A step counter with state; subclasses prune in `on_step` and bake masks in `finalize`."""

    OPTIONS: ClassVar[tuple[str, ...]] = ()  # the names a MethodSpec's `options` may use

    def __init__(self, model: nn.Module, spec: MethodSpec) -> None:
        unknown = sorted(set(spec.options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no option {unknown}; its options: {list(self.OPTIONS)}")
        self.model, self.spec = model, spec
        self.steps_done = 0

    def step(self) -> None:
        self.steps_done += 1
        self.on_step()

    def on_step(self) -> None:
        raise NotImplementedError

    def finalize(self) -> nn.Module:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])


def selected_weights(model: nn.Module, types: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) -> dict[str, nn.Module]:
    """Module name -> module for the layers every method prunes by default (Conv and Linear)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, types)}


def channel_producers(model: nn.Module, example_inputs: Tensor, selected: set[str]) -> set[str]:
    """The layers of `selected` whose output channels every channel method prunes: the producers of
    the channel groups that pdprune's removal check accepts (not a model output, not a zero-padded
    shortcut), so that all methods prune the same layers."""
    units, _ = find_structured_units(model, example_inputs, selected)
    return {piece.module for unit in units if unit.kind == "channel" for piece in unit.scoring}
