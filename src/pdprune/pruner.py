"""PDPPruner: attaches PDP's soft masks to a model, steps the schedule, finalizes to exact sparsity.

    pruner = PDPPruner(model, PruningConfig(sparsity=0.9, schedule=ScheduleConfig(steps_per_epoch=len(loader))))
    ...  optimizer.step(); pruner.step()      # after every optimizer step
    pruner.finalize()                          # plain nn.Module, exactly 90% zeros
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pdprune._version import __version__
from pdprune.masks import pruned_count
from pdprune.parametrizations import NMMask, SoftMask, UnstructuredMask
from pdprune.report import PRUNABLE_MODULE_TYPES, LayerSparsity, SparsityReport
from pdprune.schedule import ALLOCATIONS, Schedule, ScheduleConfig, global_budgets, uniform_budgets

__all__ = ["PruningConfig", "PDPPruner", "DEFAULT_TEMPERATURE", "parse_structure"]

DEFAULT_TEMPERATURE = 0.05
"""Default tau relative to t^2; chosen by `benchmarks/temperature_sweep.py` (see the README)."""

TEMPERATURE_MODES = ("relative", "absolute")
STATE_FORMAT = 1
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_structure(structure: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"2:4"` -> (2, 4). Raises ValueError for anything else."""
    if structure == "unstructured":
        return None
    match = _NM_PATTERN.match(structure)
    if match is None:
        raise ValueError(
            f"structure must be 'unstructured' or 'N:M' such as '2:4', got {structure!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r} needs 0 < N < M (N weights kept of every M), e.g. '2:4'")
    return n, m


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and how hard.

    Args:
        sparsity: fraction of the selected weights to prune, in [0, 1). N:M layers prune 1 - N/M instead.
        structure: "unstructured" or an N:M pattern such as "2:4".
        allocation: "global" (one magnitude sort over all layers, the paper's way) or "uniform".
        temperature: tau of the soft mask; relative to t^2 by default, absolute if `temperature_mode`
            is "absolute" (the paper's form; public code uses 1e-4 to 1e-5).
        temperature_mode: "relative" or "absolute".
        include: fnmatch patterns of module names to prune (empty: every module of `module_types`).
        exclude: fnmatch patterns of module names never to prune.
        module_types: which module classes hold prunable weights.
        schedule: warm-up and ramp.
    """

    sparsity: float = 0.9
    structure: str = "unstructured"
    allocation: str = "global"
    temperature: float = DEFAULT_TEMPERATURE
    temperature_mode: str = "relative"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    module_types: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise ValueError(
                f"sparsity must be in [0, 1), got {self.sparsity!r}; pass a fraction, e.g. 0.9 for 90% zeros"
            )
        parse_structure(self.structure)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {self.temperature!r}; "
                f"e.g. {DEFAULT_TEMPERATURE} (relative) or 1e-4 (absolute)"
            )
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {self.temperature_mode!r}")
        unknown = [name for name in self.module_types if name not in PRUNABLE_MODULE_TYPES]
        if unknown or not self.module_types:
            raise ValueError(
                f"module_types must name some of {sorted(PRUNABLE_MODULE_TYPES)}, got {list(self.module_types)}"
            )
        for name in ("include", "exclude", "module_types"):
            if isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a tuple of strings, got the string {getattr(self, name)!r}; wrap it: ({getattr(self, name)!r},)")
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PruningConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PruningConfig fields {unknown}; valid fields: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("schedule"), Mapping):
            values["schedule"] = ScheduleConfig(**values["schedule"])
        return cls(**values)


@dataclass
class _Layer:
    module: nn.Module
    mask: SoftMask

    @property
    def weight(self) -> Tensor:
        """The dense trainable weight (the parametrization's `original`)."""
        return self.module.parametrizations.weight.original


class PDPPruner:
    """Parameter-free Differentiable Pruning (Cho et al., NeurIPS 2023) on a PyTorch model.

    Creating the pruner attaches a soft mask to every selected weight; `step()` advances the schedule;
    `finalize()` bakes the exact hard mask into plain weights and detaches. The dense weights stay the
    only trainable parameters.
    """

    def __init__(self, model: nn.Module, config: PruningConfig | None = None) -> None:
        self.model = model
        self.config = config if config is not None else PruningConfig()
        self.schedule = Schedule(self.config.schedule)
        self.budgets: dict[str, float] | None = None
        self.finalized = False
        modules = _select_modules(model, self.config)
        _check_finite({name: module.weight for name, module in modules.items()})
        self._layers = _attach(modules, self.config)
        self._update_sparsities()

    @property
    def tensor_names(self) -> list[str]:
        """Fully-qualified names of the pruned tensors, e.g. `layer1.0.conv1.weight`."""
        return list(self._layers)

    def step(self) -> None:
        """Advance the schedule by one step; call after every `optimizer.step()` (or once per epoch)."""
        self._check_attached("step()")
        self.schedule.step()
        self._update_sparsities()

    def current_sparsity(self, name: str) -> float:
        """The sparsity the soft mask of tensor `name` applies now."""
        return self._layers[name].mask.sparsity

    def _update_sparsities(self) -> None:
        if self.schedule.in_warmup:
            fraction = 0.0
        else:
            if self.budgets is None:
                self.budgets = self._allocate()
            fraction = self.schedule.ramp_fraction
        for name, layer in self._layers.items():
            layer.mask.sparsity = 0.0 if self.budgets is None else fraction * self.budgets[name]

    def _allocate(self) -> dict[str, float]:
        """Per-tensor budgets: fixed for N:M tensors, global or uniform for the others."""
        weights = {name: layer.weight for name, layer in self._layers.items()}
        _check_finite(weights)
        budgets = {}
        free = {}
        for name, layer in self._layers.items():
            if isinstance(layer.mask, NMMask):
                budgets[name] = 1 - layer.mask.n / layer.mask.m
            else:
                free[name] = weights[name]
        if self.config.allocation == "global":
            budgets |= global_budgets({name: w.detach().square() for name, w in free.items()}, self.config.sparsity)
        else:
            budgets |= uniform_budgets({name: w.numel() for name, w in free.items()}, self.config.sparsity)
        emptied = [name for name, budget in budgets.items() if budget >= 1.0]
        if emptied:
            warnings.warn(
                f"global allocation prunes every weight of {emptied}; the network may lose those layers. "
                "Use allocation='uniform' or exclude them",
                stacklevel=3,
            )
        return {name: budgets[name] for name in self._layers}

    def finalize(self) -> nn.Module:
        """Bake the hard mask (m >= 0.5, exact count) into plain weights and remove the parametrizations.

        Kept weights keep the value the network trained with, w * m(w); pruned ones become exactly 0.
        Returns the model, now an ordinary `nn.Module` whose `state_dict` loads into the unpruned class.
        """
        self._check_attached("finalize()")
        if self.budgets is None:
            warnings.warn("finalize() during warm-up: the whole budget is pruned at once, untrained", stacklevel=2)
            self.budgets = self._allocate()
        elif self.schedule.ramp_fraction < 1.0:
            warnings.warn(
                f"finalize() at {100 * self.schedule.ramp_fraction:.0f}% of the ramp: the hard mask prunes the rest "
                "at once. Train longer or set ScheduleConfig(ramp_end_epoch=...) before the last epoch",
                stacklevel=2,
            )
        weights = {name: layer.weight for name, layer in self._layers.items()}
        _check_finite(weights)
        baked = {}
        with torch.no_grad():
            for name, layer in self._layers.items():
                weight, budget = weights[name], self.budgets[name]
                baked[name] = weight * layer.mask.soft_mask(weight, budget) * layer.mask.keep_mask(weight, budget)
        for name, layer in self._layers.items():
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
            with torch.no_grad():
                layer.module.weight.copy_(baked[name])
        self.finalized = True
        return self.model

    def detach(self) -> nn.Module:
        """Remove the soft masks and restore the dense weights, as if the pruner had never been attached."""
        self._check_attached("detach()")
        for layer in self._layers.values():
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=False)
        self.finalized = True
        return self.model

    def report(self) -> SparsityReport:
        """Per-tensor target (budget), current (schedule) and achieved (exact zeros) sparsity."""
        budgets = self.budgets if self.budgets is not None else self._allocate()
        rows = []
        for name, layer in self._layers.items():
            weight = layer.module.weight
            target = budgets[name]
            current = None if self.finalized else layer.mask.sparsity
            rows.append(LayerSparsity(name, layer.mask.structure, weight.numel(), int((weight == 0).sum()), target, current))
        return SparsityReport(tuple(rows))

    def state_dict(self) -> dict[str, Any]:
        """Schedule position, budgets and config: numbers, strings and lists only (weights_only-safe)."""
        return {
            "format": STATE_FORMAT,
            "pdprune_version": __version__,
            "config": self.config.to_dict(),
            "schedule": self.schedule.state_dict(),
            "budgets": None if self.budgets is None else dict(self.budgets),
            "finalized": self.finalized,
            "tensors": {name: list(layer.module.weight.shape) for name, layer in self._layers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`: the next `step()` continues exactly where the saved one stopped.

        Raises:
            ValueError: the state comes from another model, another config, or another state format.
        """
        self._check_attached("load_state_dict()")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"pruner state format {state.get('format')!r} (pdprune {state.get('pdprune_version')}) is not "
                f"the format {STATE_FORMAT} of pdprune {__version__}; resume with the pdprune version that saved it"
            )
        saved = {name: list(shape) for name, shape in state["tensors"].items()}
        ours = {name: list(layer.module.weight.shape) for name, layer in self._layers.items()}
        if saved != ours:
            missing = sorted(set(saved) - set(ours))
            extra = sorted(set(ours) - set(saved))
            reshaped = sorted(name for name in set(saved) & set(ours) if saved[name] != ours[name])
            raise ValueError(
                "the pruner state was saved for a different model: "
                f"tensors missing here {missing[:5]}, tensors not in the state {extra[:5]}, "
                f"different shapes {reshaped[:5]}. Load it into the same architecture and config"
            )
        if state["config"] != self.config.to_dict():
            changed = sorted(key for key, value in self.config.to_dict().items() if state["config"].get(key) != value)
            raise ValueError(
                f"the pruner state was saved with a different config (fields {changed} differ); "
                "create the pruner with PruningConfig.from_dict(state['config'])"
            )
        if state["finalized"]:
            raise ValueError(
                "this pruner state was saved after finalize(); load the finalized model's state_dict into the "
                "plain architecture instead of resuming the pruner"
            )
        self.schedule.load_state_dict(state["schedule"])
        self.budgets = None if state["budgets"] is None else {name: float(state["budgets"][name]) for name in self._layers}
        self._update_sparsities()

    def _check_attached(self, action: str) -> None:
        if self.finalized:
            raise RuntimeError(
                f"{action} after finalize()/detach(): the masks are gone from the model. "
                "Create a new PDPPruner to prune again"
            )


def _select_modules(model: nn.Module, config: PruningConfig) -> dict[str, nn.Module]:
    """Name -> module for every weight the config selects; errors name the pattern or the problem."""
    kinds = tuple(PRUNABLE_MODULE_TYPES[name] for name in config.module_types)
    candidates = {name: module for name, module in model.named_modules() if isinstance(module, kinds)}
    for name, module in candidates.items():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, SoftMask) for p in module.parametrizations.weight
        ):
            raise RuntimeError(
                f"a PDP mask is already attached to {name!r}; finalize() or detach() the first pruner "
                "before attaching another"
            )
    for pattern in config.include + config.exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ValueError(
                f"pattern {pattern!r} matches no module of types {list(config.module_types)}; "
                f"module names look like {list(candidates)[:6]}"
            )
    selected = {
        name: module
        for name, module in candidates.items()
        if (not config.include or any(fnmatch.fnmatchcase(name, p) for p in config.include))
        and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)
    }
    if not selected:
        raise ValueError(
            f"no prunable layer selected: the model has no module of types {list(config.module_types)}"
            + (" left after include/exclude" if candidates else "")
            + "; pass module_types=... or change include/exclude"
        )
    return {f"{name}.weight" if name else "weight": module for name, module in selected.items()}


def _attach(modules: Mapping[str, nn.Module], config: PruningConfig) -> dict[str, _Layer]:
    """Register a soft mask on every selected weight, all or nothing."""
    pattern = parse_structure(config.structure)
    relative = config.temperature_mode == "relative"
    masks: dict[str, SoftMask] = {}
    for name, module in modules.items():
        if pattern is None:
            masks[name] = UnstructuredMask(config.temperature, relative)
        else:
            n, m = pattern
            if module.weight.dim() < 2 or module.weight.shape[1] % m:
                raise ValueError(
                    f"{config.structure} needs the input dimension of {name!r} (shape "
                    f"{tuple(module.weight.shape)}) to be a multiple of {m}; exclude it, e.g. exclude=({name.removesuffix('.weight')!r},)"
                )
            masks[name] = NMMask(n, m, config.temperature, relative)
    attached: list[nn.Module] = []
    try:
        for name, module in modules.items():
            parametrize.register_parametrization(module, "weight", masks[name])
            attached.append(module)
    except Exception:
        for module in attached:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        raise
    return {name: _Layer(module, masks[name]) for name, module in modules.items()}


def _check_finite(weights: Mapping[str, Tensor]) -> None:
    for name, weight in weights.items():
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(
                f"weight {name!r} holds NaN or Inf; PDP cannot rank its magnitudes. Lower the learning rate, "
                "check the loss for overflow, or resume from the last good checkpoint"
            )
