"""Attaching PDP to a model: which modules, which structure, which parametrizations; all or nothing.

The pruner calls `attach` once; everything here runs before the model is touched, then registers
every parametrization or none.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from pdprune.config import PruningConfig, parse_structure
from pdprune.layers import EXPERT_TENSORS, LayerType, hugging_face_experts, is_lora_layer, layer_type_of, layer_types
from pdprune.parametrizations import BoundSlice, ChannelGroup, ChannelMask, MaskState, NMMask, SoftMask, UnstructuredMask
from pdprune.structure import find_structured_units
from pdprune.units import UnitSpec

__all__ = ["Attached", "attach", "check_finite", "qualified_name", "remove_masks"]


@dataclass
class Attached:
    """What `attach` registered: the pruning units, every parametrized tensor, and channel-group members."""

    units: dict[str, MaskState]
    tensors: dict[str, tuple[nn.Module, str]]
    group_members: dict[str, dict[str, Tensor]]
    skipped: dict[str, str]


def attach(model: nn.Module, config: PruningConfig, example_inputs: Any = None) -> Attached:
    """Select the modules `config` names, build their masks, and register them, all or nothing.

    Raises:
        ValueError, RuntimeError, TypeError: nothing to prune, a pattern that matches nothing, NaN/Inf or
            meta weights, an attached pruner or another parametrization already, an impossible
            structure or layout, example inputs the model rejects; the model is left untouched.
    """
    said: list[str] = []  # warned of once the checks pass: a refused model hears only why
    selected, skipped = _select_modules(model, config, said)
    check_finite({tensor_name: getattr(module, attribute) for tensor_name, (_, module, attribute) in _tensors_of(selected).items()})
    units, registrations, incompatible = _build_units(model, selected, config, example_inputs, said)
    if not units:
        reasons = [f"{name}: {why}" for name, why in (incompatible | skipped).items()]
        raise ValueError(f"nothing left to prune: {'; '.join(reasons[:8])}{f'; and {len(reasons) - 8} more' if len(reasons) > 8 else ''}")
    for message in said:  # from the caller's line; a filter that makes warnings errors raises here, nothing attached
        warnings.warn(message, stacklevel=3)
    tensors = _register(registrations)
    _declare_shared_names(model)
    group_members: dict[str, dict[str, Tensor]] = {}
    for tensor, _, _, mask in registrations:
        if isinstance(mask, ChannelMask):
            group_members.setdefault(mask.group.name, {})[tensor] = mask.positions[:, 0]
    cache_per_forward({id(module): module for module, _ in tensors.values() if hugging_face_experts(module) is not None}.values())
    return Attached(units, tensors, group_members, skipped | incompatible)


def cache_per_forward(modules: Iterable[nn.Module]) -> None:
    """Compute each masked tensor of `modules` (parametrized already) once per forward pass of the module.
    Hugging Face's experts run eagerly read their 3-D weights once per expert (`gate_up_proj[expert]`), and
    every read would compute the whole masked tensor: E times the mask's time and memory. The forward is set
    on a class of the module's own, which deep copies taken later share, and `remove_masks` drops."""
    for module in modules:
        _give_own_class(module)
        type(module).forward = _forward_with_cache


