"""PruningConfig: what to prune, with which structure, how hard. Checks itself when created."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pdprune.layers import DEFAULT_MODULE_TYPES, known_names
from pdprune.schedule import ALLOCATIONS, ScheduleConfig, real_number

__all__ = ["PruningConfig", "parse_structure", "DEFAULT_TEMPERATURE", "TEMPERATURE_MODES"]

DEFAULT_TEMPERATURE = 0.05
"""Default tau relative to t^2; chosen by `benchmarks/temperature_sweep.py` (see the README)."""

TEMPERATURE_MODES = ("relative", "absolute")
ON_INCOMPATIBLE = ("skip", "error")
_NM_PATTERN = re.compile(r"^(\d+):(\d+)$")


def parse_structure(structure: str) -> str | tuple[int, int]:
    """`"unstructured"` and `"channel"` stay as they are; `"2:4"` -> (2, 4). Anything else: ValueError."""
    if structure in ("unstructured", "channel"):
        return structure
    match = _NM_PATTERN.match(structure) if isinstance(structure, str) else None
    if match is None:
        raise ValueError(f"structure must be 'unstructured', 'channel' or 'N:M' such as '2:4', got {structure!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"structure {structure!r} needs 0 < N < M (N weights kept of every M), e.g. '2:4'")
    return n, m


@dataclass(frozen=True)
class PruningConfig:
    """What to prune and how hard.

    Args:
        sparsity: fraction of the selected weights (or, for "channel", of the channels) to prune, in
            [0, 1). N:M layers prune 1 - N/M instead.
        structure: "unstructured", "channel" or an N:M pattern such as "2:4", for every selected layer.
        layer_structures: fnmatch pattern of module names -> structure, overriding `structure` for the
            modules it matches (the first matching pattern wins), e.g. {"fc*": "2:4"}.
        allocation: how the unstructured budget is split between tensors: "lamp" (the default: one sort
            of layer-adaptive magnitude scores, Lee et al. 2021; scale-free across layers and never empties
            a layer), "global" (one sort of the magnitudes themselves, the paper's way: on standard
            initializations it gives some layers 100%, e.g. all six query projections of a T5, an HF
            ResNet's classifier), or "uniform". Channel groups are always pruned uniformly at `sparsity`.
        temperature: tau of the soft mask; relative to t^2 by default, absolute if `temperature_mode`
            is "absolute" (the paper's form; public code uses 1e-4 to 1e-5).
        temperature_mode: "relative" or "absolute".
        include: fnmatch patterns of module names to prune (empty: every module of `module_types`).
        exclude: fnmatch patterns of module names never to prune.
        module_types: names of the layer types whose weights are pruned (`pdprune.layers`: "Linear",
            "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
            "MultiheadAttention", transformers' "Conv1D" by default; "Embedding"; any registered with
            `pdprune.register_layer_type`).
        on_incompatible: what to do with a weight that cannot be pruned as asked (an N:M pattern whose M
            does not divide its input dimension, another parametrization such as weight_norm on it):
            "skip" it with a warning that names it, or raise an "error".
        straight_through: not in the paper, off by default: pruned weights also get the gradient of their
            masked value, as if kept (SR-STE's straight-through estimator), so that a nearly hard mask
            (late in an anneal) can still change which weights stay (on ResNet-20 at 1:4 it gained
            nothing over the plain anneal; with `anneal_soft_gradient` it is level with SR-STE, three
            seeds, and the CLI turns it on with the soft gradient: README). Unstructured and N:M only: a pruned
            channel's zeroed norm scale would block the gradient to its filters anyway.
        compile_kernels: run the soft mask of large tensors as `torch.compile`d kernels (falls back to
            eager PyTorch by itself where compiling is impossible).
        schedule: warm-up and ramp.
    """

    sparsity: float = 0.9
    structure: str = "unstructured"
    layer_structures: dict[str, str] = field(default_factory=dict)
    allocation: str = "lamp"
    temperature: float = DEFAULT_TEMPERATURE
    temperature_mode: str = "relative"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES
    on_incompatible: str = "skip"
    straight_through: bool = False
    compile_kernels: bool = True
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self) -> None:
        sparsity = real_number("sparsity", self.sparsity, "a fraction, e.g. 0.9 for 90% zeros")
        if not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}; pass a fraction, e.g. 0.9 for 90% zeros")
        object.__setattr__(self, "sparsity", sparsity)
        for name in ("structure", "allocation", "temperature_mode", "on_incompatible"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {getattr(self, name)!r}")
        parse_structure(self.structure)
        if not isinstance(self.layer_structures, Mapping):
            raise TypeError(f"layer_structures must be a dict of pattern -> structure, got {self.layer_structures!r}")
        for pattern, structure in self.layer_structures.items():
            if not isinstance(pattern, str):
                raise TypeError(
                    f"layer_structures keys must be fnmatch patterns of module names (strings), got {type(pattern).__name__} "
                    f"{pattern!r}; e.g. {{{str(pattern)!r}: {structure!r}}} (names as model.named_modules() gives them)"
                )
            try:
                parse_structure(structure)
            except ValueError as error:
                raise ValueError(f"layer_structures[{pattern!r}]: {error}") from None
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        example = f"e.g. {DEFAULT_TEMPERATURE} (relative) or 1e-4 (absolute)"
        temperature = real_number("temperature", self.temperature, example)
        if not temperature > 0:
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}; {example}")
        object.__setattr__(self, "temperature", temperature)
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {self.temperature_mode!r}")
        if self.on_incompatible not in ON_INCOMPATIBLE:
            raise ValueError(f"on_incompatible must be one of {ON_INCOMPATIBLE}, got {self.on_incompatible!r}")
        for name in ("straight_through", "compile_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.schedule, ScheduleConfig):
            raise TypeError(
                f"schedule must be a ScheduleConfig, got {type(self.schedule).__name__} {self.schedule!r}; "
                "pass schedule=ScheduleConfig(...) (PruningConfig.from_dict takes a dict)"
            )
        if self.straight_through and "channel" in (self.structure, *self.layer_structures.values()):
            raise ValueError(
                "straight_through applies to unstructured and N:M masks, not to 'channel': a pruned channel's "
                "zeroed norm scale blocks the gradient to its filters; leave it off for channel pruning"
            )
        for name in ("include", "exclude", "module_types"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise TypeError(f"{name} must be a tuple of strings, got the string {value!r}; wrap it: ({value!r},)")
            try:
                value = tuple(value)
            except TypeError:
                raise TypeError(f"{name} must be a tuple of strings, got {value!r}") from None
            if not all(isinstance(item, str) for item in value):
                raise TypeError(f"{name} must be a tuple of strings, got {value!r}")
            object.__setattr__(self, name, value)
        unknown = [name for name in self.module_types if name not in known_names()]
        if unknown or not self.module_types:
            raise ValueError(
                f"module_types must name some of {sorted(known_names())}, got {list(self.module_types)}; "
                "declare other layer types with pdprune.register_layer_type"
            )
        object.__setattr__(self, "layer_structures", dict(self.layer_structures))

    def structure_of(self, module_name: str) -> str:
        """The structure for module `module_name`: the first matching `layer_structures` pattern, else `structure`."""
        return next((s for p, s in self.layer_structures.items() if fnmatch.fnmatchcase(module_name, p)), self.structure)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain values (the schedule as a nested dict), for JSON and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PruningConfig:
        """A config from `to_dict()`'s output (a pruner state's `"config"`) or a hand-written dict.

        Raises:
            ValueError: an unknown field (the valid ones are listed), or a value the config refuses.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown PruningConfig fields {unknown}; valid fields: {sorted(known)}")
        values = dict(values)
        if isinstance(values.get("schedule"), Mapping):
            values["schedule"] = ScheduleConfig.from_dict(values["schedule"])
        return cls(**values)
