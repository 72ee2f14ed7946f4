"""PDP's training schedule: dense warm-up, per-layer budgets, then a linear ramp to the budgets.

Cho et al. (2023), Sec. 3: after `warmup_epochs` of dense training the per-layer targets r_l come from
one global magnitude sort, and layer l is pruned at r_l(e) = min(1, eps * (e - s + 1)) * r_l in epoch e.
Epochs may be fractional: calling `step()` once per optimizer step with `steps_per_epoch` set moves the
ramp smoothly; calling it once per epoch with `steps_per_epoch=1` reproduces the paper's per-epoch steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["ScheduleConfig", "Schedule", "global_budgets", "lamp_budgets", "uniform_budgets", "ALLOCATIONS", "real_number"]

ALLOCATIONS = ("global", "uniform", "lamp")
RAMP_SHAPES = ("linear", "cubic")
RAMP_UPDATES = ("step", "epoch")


def real_number(name: str, value: Any, example: str) -> float:
    """`value` as a finite float: any real number (numpy's too), never a bool, NaN or infinity.

    Raises:
        TypeError: not a real number; ValueError: NaN or infinite. Both name the argument.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}; {example}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}; {example}")
    return float(value)


@dataclass(frozen=True)
class ScheduleConfig:
    """When pruning starts and how fast it reaches the target.

    Args:
        warmup_epochs: epochs of dense training before any mask applies (the paper's s).
        ramp_rate: eps, the fraction of the target added per epoch (public PDP code uses 0.015).
        ramp_end_epoch: alternatively, the epoch by which the target is reached; sets eps to
            1 / (ramp_end_epoch - warmup_epochs + 1). Give at most one of the two.
        steps_per_epoch: how many `step()` calls make one epoch (1 when stepping once per epoch).
        anneal_end_epoch: not in the paper, off by default: from the end of the ramp to this epoch the
            temperature shrinks geometrically to `anneal_factor` times its value, so that the soft mask
            the network trains with becomes the hard mask of `finalize()` before training ends.
        anneal_factor: the temperature's final fraction when annealing.
        anneal_soft_gradient: not in the paper, off by default: while annealing, the backward pass keeps
            the slope of the mask at the starting temperature (a surrogate gradient). The sharpened
            mask's own slope grows as 1/tau at each threshold and throws the weights there far at every
            step; N:M has a threshold per group, so many weights (ResNet-20 at 1:4: 2.6 points better
            than the plain anneal; at channels it did not help: README).
        reallocate: not in the paper, off by default: redo the global allocation at every new epoch of
            the ramp (as gradual magnitude pruning does at each update) instead of once after warm-up.
        ramp_shape: "linear" (the paper's r_l(e) = min(1, eps * (e - s + 1)) * r_l) or "cubic"
            (1 - (1 - linear)^3, Zhu & Gupta's shape: most of the pruning early, while the network is
            still redundant, and little at the end; not in the PDP paper).
        ramp_updates: "step" (the budget grows at every `step()`, e counting fractional epochs) or
            "epoch" (e counts whole epochs from the end of warm-up, as the paper's formula reads and
            PQuantML implements it: the budget rises once per epoch, by eps at a time).
    """

    warmup_epochs: float = 1.0
    ramp_rate: float | None = None
    ramp_end_epoch: float | None = None
    steps_per_epoch: int = 1
    anneal_end_epoch: float | None = None
    anneal_factor: float = 1e-3
    anneal_soft_gradient: bool = False
    ramp_shape: str = "linear"
    reallocate: bool = False
    ramp_updates: str = "step"

    def __post_init__(self) -> None:
        warmup = real_number("warmup_epochs", self.warmup_epochs, "e.g. 1 dense epoch first")
        if warmup < 0:
            raise ValueError(f"warmup_epochs must be a finite number >= 0, got {self.warmup_epochs}")
        object.__setattr__(self, "warmup_epochs", warmup)
        if self.ramp_rate is not None and self.ramp_end_epoch is not None:
            raise ValueError(
                f"give ramp_rate or ramp_end_epoch, not both (got {self.ramp_rate} and {self.ramp_end_epoch})"
            )
        if self.ramp_rate is not None:
            rate = real_number("ramp_rate", self.ramp_rate, "e.g. 0.015 per epoch")
            if not 0 < rate <= 1:
                raise ValueError(f"ramp_rate must be in (0, 1], got {self.ramp_rate}; e.g. 0.015 per epoch")
            object.__setattr__(self, "ramp_rate", rate)
        if self.ramp_end_epoch is not None:
            ramp_end = real_number("ramp_end_epoch", self.ramp_end_epoch, "the epoch at which the target is reached")
            if not ramp_end >= warmup:
                raise ValueError(f"ramp_end_epoch must be >= warmup_epochs ({warmup:g}), got {self.ramp_end_epoch}")
            object.__setattr__(self, "ramp_end_epoch", ramp_end)
        if not isinstance(self.ramp_shape, str) or self.ramp_shape not in RAMP_SHAPES:
            raise ValueError(f"ramp_shape must be one of {RAMP_SHAPES}, got {self.ramp_shape!r}")
        if not isinstance(self.ramp_updates, str) or self.ramp_updates not in RAMP_UPDATES:
            raise ValueError(f"ramp_updates must be one of {RAMP_UPDATES}, got {self.ramp_updates!r}")
        factor = real_number("anneal_factor", self.anneal_factor, "e.g. 1e-3")
        if not 0 < factor <= 1:
            raise ValueError(f"anneal_factor must be in (0, 1], got {self.anneal_factor}; e.g. 1e-3")
        object.__setattr__(self, "anneal_factor", factor)
        if self.anneal_end_epoch is not None:
            anneal_end = real_number("anneal_end_epoch", self.anneal_end_epoch, "an epoch after the ramp ends")
            if not anneal_end > self.ramp_end:
                raise ValueError(f"anneal_end_epoch must come after the ramp ends (epoch {self.ramp_end:g}), got {self.anneal_end_epoch}")
            object.__setattr__(self, "anneal_end_epoch", anneal_end)
        for name in ("anneal_soft_gradient", "reallocate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.anneal_soft_gradient and self.anneal_end_epoch is None:
            raise ValueError("anneal_soft_gradient applies while annealing: set anneal_end_epoch too, or leave it off")
        if isinstance(self.steps_per_epoch, bool) or not isinstance(self.steps_per_epoch, numbers.Integral) or self.steps_per_epoch < 1:
            raise ValueError(
                f"steps_per_epoch must be an int >= 1, got {self.steps_per_epoch!r}; "
                "pass len(train_loader) when calling step() after every optimizer step"
            )
        object.__setattr__(self, "steps_per_epoch", int(self.steps_per_epoch))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScheduleConfig:
        """A config from `asdict(config)` or a hand-written dict; unknown keys are named."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ScheduleConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    @property
    def ramp_end(self) -> float:
        """The epoch at which the ramp reaches the target: s - 1 + 1 / eps."""
        return self.warmup_epochs - 1 + 1 / self.epsilon

    def temperature_factor(self, epoch: float) -> float:
        """1 until the ramp ends; then, if annealing, geometric down to `anneal_factor` at `anneal_end_epoch`."""
        if self.anneal_end_epoch is None or epoch <= self.ramp_end:
            return 1.0
        progress = min(1.0, (epoch - self.ramp_end) / max(self.anneal_end_epoch - self.ramp_end, 1e-12))
        return self.anneal_factor**progress

    @property
    def epsilon(self) -> float:
        """The per-epoch ramp rate eps, whichever way it was given (0.015 if neither)."""
        if self.ramp_end_epoch is not None:
            return 1.0 / (self.ramp_end_epoch - self.warmup_epochs + 1)
        return 0.015 if self.ramp_rate is None else self.ramp_rate

    def ramp_fraction(self, epoch: float) -> float:
        """min(1, eps * (e - s + 1)) after warm-up, 0 during it: the fraction of each budget applied."""
        if epoch < self.warmup_epochs:
            return 0.0
        if self.ramp_updates == "epoch":
            epoch = self.warmup_epochs + math.floor(epoch - self.warmup_epochs + 1e-9)  # 1e-9: steps / steps_per_epoch rounds
        linear = min(1.0, self.epsilon * (epoch - self.warmup_epochs + 1))
        return linear if self.ramp_shape == "linear" else 1 - (1 - linear) ** 3


class Schedule:
    """Where training stands in the schedule: the count of `step()` calls, and the epoch of the last
    budget allocation."""

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.steps_done = 0
        self.allocated_epoch: int | None = None

    @property
    def allocation_due(self) -> bool:
        """True once warm-up ends, and with `reallocate` again at each new epoch until the ramp ends."""
        if self.in_warmup:
            return False
        if self.allocated_epoch is None:
            return True
        return self.config.reallocate and int(self.epoch) > self.allocated_epoch and self.ramp_fraction < 1.0

    @property
    def epoch(self) -> float:
        """Epochs done so far, fractional: `steps_done / steps_per_epoch`."""
        return self.steps_done / self.config.steps_per_epoch

    @property
    def in_warmup(self) -> bool:
        """True while no mask applies yet (before `warmup_epochs`)."""
        return self.epoch < self.config.warmup_epochs

    @property
    def ramp_fraction(self) -> float:
        """The fraction of each budget applied now (`ScheduleConfig.ramp_fraction` at the current epoch)."""
        return self.config.ramp_fraction(self.epoch)

    @property
    def temperature_factor(self) -> float:
        """What tau is multiplied by now: 1, or less while annealing."""
        return self.config.temperature_factor(self.epoch)

    def step(self) -> None:
        """Count one more `PDPPruner.step()`."""
        self.steps_done += 1

    def state_dict(self) -> dict[str, int | None]:
        """Steps done and the epoch of the last allocation: all a resumed schedule needs."""
        return {"steps_done": self.steps_done, "allocated_epoch": self.allocated_epoch}

    def load_state_dict(self, state: Mapping[str, int | None]) -> None:
        """Continue from `state_dict()`."""
        self.steps_done = int(state["steps_done"])
        self.allocated_epoch = state.get("allocated_epoch")


def uniform_budgets(sizes: Mapping[str, int], sparsity: float) -> dict[str, float]:
    """Every tensor pruned at the same `sparsity`."""
    return {name: sparsity for name in sizes}


def global_budgets(squared_magnitudes: Mapping[str, Tensor], sparsity: float) -> dict[str, float]:
    """Per-tensor sparsities from one magnitude sort over all tensors together.

    The round(sparsity * N) smallest magnitudes of the whole model are pruned; each tensor's budget is
    the fraction of its own weights among them, so that sum(r_l * n_l) equals the global count exactly.
    Ties at the cut go to tensors in the order given (then by index), the same on every process.

    Args:
        squared_magnitudes: name -> tensor of squared weights (any shape).
        sparsity: the fraction of all weights to prune, in [0, 1).
    Returns:
        name -> budget r_l, the fraction of that tensor to prune.
    """
    flat = {name: values.detach().flatten() for name, values in squared_magnitudes.items()}
    total = sum(values.numel() for values in flat.values())
    pruned = int(round(sparsity * total))
    if pruned == 0:
        return {name: 0.0 for name in flat}
    # The pruned-th smallest value over the whole model: one selection, then counts per tensor.
    cut = torch.cat([values.float().cpu() for values in flat.values()]).kthvalue(pruned).values
    below = {name: int((values.float() < cut).sum()) for name, values in flat.items()}
    ties_left = pruned - sum(below.values())
    budgets = {}
    for name, values in flat.items():
        ties = min(ties_left, int((values.float() == cut).sum()))
        ties_left -= ties
        budgets[name] = (below[name] + ties) / values.numel()
    return budgets


def lamp_budgets(squared_magnitudes: Mapping[str, Tensor], sparsity: float) -> dict[str, float]:
    """Per-tensor sparsities from one global sort of layer-adaptive magnitude scores (LAMP; Lee et al.,
    ICLR 2021): score(w) = w^2 / (sum of the squares of the weights of its tensor at least as large).

    Scale-free across tensors (fan-in scaling does not decide which layer loses most) and the largest
    weight of every tensor scores 1, so no tensor is ever emptied. Not in the PDP paper: an option.
    Where the weights at least as large sum to 0 (an all-zero tensor, e.g. a zero-initialized head),
    they are tied, and score as any constant tensor does: 1 / (their count), so the largest still scores 1.
    """
    scores = {}
    for name, values in squared_magnitudes.items():
        ordered, order = values.detach().flatten().float().sort()
        tail_sums = ordered.flip(0).cumsum(0).flip(0)  # sum of the squares at least as large
        tail_counts = torch.arange(ordered.numel(), 0, -1, dtype=ordered.dtype, device=ordered.device)  # how many at least as large
        score = torch.empty_like(ordered)
        score[order] = torch.where(tail_sums > 0, ordered / tail_sums.clamp_min(torch.finfo(ordered.dtype).tiny), 1 / tail_counts)
        scores[name] = score
    return global_budgets(scores, sparsity)
