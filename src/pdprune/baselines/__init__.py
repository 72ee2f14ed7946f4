"""The peers PDP is measured against, each behind the same small interface as PDPPruner
(`step()`, `finalize()`, `state_dict()`, `load_state_dict()`), built by name."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from pdprune.baselines.base import Baseline, MethodSpec
from pdprune.baselines.coreml import CoreMLMagnitude
from pdprune.baselines.gmp import GradualMagnitude
from pdprune.baselines.oneshot import OneShotMagnitude
from pdprune.baselines.pquant import PQuantPDP
from pdprune.baselines.srste import SRSTE
from pdprune.baselines.torch_ao import TorchAOSparsifier
from pdprune.baselines.torch_pruning import TorchPruningChannels

__all__ = ["BASELINES", "build_baseline", "structure_kind", "Baseline", "MethodSpec"]

# name -> (structures it handles, builder). The last two are third-party peers: pip install 'pdprune[peers]'.
BASELINES: dict[str, tuple[tuple[str, ...], Callable[[nn.Module, MethodSpec, Tensor], Baseline]]] = {
    "gmp": (("unstructured",), lambda model, spec, example: GradualMagnitude(model, spec)),
    "torch_ao": (("unstructured",), lambda model, spec, example: TorchAOSparsifier(model, spec)),
    "oneshot": (("unstructured",), lambda model, spec, example: OneShotMagnitude(model, spec)),
    "torch_pruning": (("channel",), TorchPruningChannels),
    "srste": (("N:M",), lambda model, spec, example: SRSTE(model, spec)),
    "pquant_pdp": (("unstructured", "channel"), PQuantPDP),
    "coreml_magnitude": (("unstructured", "N:M", "channel"), CoreMLMagnitude),
}


def structure_kind(structure: str) -> str:
    """The kind of structure that BASELINES lists: "unstructured", "channel", or "N:M" for any pattern such as "2:4"."""
    return structure if structure in ("unstructured", "channel") else "N:M"


def build_baseline(name: str, model: nn.Module, spec: MethodSpec, example_inputs: Tensor) -> Baseline:
    """Attach baseline `name` to `model`. Raises ValueError for an unknown name or unsupported structure."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    structures, builder = BASELINES[name]
    if structure_kind(spec.structure) not in structures:
        raise ValueError(f"baseline {name!r} handles {list(structures)} sparsity, not {spec.structure!r}")
    return builder(model, spec, example_inputs)
