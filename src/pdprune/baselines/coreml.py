"""Apple's train-time magnitude pruner, `coremltools.optimize.torch.pruning.MagnitudePruner`
(coremltools 9.0, BSD-3-Clause), with its `MagnitudePrunerConfig`, `PolynomialDecayScheduler` and
pruning hooks (torch.nn.utils.prune's forward pre-hook: the layer computes with w_orig * mask).

Zhu & Gupta's cubic schedule, per layer (every layer is pruned to the target; no global budget):
update k of K sets the sparsity to target * (1 - (1 - k / (K - 1))^3), one update every tenth of an
epoch from the end of warm-up to the ramp end (as our GMP), and the mask stays fixed in between and
after. Structures:
    unstructured   granularity "per_scalar" (the default)
    N:M            n_m_ratio = (M - N, M) (coremltools counts the zeros), groups along the inputs (dim=1)
    channel        granularity "per_channel": a Conv's output filters by L2 norm; coremltools treats
                   a 2-D weight per scalar, so Linear layers stay dense here
Layers: every Conv and Linear layer, as for every method here; for N:M those whose inputs are a
multiple of M (coremltools would pad the others); for channels the Convs among the producers of
pdprune's channel groups. `finalize()` is coremltools' own (the masks fused into the weights); the
export metadata buffers it adds for its converter are removed, which leaves the plain architecture.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from pdprune.baselines.base import Baseline, MethodSpec, channel_producers, selected_weights
from pdprune.config import parse_structure

__all__ = ["CoreMLMagnitude"]

UPDATES_PER_EPOCH = 10
METADATA_PREFIX = "_COREML_"  # coremltools' STATE_DICT_METADATA_BUFFER_PREFIX


def _import_pruning():
    try:
        from coremltools.optimize.torch import pruning
    except ImportError as error:
        raise ImportError(f"the 'coreml_magnitude' baseline needs coremltools ({error}); pip install 'pdprune[peers]'") from error
    return pruning


class CoreMLMagnitude(Baseline):
    """coremltools' MagnitudePruner on `model`, prepared in place."""

    def __init__(self, model: nn.Module, spec: MethodSpec, example_inputs: Tensor) -> None:
        super().__init__(model, spec)
        pruning = _import_pruning()
        structure = parse_structure(spec.structure)
        layers = selected_weights(model)
        options: dict[str, Any] = {"target_sparsity": float(spec.sparsity)}
        if isinstance(structure, tuple):
            n, m = structure
            options |= {"n_m_ratio": (m - n, m), "dim": 1}  # coremltools sets the target to (M - N) / M itself
            layers = {name: layer for name, layer in layers.items() if layer.weight.shape[1] % m == 0}
        elif structure == "channel":
            options["granularity"] = "per_channel"
            producers = channel_producers(model, example_inputs, set(layers))
            layers = {name: layer for name, layer in layers.items() if name in producers and layer.weight.dim() >= 3}
        if not layers:
            raise ValueError(f"coremltools' MagnitudePruner finds no layer to prune at {spec.structure!r} in this model "
                             "(N:M needs inputs that are a multiple of M; channels, Conv layers in a channel group)")
        scheduler = pruning.PolynomialDecayScheduler(update_steps=self._update_steps(), power=3)
        config = pruning.MagnitudePrunerConfig(module_name_configs={
            re.escape(name): pruning.ModuleMagnitudePrunerConfig(scheduler=scheduler, **options) for name in layers})
        self.pruner = pruning.MagnitudePruner(model, config)
        self.pruner.prepare(inplace=True)

    def _update_steps(self) -> list[int]:
        """The optimizer steps at which the sparsity changes; coremltools counts its first step() as 1."""
        interval = max(1, self.spec.steps_per_epoch // UPDATES_PER_EPOCH)
        steps = [*range(self.spec.start_step, self.spec.end_step, interval), self.spec.end_step]
        return sorted({max(1, step) for step in steps})

    def on_step(self) -> None:
        self.pruner.step()

    def finalize(self) -> nn.Module:
        self.pruner.finalize(inplace=True)
        for module in self.model.modules():
            for name in [name for name in module._buffers if name.startswith(METADATA_PREFIX)]:
                del module._buffers[name]
        return self.model

    def state_dict(self) -> dict[str, Any]:
        """The schedule's position; the masks and the pruning amounts are in the model's state."""
        return {**super().state_dict(), "levels": {name: float(info.sparsity_level) for name, info in self.pruner._pruner_info.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # coremltools keeps its step count and current levels in Python only (no state_dict of its own)
        self.pruner._step_count = self.steps_done
        for name, info in self.pruner._pruner_info.items():
            info.sparsity_level = float(state["levels"][name])
