"""Attaching PDP to a model: which modules, which structure, which parametrizations; all or nothing.

The pruner calls `attach` once; everything here runs before the model is touched, then registers
every parametrization or none.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pdprune.config import PRUNABLE_MODULE_TYPES, PruningConfig, parse_structure
from pdprune.parametrizations import ChannelGroup, ChannelMask, MaskState, NMMask, SoftMask, UnstructuredMask
from pdprune.structure import find_channel_groups

__all__ = ["Attached", "attach", "check_finite"]


@dataclass
class Attached:
    """What `attach` registered: the pruning units, every parametrized tensor, channel-group members."""

    units: dict[str, MaskState]
    tensors: dict[str, tuple[nn.Module, str]]
    group_members: dict[str, dict[str, Tensor]]
    skipped: dict[str, str]


def attach(model: nn.Module, config: PruningConfig, example_inputs: Tensor | Sequence[Tensor] | None) -> Attached:
    """Select the modules `config` names, build their masks, and register them, all or nothing.

    Raises:
        ValueError, RuntimeError: nothing to prune, a pattern that matches nothing, NaN/Inf weights,
            an attached pruner already, an impossible structure; the model is left untouched.
    """
    selected = _select_modules(model, config)
    check_finite({f"{name}.weight": module.weight for name, module in selected.items()})
    units, registrations, skipped = _build_units(model, selected, config, example_inputs)
    tensors = _register(registrations)
    group_members: dict[str, dict[str, Tensor]] = {}
    for tensor, _, _, mask in registrations:
        if isinstance(mask, ChannelMask):
            group_members.setdefault(mask.group.name, {})[tensor] = mask.indices
    return Attached(units, tensors, group_members, skipped)


def _select_modules(model: nn.Module, config: PruningConfig) -> dict[str, nn.Module]:
    """Module name -> module for every layer the config selects; errors name the pattern or the problem."""
    kinds = tuple(PRUNABLE_MODULE_TYPES[name] for name in config.module_types)
    candidates = {name: module for name, module in model.named_modules() if isinstance(module, kinds)}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module) and any(
            isinstance(p, (SoftMask, ChannelMask)) for plist in module.parametrizations.values() for p in plist
        ):
            raise RuntimeError(
                f"a PDP mask is already attached to {name!r}; finalize() or detach() the first pruner "
                "before attaching another"
            )
    for pattern in (*config.include, *config.exclude, *config.layer_structures):
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
    return selected


Registration = tuple[str, nn.Module, str, nn.Module]  # (tensor name, module, "weight"/"bias", parametrization)


def _build_units(
    model: nn.Module, selected: dict[str, nn.Module], config: PruningConfig, example_inputs: Tensor | Sequence[Tensor] | None
) -> tuple[dict[str, MaskState], list[Registration], dict[str, str]]:
    """Create every unit and the parametrizations to register, without touching the model yet."""
    relative = config.temperature_mode == "relative"
    units: dict[str, MaskState] = {}
    registrations: list[Registration] = []
    skipped: dict[str, str] = {}
    channel_modules = set()
    ties = _tied_weights(model)
    masked_weights: set[int] = set()
    for name, module in selected.items():
        structure = parse_structure(config.structure_of(name))
        if id(module.weight) in masked_weights:
            continue  # tied to a weight masked already: one mask serves every module that shares it
        if structure == "channel":
            if len(ties.get(id(module.weight), ())) > 1:
                raise ValueError(f"{name!r} shares its weight with {[n for n, _ in ties[id(module.weight)] if n != name]}; "
                                 "tied weights cannot be channel-pruned: exclude them or use an unstructured or N:M structure")
            channel_modules.add(name)
            continue
        tensor_name = f"{name}.weight"
        if structure == "unstructured":
            mask: SoftMask = UnstructuredMask(config.temperature, relative, config.compile_kernels, config.straight_through)
        else:
            n, m = structure
            if module.weight.dim() < 2 or module.weight.shape[1] % m:
                problem = (f"{n}:{m} needs the input dimension of {tensor_name!r} (shape {tuple(module.weight.shape)}) "
                           f"to be a multiple of {m}")
                if config.on_incompatible == "error":
                    raise ValueError(f"{problem}; exclude it, e.g. exclude=({name!r},), or pass on_incompatible='skip'")
                skipped[tensor_name] = problem
                continue
            mask = NMMask(n, m, config.temperature, relative, config.compile_kernels, config.straight_through)
        units[tensor_name] = mask
        masked_weights.add(id(module.weight))
        for holder_name, holder in ties.get(id(module.weight), [(name, module)]):
            registrations.append((f"{holder_name}.weight", holder, "weight", mask))
    if skipped:
        warnings.warn(f"left dense, cannot hold their N:M pattern: {sorted(skipped)}", stacklevel=3)
    if channel_modules:
        if example_inputs is None:
            raise ValueError(
                "structure 'channel' needs example_inputs=... (a batch the model accepts) to trace which channels "
                "are coupled: PDPPruner(model, config, example_inputs=torch.randn(1, 3, 32, 32))"
            )
        specs, dense_groups = find_channel_groups(model, example_inputs, channel_modules)
        if dense_groups:
            warnings.warn(f"channel groups left dense: {dense_groups}", stacklevel=3)
            skipped |= {f"channel group {name}": why for name, why in dense_groups.items()}
        for spec in specs:
            producers = [(model.get_submodule(p), _indices(spec.members[p], model.get_submodule(p))) for p in spec.producers]
            group = ChannelGroup(spec.name, spec.size, producers, config.temperature, relative)
            units[spec.name] = group
            for member, indices in spec.members.items():
                module = model.get_submodule(member)
                for tensor_name in ("weight", "bias"):
                    if getattr(module, tensor_name, None) is not None:
                        registrations.append((f"{member}.{tensor_name}", module, tensor_name, ChannelMask(group, _indices(indices, module))))
    return units, registrations, skipped


def _tied_weights(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(weight) -> every (module name, module) holding that very Parameter as its `weight`."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(weight, nn.Parameter):
            holders.setdefault(id(weight), []).append((name, module))
    return holders


def _indices(channels: list[int], module: nn.Module) -> Tensor:
    """Channel indices on the device of the module they index (the model may already be on a GPU)."""
    return torch.tensor(channels, dtype=torch.long, device=module.weight.device)


def _register(registrations: list[Registration]) -> dict[str, tuple[nn.Module, str]]:
    """Register every parametrization, all or nothing. Returns tensor name -> (module, tensor name)."""
    done: list[tuple[nn.Module, str]] = []
    try:
        for _, module, tensor_name, mask in registrations:
            parametrize.register_parametrization(module, tensor_name, mask)
            done.append((module, tensor_name))
    except Exception:
        for module, tensor_name in done:
            if parametrize.is_parametrized(module, tensor_name):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        raise
    return {name: (module, tensor_name) for name, module, tensor_name, _ in registrations}


def check_finite(tensors: Mapping[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"weight {name!r} holds NaN or Inf; PDP cannot rank its magnitudes. Lower the learning rate, "
                "check the loss for overflow, or resume from the last good checkpoint"
            )