def _forward_with_cache(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    owner = next(cls for cls in type(module).__mro__ if vars(cls).get("forward") is _forward_with_cache)
    inherited = super(owner, module).forward  # through the MRO: FSDP2 puts its own class in front
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # tracing cannot cache (compiled: see the guide)
        return inherited(*args, **kwargs)
    with parametrize.cached():  # a with-block: even a KeyboardInterrupt leaves the cache off
        return inherited(*args, **kwargs)


def remove_masks(module: nn.Module, tensor_names: Iterable[str]) -> None:
    """Remove the parametrizations of `tensor_names` from `module`, leaving the tensors they wrap, and the
    per-forward cache. First the module gets a class of its own: deep copies of a parametrized module (an
    EMA model, a snapshot taken during training) share its class, and removing a parametrization deletes
    the class's property, which would leave every copy without its tensor."""
    _give_own_class(module)
    for tensor_name in tensor_names:
        if parametrize.is_parametrized(module, tensor_name):
            parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def _give_own_class(module: nn.Module) -> None:
    """A copy of the module's class (parametrize's, made for it) for it alone, without pdprune's cache."""
    cls = type(module)
    namespace = {key: value for key, value in vars(cls).items() if value is not _forward_with_cache}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def qualified_name(module_name: str, attribute: str) -> str:
    """A tensor's name in the model's state_dict (the bare attribute for the model itself)."""
    return f"{module_name}.{attribute}" if module_name else attribute


def _tensors_of(selected: Mapping[str, nn.Module]) -> dict[str, tuple[str, nn.Module, str]]:
    """Tensor name -> (module name, module, attribute) for every tensor of the selected modules that PDP
    prunes (their layer type's `tensors`), empty ones and those computed from other tensors left out."""
    known = layer_types()
    return {
        qualified_name(name, attribute): (name, module, attribute)
        for name, module in selected.items()
        for attribute in layer_type_of(module, known).tensors_of(module)
        if _plain(module, attribute) and getattr(module, attribute).numel()
    }


def _plain(module: nn.Module, attribute: str) -> bool:
    """Whether the tensor is the module's own Parameter or buffer: not computed by another
    parametrization (which moves it) or by a hook (torch.nn.utils.weight_norm sets a plain attribute)."""
    return attribute in module._parameters or attribute in module._buffers


def _weight_bearing(module: nn.Module) -> list[str]:
    """Names of the module's own Parameters that look like weights: two or more dimensions (a matrix, a
    filter bank), the first over more than one entry (a ViT's class token and position embedding,
    (1, ..., width), broadcast over the batch, are no layer's weight)."""
    return [name for name, parameter in module.named_parameters(recurse=False)
            if not nn.parameter.is_lazy(parameter) and parameter.dim() >= 2 and parameter.shape[0] > 1]


def _lora_adapters(model: nn.Module) -> set[str]:
    """The modules inside LoRA adapters: those of each LoRA layer (`is_lora_layer`) but its base layer."""
    adapters = set()
    for name, module in model.named_modules():
        if is_lora_layer(module):
            base = qualified_name(name, "base_layer")
            adapters |= {inner for inner, _ in module.named_modules(prefix=name) if inner != name and inner != base
                         and not inner.startswith(base + ".")}
    return adapters


ROUTER_NAMES = frozenset({"gate", "router"})
ROUTER_LEFT_DENSE = "the router of a mixture of experts, which picks each token's experts: left dense"


def _is_router(path: str, module: nn.Module, experts: int, width: int) -> bool:
    """Whether `module`, at `path` inside a block of experts, is their router: a weight with a row per
    expert over the experts' inputs, in a module named or typed as a gate or router (Gemma 4's
    `router.proj`, Hunyuan's `gate.wg`). A shared expert's or an attention's layer of that shape is not."""
    weight = getattr(module, "weight", None)
    named = bool(ROUTER_NAMES & set(path.split("."))) or type(module).__name__.endswith(("Router", "Gate"))
    return named and isinstance(weight, Tensor) and tuple(weight.shape) == (experts, width)


def _expert_routers(model: nn.Module, known: dict[str, LayerType]) -> set[str]:
    """The routers (`_is_router`) of a mixture's experts in the block that holds them: a class of the
    model's own or an nn.Linear (PhiMoE, AFMoE, Hunyuan). Experts are Hugging Face's (`hugging_face_experts`)
    or a layer type declared over their 3-D tensors (Llama 4's, registered by the user)."""
    routers = set()
    for name, module in model.named_modules():
        layout = layer_type_of(module, known)
        tensors = layout.tensors_of(module) if layout is not None else []
        weights = [getattr(module, tensor) for tensor in tensors]
        if not tensors or not set(tensors) <= set(EXPERT_TENSORS) or any(weight.dim() != 3 for weight in weights):
            continue
        block = name.rpartition(".")[0]
        inside_experts = {id(m) for m in module.modules()}
        for path, child in model.get_submodule(block).named_modules():
            if id(child) not in inside_experts and _is_router(path, child, weights[0].shape[0], weights[0].shape[layout.input_dim]):
                routers.add(qualified_name(block, path))
    return routers


def _select_modules(model: nn.Module, config: PruningConfig, said: list[str]) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Module name -> module for every layer the config selects, and every weight-bearing module left
    out -> why; warnings go to `said`. Errors name the pattern or the problem."""
    known = layer_types()
    wanted = set(config.module_types)
    candidates: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        _refuse_attached(name, module)
        layer_type = layer_type_of(module, known)
        if layer_type is not None and layer_type.name in wanted:
            candidates[name] = module  # one without a weight tensor is refused below, unless include/exclude leave it out
        elif _weight_bearing(module) and not isinstance(module, nn.modules.batchnorm._NormBase | parametrize.ParametrizationList):
            why = (f"its type {type(module).__name__} is not a prunable layer type; declare its weight layout with "
                   "pdprune.register_layer_type and add it to module_types" if layer_type is None else
                   f"its layer type {layer_type.name!r} is not in module_types {list(config.module_types)}")
            skipped[name] = why
    routers = _expert_routers(model, known)
    for name in routers & skipped.keys():
        skipped[name] = f"{ROUTER_LEFT_DENSE} (to prune it, declare its type with pdprune.register_layer_type, add it to module_types, and name it in include)"
    others = candidates.keys() - routers
    routers_named = {name for name in routers for p in config.include
                     if fnmatch.fnmatchcase(name, p) and not any(fnmatch.fnmatchcase(other, p) for other in others)}
    for pattern in (*config.include, *config.exclude, *config.layer_structures):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ValueError(
                f"pattern {pattern!r} matches no module of types {list(config.module_types)}; "
                f"module names look like {list(candidates)[:6]}"
            )
    selected = {}
    adapters = _lora_adapters(model)
    for name, module in candidates.items():
        if name in adapters:
            skipped[name] = ("a LoRA adapter: its update B·A adds to the base layer's whole weight, dense, so pruning it only "
                             "lowers its rank; pdprune prunes the base layer")
        elif config.include and not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            skipped[name] = "not matched by include"
        elif name in routers and name not in routers_named:
            skipped[name] = f"{ROUTER_LEFT_DENSE} (an include pattern that matches routers alone prunes it)"
        elif any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            skipped[name] = "matched by exclude"
        else:
            selected[name] = module
    for pattern in config.layer_structures:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in selected):
            left_out = {name: skipped[name] for name in candidates if fnmatch.fnmatchcase(name, pattern)}
            raise ValueError(f"pattern {pattern!r} matches only layers that are not pruned: {left_out}; "
                             "select them (include/exclude) or drop the pattern from layer_structures")
    reparametrized = {}
    for name, module in selected.items():
        _refuse_uninitialized(name, module)
        _refuse_unusable_weight(name, module, layer_type_of(module, known))
        reparametrized |= _computed_elsewhere(name, module, layer_type_of(module, known))
    if reparametrized and config.on_incompatible == "error":
        raise ValueError(f"{next(iter(reparametrized.values()))}; or pass on_incompatible='skip' to leave such weights dense")
    skipped |= reparametrized
    empty = {qualified_name(name, attribute): tuple(getattr(module, attribute).shape) for name, module in selected.items()
             for attribute in layer_type_of(module, known).tensors_of(module) if getattr(module, attribute).numel() == 0}
    for tensor_name, shape in empty.items():
        skipped[tensor_name] = f"its shape {shape} holds no elements: nothing to prune"
    selected = {name: module for name, module in selected.items() if _tensors_of({name: module})}
    if reparametrized:
        said.append(f"left dense: {sorted(reparametrized)} (another parametrization or a hook computes them; pruner.report() says why)")
    if empty and not selected:
        raise ValueError(
            f"nothing to prune: every selected weight holds no elements ({', '.join(f'{n} has shape {s}' for n, s in empty.items())}); "
            "select layers with weights (module_types, include/exclude) or check the model's sizes"
        )
    if reparametrized and not selected:
        raise ValueError(f"nothing to prune: every selected weight is computed from other tensors: {'; '.join(reparametrized.values())}")
    if not selected:
        raise ValueError(
            f"no prunable layer selected: the model has no module of types {list(config.module_types)}"
            + (" left after include/exclude" if candidates else "")
            + "; pass module_types=... or change include/exclude"
        )
    if empty:
        said.append(f"left dense: {sorted(empty)} (no elements; pruner.report() says why)")
    unknown_types = sorted({type(model.get_submodule(n)).__name__ for n, why in skipped.items() if "not a prunable layer type" in why})
    if unknown_types:
        said.append(f"left dense, not a layer type pdprune knows: modules of type {unknown_types} "
                    "(pruner.report() lists them; pdprune.register_layer_type declares one)")
    if adapters:
        said.append(
            "the model carries LoRA adapters: pdprune prunes their base layers and leaves the adapters dense, but merging them "
            "(merge_and_unload) adds their dense update to the pruned weights and undoes the pruning. Keep them unmerged, or "
            "merge them before pruning and fine-tune the whole model (a frozen base layer's mask follows its magnitudes only)")
    return selected, skipped


def _refuse_attached(name: str, module: nn.Module) -> None:
    if not parametrize.is_parametrized(module):
        return
    for tensor_name, chain in module.parametrizations.items():
        ours = [isinstance(p, (SoftMask, ChannelMask)) for p in chain]
        if any(ours):
            raise RuntimeError(
                f"a PDP mask is already attached to {name!r}; finalize() or detach() the first pruner before attaching another"
            )


def _refuse_uninitialized(name: str, module: nn.Module) -> None:
    lazy = [attribute for attribute, value in module.named_parameters(recurse=False) if nn.parameter.is_lazy(value)]
    if lazy:
        raise ValueError(
            f"{qualified_name(name, lazy[0])} of the {type(module).__name__} has no shape yet (a lazy module takes it from its first "
            "input): run the model once on a batch, model(example), then attach the pruner"
        )


def _refuse_unusable_weight(name: str, module: nn.Module, layer_type: LayerType) -> None:
    attributes = layer_type.tensors_of(module)
    if not attributes:
        matrices = _weight_bearing(module)
        wanted = " or ".join(f"`{attribute}`" for attribute in layer_type.tensors)
        raise ValueError(
            f"{name!r} is a {type(module).__name__} of layer type {layer_type.name!r}, which module_types selects, but it has "
            f"no {wanted} tensor{f' (its matrices: {matrices})' if matrices else ''}; PDP prunes the Parameter a layer keeps "
            "as `module.weight` (or the tensors its layer type names), so register only module types that hold one (as nn.Linear does). "
            f"Take {layer_type.name!r} out of module_types, or exclude the module: exclude=({name!r},)"
        )
    for attribute in attributes:
        if not _plain(module, attribute):
            continue  # left dense (`_computed_elsewhere`)
        weight = getattr(module, attribute)
        if weight.is_meta:
            raise ValueError(
                f"{qualified_name(name, attribute)} is on the meta device (shape only, no values): PDP ranks weight magnitudes. Materialize and "
                "load the weights first (e.g. model.to_empty(device='cpu') then load_state_dict), then attach the pruner"
            )
        if not weight.is_floating_point():
            raise TypeError(f"{qualified_name(name, attribute)} has dtype {weight.dtype}; PDP prunes floating-point weights: exclude it")
        layer_type.check(weight, name, attribute)


def _computed_elsewhere(name: str, module: nn.Module, layer_type: LayerType) -> dict[str, str]:
    """Tensor name -> why it stays dense, for the tensors computed from others: under another
    parametrization (weight_norm in wav2vec2's positional conv, spectral_norm in a GAN), which PDP's mask
    would change or remove, or set by a hook (torch.nn.utils.weight_norm, as HiFi-GAN uses)."""
    reasons = {}
    for attribute in layer_type.tensors_of(module):
        tensor_name, silence = qualified_name(name, attribute), f"to silence this, exclude=({name!r},)"
        if parametrize.is_parametrized(module, attribute):
            foreign = [type(p).__name__ for p in module.parametrizations[attribute]]
            reasons[tensor_name] = (
                f"{tensor_name} already carries a parametrization ({', '.join(foreign)}); PDP masks plain weights and "
                f"would change or remove it. To prune it, remove that first (torch.nn.utils.parametrize.remove_parametrizations("
                f"model.get_submodule({name!r}), {attribute!r}, leave_parametrized=True)); {silence}"
            )
        elif not _plain(module, attribute):
            reasons[tensor_name] = (
                f"{tensor_name} is no Parameter but computed by a hook from others (torch.nn.utils.weight_norm's weight_g and "
                f"weight_v, spectral_norm's weight_orig); PDP masks Parameters. To prune it, remove the hook first "
                f"(torch.nn.utils.remove_weight_norm(model.get_submodule({name!r})), or remove_spectral_norm); {silence}"
            )
    return reasons


Registration = tuple[str, nn.Module, str, nn.Module]  # (tensor name, module, "weight"/"bias", parametrization)


def _build_units(
    model: nn.Module, selected: dict[str, nn.Module], config: PruningConfig, example_inputs: Any, said: list[str]
) -> tuple[dict[str, MaskState], list[Registration], dict[str, str]]:
    """Create every unit and the parametrizations to register, without touching the model yet; warnings go
    to `said`."""
    relative = config.temperature_mode == "relative"
    soft_gradient = config.schedule.anneal_soft_gradient
    known = layer_types()
    units: dict[str, MaskState] = {}
    registrations: list[Registration] = []
    skipped: dict[str, str] = {}
    channel_modules, n_m_layers = set(), set()
    ties = _tied_weights(model)
    masked_weights: set[int] = set()
    for tensor_name, (name, module, attribute) in _tensors_of(selected).items():
        layer_type = layer_type_of(module, known)
        structure = parse_structure(config.structure_of(name))
        weight = getattr(module, attribute)
        if id(weight) in masked_weights:
            continue  # tied to a weight masked already: one mask serves every module that shares it
        asked = {holder: config.structure_of(holder) for holder, _ in ties.get(id(weight), ()) if holder in selected}
        if len(set(asked.values())) > 1:
            raise ValueError(f"{sorted(asked)} share one weight but ask for different structures {asked}; "
                             "give them one structure in layer_structures, or exclude all but one")
        if structure == "channel":
            if not layer_type.channels_in_weight:
                skipped[tensor_name] = (f"channel pruning removes the output channels of a layer's `weight`; a {type(module).__name__} holds "
                                        f"{layer_type.tensors_of(module)} instead, of which pdprune removes no channels or heads: give it an "
                                        f"unstructured or N:M structure (layer_structures={{{name!r}: '2:4'}})")
            elif len(ties.get(id(weight), ())) > 1:
                skipped[tensor_name] = (f"{name!r} shares its weight with {[n for n, _ in ties[id(weight)] if n != name]}; tied weights "
                                        "cannot be channel-pruned: give them an unstructured or N:M structure (layer_structures)")
            else:
                channel_modules.add(name)
            continue
        if structure == "unstructured":
            mask: SoftMask = UnstructuredMask(weight, config.temperature, relative, config.compile_kernels, config.straight_through, soft_gradient)
        else:
            n, m = structure
            input_dim = layer_type.input_dim
            # a grouped transposed conv keeps all its groups' inputs along dimension 0: each group's must hold whole groups of m
            per_group = weight.shape[input_dim] // module.groups if isinstance(module, nn.modules.conv._ConvTransposeNd) else weight.shape[input_dim]
            if per_group % m:
                problem = (f"{n}:{m} needs the input dimension of {tensor_name!r} (dimension {input_dim} of shape "
                           f"{tuple(weight.shape)}{f', {per_group} per group' if per_group != weight.shape[input_dim] else ''}) "
                           f"to be a multiple of {m}")
                if config.on_incompatible == "error":
                    raise ValueError(f"{problem}; exclude it, e.g. exclude=({name!r},), or pass on_incompatible='skip'")
                skipped[tensor_name] = problem
                continue
            mask = NMMask(n, m, weight, config.temperature, relative, config.compile_kernels, config.straight_through, soft_gradient, input_dim)
            n_m_layers |= {holder for holder, _ in ties.get(id(weight), [(name, module)])}
        units[tensor_name] = mask
        masked_weights.add(id(weight))
        for holder_name, holder in ties.get(id(weight), [(name, module)]):
            registrations.append((qualified_name(holder_name, attribute), holder, attribute, mask))
    if skipped:
        said.append(f"left dense: {sorted(skipped)} (pruner.report() says why)")
    if channel_modules:
        if example_inputs is None:
            raise ValueError(
                "structure 'channel' needs example_inputs=... (a batch the model accepts: a tensor, a tuple, or a dict of "
                "keyword tensors) to trace which channels and heads are coupled: "
                "PDPPruner(model, config, example_inputs=torch.randn(1, 3, 32, 32))"
            )
        specs, dense_groups = find_structured_units(model, example_inputs, channel_modules, n_m_layers)
        for spec in specs:
            group, gated = _structured_unit(model, spec, config, relative)
            units[spec.name] = group
            registrations += gated
        if dense_groups:
            said.append(f"channel groups left dense: {dense_groups}")
            skipped |= {name if name.endswith(" heads") else f"channel group {name}": why for name, why in dense_groups.items()}
    return units, registrations, skipped


def _structured_unit(model: nn.Module, spec: UnitSpec, config: PruningConfig, relative: bool) -> tuple[ChannelGroup, list[Registration]]:
    """The unit of one channel (or head) group, and the gating parametrization of each of its gated tensors."""

    def bind(piece) -> BoundSlice:
        module = model.get_submodule(piece.module)
        device = next(module.parameters()).device
        return BoundSlice(module, piece.tensor_name, piece.dim, torch.tensor(piece.positions, dtype=torch.long, device=device))  # (units, k)

    slices = {role: [bind(piece) for piece in getattr(spec, role)] for role in ChannelGroup.ROLES}
    like = slices["scoring"][0].tensor()
    group = ChannelGroup(spec.name, spec.size, slices, like, config.temperature, relative, kind=spec.kind,
                         soft_gradient=config.schedule.anneal_soft_gradient)
    gated: list[Registration] = []
    for index, (piece, bound) in enumerate(zip(spec.gated, slices["gated"])):
        mask = ChannelMask(group, piece.dim, bound.positions, owns_group=index == 0)
        gated.append((qualified_name(piece.module, piece.tensor_name), bound.module, piece.tensor_name, mask))
    return group, gated


def _tied_weights(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(weight) -> every (module name, module) holding that very Parameter as its `weight`; a module
    reused under several names counts once (one parametrization serves all its names)."""
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if isinstance(weight, nn.Parameter) and all(module is not holder for _, holder in holders.get(id(weight), ())):
            holders.setdefault(id(weight), []).append((name, module))
    return holders


def _register(registrations: list[Registration]) -> dict[str, tuple[nn.Module, str]]:
    """Register every parametrization, all or nothing. Returns tensor name -> (module, tensor name)."""
    done: list[tuple[nn.Module, str]] = []
    try:
        for _, module, tensor_name, mask in registrations:
            parametrize.register_parametrization(module, tensor_name, mask)
            done.append((module, tensor_name))
    except BaseException:
        for module, tensor_name in reversed(done):
            if parametrize.is_parametrized(module, tensor_name):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
        raise
    return {name: (module, tensor_name) for name, module, tensor_name, _ in registrations}


def _declare_shared_names(model: nn.Module) -> None:
    """Let Hugging Face checkpoints take the masked model: `save_pretrained` (and so every Trainer
    checkpoint) refuses a tensor saved under several names unless all but one are declared tied. The
    parametrizations make such names: a tied weight's original and its mask's state appear under each
    module holding it (a channel group's state appears once: `ChannelMask`). Every name after the first is
    declared in `_tied_weights_keys` of the ParametrizationList holding it (transformers collects that
    attribute from every submodule; the list goes at finalize), so the file keeps one copy, and loading
    it fills the one tensor that all the names share."""
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        kept = first.setdefault(id(tensor), name)
        if kept == name or ".parametrizations." not in name:
            continue
        owner, _, inside = name.rpartition(".parametrizations.")
        tensor_name, _, relative = inside.partition(".")
        holder = model.get_submodule(owner).parametrizations[tensor_name]
        holder.__dict__.setdefault("_tied_weights_keys", {})[re.escape(relative)] = kept


def check_finite(tensors: Mapping[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"weight {name!r} holds NaN or Inf; PDP cannot rank its magnitudes. Lower the learning rate, "
                "check the loss for overflow, or resume from the last good checkpoint"
            )
