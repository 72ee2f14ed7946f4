"""What a structured pruning unit is, as plain data: which slices of which tensors belong to each unit."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Slice", "UnitSpec"]


@dataclass(frozen=True)
class Slice:
    """Entries `positions[i]` (a list per unit) of `module.tensor_name` along `dim` belong to unit i."""

    module: str
    tensor_name: str
    dim: int
    positions: list[list[int]]


@dataclass(frozen=True)
class UnitSpec:
    """A structured pruning group: `size` units (channels or heads) that live or die together across
    its tensors. `scoring` slices score the units; `gated` ones carry the soft mask during training;
    `cleared` ones are zeroed for pruned units at `finalize()`."""

    name: str
    kind: str  # "channel" or "head"
    size: int
    scoring: list[Slice]
    gated: list[Slice]
    cleared: list[Slice] = field(default_factory=list)
