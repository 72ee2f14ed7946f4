"""The peers PDP is measured against, each behind the same small interface as PDPPruner
(`step()`, `finalize()`, `state_dict()`, `load_state_dict()`), built by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pdprune.baselines.base import Baseline, MethodSpec
from pdprune.baselines.gmp import GradualMagnitude
from pdprune.baselines.oneshot import OneShotMagnitude
from pdprune.baselines.srste import SRSTE
from pdprune.baselines.torch_ao import TorchAOSparsifier
from pdprune.baselines.torch_pruning import TorchPruningChannels

__all__ = ["BASELINES", "build_baseline", "Baseline", "MethodSpec"]

# name -> (structures it handles, builder)
BASELINES: dict[str, tuple[tuple[str, ...], Callable[[nn.Module, MethodSpec, Tensor], Baseline]]] = {
    "gmp": (("unstructured",), lambda model, spec, example: GradualMagnitude(model, spec)),
    "torch_ao": (("unstructured",), lambda model, spec, example: TorchAOSparsifier(model, spec)),
    "oneshot": (("unstructured",), lambda model, spec, example: OneShotMagnitude(model, spec)),
    "torch_pruning": (("channel",), TorchPruningChannels),
    "srste": (("N:M",), lambda model, spec, example: SRSTE(model, spec)),
}


def build_baseline(name: str, model: nn.Module, spec: MethodSpec, example_inputs: Tensor) -> Baseline:
    """Attach baseline `name` to `model`. Raises ValueError for an unknown name or unsupported structure."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    structures, builder = BASELINES[name]
    kind = spec.structure if spec.structure in ("unstructured", "channel") else "N:M"
    if kind not in structures:
        raise ValueError(f"baseline {name!r} handles {list(structures)} sparsity, not {spec.structure!r}")
    return builder(model, spec, example_inputs)
