"""Structured pruning units and their physical removal: coupled channel groups from Torch-Pruning's
dependency graph, attention heads from the attention modules we recognize.

Torch-Pruning traces the model and says which output channels must go together (the convs feeding a
residual add, a depthwise conv and its producer, a feed-forward layer's neurons and the layer that
reads them, ...). Attention blocks are opaque to it here (its customized-layer mechanism): removing
channels inside one must follow the heads, which `attention.py` finds. We trust a unit only after
checking it: the model with some of its channels (heads) zeroed must compute the same as the model with
them removed. Units that fail (a zero-padded "option A" shortcut, a position bias shared between
layers, a grouped convolution) are left dense and reported.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from pdprune.attention import HEAD_SIZE_ATTRIBUTES, HEADS_ATTRIBUTES, AttentionSpec, find_attention
from pdprune.checkpoint import load_checkpoint, save_checkpoint
from pdprune.layer_surgery import layout_pruner, torch_pruning
from pdprune.layers import is_lora_layer, layer_type_of, layer_types
from pdprune.units import Slice, UnitSpec
from pdprune.model_io import (
    ExampleInputs, call_model, describe_inputs, evaluating, has_input_values, inputs_from_description, refuse_parametrized, same_outputs,
    tensor_leaves,
)

__all__ = [
    "find_structured_units", "compact", "save_compacted", "load_compacted", "count_macs_and_parameters", "GRAPH_TIMEOUT_SECONDS",
]

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
COMPACTED_FORMAT = "pdprune.compacted/2"
GRAPH_TIMEOUT_SECONDS = 300.0
"""Torch-Pruning's dependency graph gets this long per model part before it is given up (it can loop
forever on some reshapes); the error names the part."""


# --- Torch-Pruning glue ------------------------------------------------------------------------------


@contextlib.contextmanager
def _time_bound(what: str, seconds: float = GRAPH_TIMEOUT_SECONDS) -> Iterator[None]:
    """Raise TimeoutError naming `what` if the block runs longer than `seconds` (main thread, POSIX;
    elsewhere unbounded)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def give_up(signum, frame):
        raise TimeoutError(
            f"Torch-Pruning's dependency graph did not finish within {seconds:g} s on {what}; the model is unchanged. "
            f"Exclude that part from channel pruning (exclude=(...)) or prune it with an unstructured or N:M structure"
        )

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _opaque_attention_pruner(specs: dict[int, AttentionSpec]):
    """Torch-Pruning treats a recognized attention block as one layer (hidden in, hidden out): channels
    inside it go by whole heads, which only `attention.py` knows. `specs`: id(module) -> its spec."""
    tp = torch_pruning()

    class AttentionBlockPruner(tp.pruner.function.BasePruningFunc):
        def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
            raise NotImplementedError("the channels an attention block writes are pruned by head, not one by one")

        def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
            raise NotImplementedError("the channels an attention block reads (the hidden size) are not pruned")

        def get_out_channels(self, layer: nn.Module) -> int:
            return specs[id(layer)].output_size if id(layer) in specs else None

        def get_in_channels(self, layer: nn.Module) -> int:
            return specs[id(layer)].input_size if id(layer) in specs else None

    return AttentionBlockPruner()


def _dependency_graph(model: nn.Module, example_inputs: ExampleInputs, attention: list[AttentionSpec]):
    tp = torch_pruning()
    known = layer_types()
    customized: dict[Any, Any] = {
        layer_type.module_type: layout_pruner(layer_type)
        for layer_type in known.values()
        if not issubclass(layer_type.module_type, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)) and layer_type.channels_in_weight
    }
    hooks = {module: set(module._forward_hooks) for module in model.modules()}
    with evaluating(model), _time_bound("tracing the model"), _without_cache(model):  # tracing runs a forward pass
        try:
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, output_transform=lambda outputs: _graph_outputs(outputs),
                customized_pruners=customized, verbose=False,
            )
        except BaseException as error:  # Torch-Pruning's index mappings fail on some operations (inputs are checked before)
            for module, before in hooks.items():  # its tracing hooks stay on the modules when the forward pass fails
                for key in set(module._forward_hooks) - before:
                    del module._forward_hooks[key]
            if isinstance(error, (TimeoutError, KeyboardInterrupt)) or not isinstance(error, Exception):
                raise
            failure = error
    raise ValueError(
        f"Torch-Pruning could not follow this model's channels ({type(failure).__name__}: {failure}), so no channel or head "
        "can be pruned as a unit: prune it with an unstructured or N:M structure (e.g. nn.MultiheadAttention(add_zero_attn=True) "
        "concatenates a zero column it cannot map)"
    ) from failure


@contextlib.contextmanager
def _without_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models append keys and values to a cache by concatenation, which Torch-Pruning
    cannot map; the cache plays no part in which channels are coupled."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _graph_outputs(outputs: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tensor_leaves(outputs) if leaf.requires_grad]


def _producers() -> tuple[type[nn.Module], ...]:
    """Layer types whose output channels PDP can prune: those whose `weight` holds them."""
    return tuple(layer_type.module_type for layer_type in layer_types().values()
                 if layer_type.name != "Embedding" and layer_type.channels_in_weight)


@dataclass(frozen=True)
class _ChannelGroup:
    """One group of coupled output channels, rooted at `root` (named `root_name`, pruned by `handler`).

    `members`: each coupled layer -> its output channels, one list per unit. A unit is a root channel
    with every root channel coupled to it (usually none; a fused [gate | up] projection's rows i and
    i + n feed the same neuron), so a unit's channels are scored, zeroed and removed together.
    `reason` says why the group cannot be pruned (`members` may then be empty), or is None. `readers`:
    the layers whose input channels go with the group's.
    """

    root: nn.Module
    root_name: str
    handler: Any
    members: dict[str, list[list[int]]]
    reason: str | None = None
    readers: frozenset[str] = frozenset()

    def root_channels(self, units: Iterable[int]) -> list[int]:
        return [channel for unit in units for channel in self.members[self.root_name][unit]]


def _groups(model: nn.Module, graph, skip: Iterable[str]) -> Iterator[_ChannelGroup]:
    """One `_ChannelGroup` per group of coupled output channels, each found within the time bound.
    Layers in `skip` (`_inside_attention`) are no roots. An error Torch-Pruning raises while following
    a group's channels makes a group with that reason, not a crash: the model is untouched either way."""
    names = {module: name for name, module in model.named_modules()}
    skip = {model.get_submodule(name) for name in skip}
    outputs = {module for module, node in graph.module2node.items() if not node.outputs}
    producers = _producers()
    visited: set[nn.Module] = set()
    for root in list(graph.module2node):
        if not isinstance(root, producers) or root in outputs or root not in names or root in visited or root in skip:
            continue
        pruner = graph.get_pruner_of_module(root)
        if pruner is None or pruner.get_out_channels(root) is None:
            continue
        handler = pruner.prune_out_channels
        try:
            with _time_bound(f"the channels of {names[root]!r}"):
                group = graph.get_pruning_group(root, handler, idxs=list(range(pruner.get_out_channels(root))))
                units = _coupled_root_channels(root, group, graph)
        except TimeoutError:
            raise
        except Exception as error:  # Torch-Pruning's index mappings fail on some reshapes (e.g. ZeroDivisionError)
            yield _ChannelGroup(root, names[root], handler, {}, f"Torch-Pruning could not follow these channels through the model "
                                                                f"({type(error).__name__}: {error}); they stay dense")
            continue
        for item in group:
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                visited.add(item.dep.target.module)
        yield _group_of(root, names, handler, group, units, graph, outputs)


def _group_of(root: nn.Module, names: dict[nn.Module, str], handler, group, units: list[set[int]], graph, outputs: set[nn.Module]) -> _ChannelGroup:
    """The members of Torch-Pruning's `group` (rooted at `root`, all its channels) by `units` (sets of
    root channels), and why it cannot be pruned, if so."""
    producers = _producers()
    pairs: dict[str, list[tuple[int, int]]] = {}  # member -> (root channel, its channel)
    reason = None
    readers = set()
    for item in group:
        module = item.dep.target.module
        if graph.is_in_channel_pruning_fn(item.dep.handler) and module in names:
            readers.add(names[module])
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not module.groups == module.in_channels == module.out_channels:
            reason = reason or (f"{names.get(module, type(module).__name__)!r} is a grouped convolution (groups={module.groups}): removing its "
                                "channels needs as many from each of its groups, which PDP's channel scores do not keep. "
                                "Exclude it, or prune it with an unstructured or N:M structure (layer_structures)")
        if parametrize.is_parametrized(module):  # the model's own weight_norm, ...: PDP's masks are not on yet
            reason = reason or (f"its channels run through {names.get(module, type(module).__name__)!r}, which carries another "
                                "parametrization (weight_norm, ...) that Torch-Pruning cannot shrink; remove it first to prune them")
        if not graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if module in outputs:
            reason = reason or f"the coupled layer {names[module]!r} ({type(module).__name__}) is an output of the model"
        elif not isinstance(module, producers + NORM_TYPES):
            reason = reason or (f"the coupled layer {names[module]!r} ({type(module).__name__}) is not one whose channels pdprune "
                                "removes (those of prunable layers and BatchNorm; not an embedding's or a LayerNorm's)")
        pairs.setdefault(names[module], []).extend((int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs) if r is not None)
    unit_of = {channel: position for position, unit in enumerate(units) for channel in unit}
    members = {}
    for member, mapping in pairs.items():
        positions: list[set[int]] = [set() for _ in units]
        for r, i in mapping:
            positions[unit_of[r]].add(i)
        members[member] = [sorted(p) for p in positions]
        if len({len(positions) for positions in members[member]}) != 1 or not members[member][0]:
            reason = reason or f"{member!r} holds only some of the channels, or a varying number per channel"
    if len({len(unit) for unit in units}) != 1:
        reason = reason or "Torch-Pruning couples these channels in blocks of different sizes"
    return _ChannelGroup(root, names[root], handler, members, reason, frozenset(readers))


def _coupled_root_channels(root: nn.Module, group, graph) -> list[set[int]]:
    """The root's channels that must go together, as sets ordered by their first channel.

    Torch-Pruning records each index of each part of `group` (all root channels) once, under the first
    root channel that reached it, and drops later arrivals: a fused [gate | up] projection's rows i and
    i + n meet in one neuron, yet the group shows them apart. Following every dependency of every part
    one step again shows where two root channels meet.
    """
    hybrid_index = torch_pruning()._helpers._HybridIndex
    parent = list(range(graph.get_pruner_of_module(root).get_out_channels(root)))
    first_arrival: dict[tuple[Any, Any, int], int] = {}  # (node, pruning function, index) -> a root channel that reaches it

    def find(channel: int) -> int:
        while parent[channel] != channel:
            parent[channel] = parent[parent[channel]]
            channel = parent[channel]
        return channel

    def arrive(node, handler, indices) -> None:
        for index in indices:
            if index.root_idx is not None:
                parent[find(first_arrival.setdefault((node, handler, int(index.idx)), int(index.root_idx)))] = find(int(index.root_idx))

    for item in group:
        indices = [hybrid_index(idx=int(i), root_idx=r) for r, i in zip(item.root_idxs, item.idxs)]
        arrive(item.dep.target, item.dep.handler, indices)
        for dependency in item.dep.target.dependencies:
            if not dependency.is_triggered_by(item.dep.handler):
                continue
            mapped = indices
            for mapping in dependency.index_mapping:
                mapped = mapping(mapped) if mapping is not None else mapped
            arrive(dependency.target, dependency.handler, mapped)
    components: dict[int, set[int]] = {}
    for channel in range(len(parent)):
        components.setdefault(find(channel), set()).add(channel)
    return sorted(components.values(), key=min)


def _unrecognized_attention_modules(model: nn.Module, attention: list[AttentionSpec]) -> list[str]:
    """Modules named like attention and holding heads (a head count or size, a config) that `attention.py`
    did not recognize (nor any module in or around them). CBAM's ChannelAttention, which gates channels
    and has no heads, is no attention here."""
    recognized = [spec.module for spec in attention]
    found = []
    for name, module in model.named_modules():
        kind = type(module).__name__.lower()
        if ("attention" not in kind and "attn" not in kind) or not _holds_heads(module):
            continue
        if not any(_within(name, other) or _within(other, name) for other in recognized):
            found.append(name)
    return found


def _holds_heads(module: nn.Module) -> bool:
    return (isinstance(module, nn.MultiheadAttention) or hasattr(module, "config")
            or any(isinstance(getattr(module, name, None), int) for name in (*HEADS_ATTRIBUTES, *HEAD_SIZE_ATTRIBUTES)))


def _within(name: str, outer: str) -> bool:
    """Whether module `name` is `outer` or inside it (every module is inside the model, named "")."""
    return not outer or name == outer or name.startswith(f"{outer}.")


def _inside_attention(model: nn.Module, attention: list[AttentionSpec]) -> set[str]:
    """The layers inside attention modules, recognized or not, selected or not: never roots of channel
    groups, at attach, compaction and reloading alike. Their channels go by heads (`attention.py`), and
    Torch-Pruning cannot follow them through attention's reshapes: it maps them to wrong or negative
    indices, divides by zero (Falcon's grouped heads) or loops forever (grouped-query attention)."""
    inside = {name for spec in attention for name in spec.projections}
    producers = _producers()
    for name in _unrecognized_attention_modules(model, attention):
        inside |= {inner for inner, module in model.named_modules() if inner != name and _within(inner, name) and isinstance(module, producers)}
    return inside


def _unrecognized_attention(model: nn.Module, attention: list[AttentionSpec], selected: set[str]) -> dict[str, list[str]]:
    """Modules named like attention, not recognized, that hold selected layers: name -> those layers."""
    found: dict[str, list[str]] = {}
    for name in _unrecognized_attention_modules(model, attention):
        inside = [n for n in selected if n != name and _within(n, name)]
        if inside and not any(_within(inside[0], other) for other in found):
            found[name] = sorted(inside)
    return found


def _output_dim(module: nn.Module) -> int:
    """The dimension of a layer's weight that runs over its output channels. A depthwise transposed conv
    keeps (channels, 1, *kernel): its channels lie along the input dimension of its layout."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups == module.in_channels == module.out_channels > 1:
        return 0
    layer_type = layer_type_of(module)
    return 0 if layer_type is None else layer_type.output_dim


def _channel_spec(name: str, group: _ChannelGroup, producers: tuple[str, ...], model: nn.Module) -> UnitSpec:
    scoring, gated = [], []
    for member, positions in group.members.items():
        module = model.get_submodule(member)
        if member in producers:
            scoring.append(Slice(member, "weight", _output_dim(module), positions))
        gated.append(Slice(member, "weight", _output_dim(module), positions))
        if getattr(module, "bias", None) is not None:
            gated.append(Slice(member, "bias", 0, positions))
    return UnitSpec(name, "channel", len(group.members[group.root_name]), scoring, gated)


def _zero(model: nn.Module, spec: UnitSpec, units: list[int]) -> None:
    with torch.no_grad():
        for piece in (*spec.gated, *spec.cleared):
            tensor = getattr(model.get_submodule(piece.module), piece.tensor_name)
            entries = [p for unit in units for p in piece.positions[unit]]
            tensor.index_fill_(piece.dim, torch.tensor(entries, dtype=torch.long, device=tensor.device), 0)


def _remove(model: nn.Module, spec: UnitSpec, units: list[int], graph, attention: dict[str, AttentionSpec]) -> None:
    """Physically remove `units` of `spec` from `model` (whose dependency graph is `graph`)."""
    if spec.kind == "head":
        attention[spec.name.removesuffix(" heads")].remove_units(model, units)
        return
    root_piece = spec.scoring[0]
    root = model.get_submodule(root_piece.module)
    handler = graph.get_pruner_of_module(root).prune_out_channels
    graph.get_pruning_group(root, handler, idxs=[channel for unit in units for channel in root_piece.positions[unit]]).prune()


def _removal_is_exact(model: nn.Module, specs: list[UnitSpec], example_inputs: ExampleInputs) -> bool:
    """Zero a third of each unit group's units in one copy, remove them in another, compare the outputs.
    The copies' parameters are perturbed first (alike in both): modules that start out identical, such as
    one LayerNorm per head, would hide that removing a unit shifts which of them the rest meet."""
    masked = _copy(model)
    _perturb(masked)
    removed = _copy(masked)
    attention = {spec.module: spec for spec in find_attention(removed, example_inputs)}
    graph = _dependency_graph(removed, example_inputs, list(attention.values())) if any(s.kind == "channel" for s in specs) else None
    generator = torch.Generator().manual_seed(0)
    try:
        for spec in specs:
            chosen = torch.randperm(spec.size, generator=generator)[: max(1, spec.size // 3)].tolist()
            _zero(masked, spec, chosen)
            _remove(removed, spec, chosen, graph, attention)
        masked.eval(), removed.eval()
        with torch.no_grad():
            return same_outputs(call_model(masked, example_inputs), call_model(removed, example_inputs))
    except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError, AssertionError):
        return False  # the removal broke the model


def _perturb(model: nn.Module) -> None:
    """Move every finite entry of the floating-point parameters and buffers by a few percent of their
    scale, with a fixed seed: a fresh BatchNorm's running mean of 0 would hide that, without affine
    parameters to zero, its pruned channels still pass a constant on. Positive tensors (a running
    variance) stay positive; float8 and other storage formats without arithmetic stay as they are."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or not tensor.numel() or tensor.is_meta:
                continue
            generator = generators.setdefault(tensor.device, torch.Generator(tensor.device).manual_seed(1))
            finite = tensor.isfinite()
            noise = torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype) * 0.05
            if bool((tensor.where(finite, 1) > 0).all()):
                moved = tensor * (1 + noise.abs()).where(finite, 1)
            else:
                scale = tensor.abs().where(finite, 0).sum() / finite.sum().clamp(min=1)
                moved = tensor + (noise * scale.where(scale > 0, 1)).where(finite, 0)  # a tensor of zeros moves by about 0.05
            tensor.data = moved  # new memory: an expanded buffer (stride 0) cannot be written in place


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy (to remove channels from), or a ValueError naming what PyTorch cannot copy."""
    try:
        return copy.deepcopy(model)
    except RuntimeError as error:
        if "deepcopy protocol" not in str(error):
            raise
        computed = [f"{name}.{key}" if name else key for name, module in model.named_modules()
                    for key, value in vars(module).items() if isinstance(value, torch.Tensor) and not value.is_leaf]
        raise ValueError(
            f"channel pruning removes channels from a copy of the model, and PyTorch cannot copy {computed[:4]}: tensors a hook "
            "computes (torch.nn.utils.weight_norm or spectral_norm). Use torch.nn.utils.parametrizations.weight_norm or "
            "spectral_norm instead (pdprune leaves those layers dense), or remove the hooks"
        ) from error


def _check_inputs(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Call the model once in eval mode: inputs it rejects get `call_model`'s clear error here, before
    any tracing or copying, not a raw one from deep inside."""
    with evaluating(model), torch.no_grad():
        call_model(model, example_inputs)


def find_structured_units(
    model: nn.Module, example_inputs: ExampleInputs, selected: set[str], n_m_layers: Iterable[str] = ()
) -> tuple[list[UnitSpec], dict[str, str]]:
    """Attention heads and groups of coupled output channels whose producers are all in `selected`, and
    whose channels no layer in `n_m_layers` reads (removing its input columns would break its groups of M).

    Returns:
        The units that are safe to prune, and unit group name -> why it is left dense, for the others.
    Raises:
        TypeError: the model rejects `example_inputs`.
        TimeoutError: Torch-Pruning's graph did not finish in time (the part is named).
    """
    _check_inputs(model, example_inputs)
    attention = find_attention(model, example_inputs)
    inside_attention = _inside_attention(model, attention)
    candidates, skipped = [], {}
    grouped = set()  # selected layers some head or channel group (pruned or left dense) accounts for
    for name, projections in _unrecognized_attention(model, attention, selected).items():
        grouped |= set(projections)
        module = model.get_submodule(name)
        if isinstance(module, nn.MultiheadAttention):
            packed = "in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight, k_proj_weight and v_proj_weight"
            skipped[f"{name} heads"] = (f"nn.MultiheadAttention keeps its heads in {packed}, whose heads pdprune does not remove, "
                                        f"so {projections[:4]} stay dense too. Prune it with an unstructured or N:M structure (layer_structures)")
            continue
        if wrapped := sorted(child for child, inner in module.named_children() if is_lora_layer(inner)):
            skipped[f"{name} heads"] = (f"its projections {wrapped} are LoRA layers, whose heads pdprune does not remove; "
                                        f"{projections[:4]} stay dense. Prune them with an unstructured or N:M structure (layer_structures)")
            continue
        skipped[f"{name} heads"] = (
            f"{type(model.get_submodule(name)).__name__} looks like attention but pdprune cannot tell where its heads lie "
            "(it needs query, key and value projections, a head count or head size, and an output projection reached on "
            f"example_inputs); its projections {projections[:4]} stay dense. "
            "Exclude them, or prune them with an unstructured or N:M structure (layer_structures)"
        )
    for spec in attention:
        projections = set(spec.projections)
        if not projections & selected:
            continue
        grouped |= projections
        if not projections <= selected:
            skipped[f"{spec.module} heads"] = f"its projections are not all selected for channel pruning: {sorted(projections - selected)}"
            continue
        if reparametrized := sorted(name for name in projections if parametrize.is_parametrized(model.get_submodule(name))):
            skipped[f"{spec.module} heads"] = (f"its projections {reparametrized} carry another parametrization (weight_norm, ...); "
                                               "remove it first to prune its heads")
            continue
        if spec.kv_heads < 2:
            skipped[f"{spec.module} heads"] = f"{spec.kv_heads} key-value head: nothing to prune without removing the attention"
            continue
        candidates.append(spec.unit_spec(model))
    graph = _dependency_graph(model, example_inputs, attention)
    order = {name: position for position, (name, _) in enumerate(model.named_modules())}
    producer_types = _producers()
    for group in _groups(model, graph, skip=inside_attention):
        members = group.members or {group.root_name: []}  # Torch-Pruning failed: only the root is known
        producers = tuple(sorted((n for n in members if isinstance(model.get_submodule(n), producer_types)), key=order.get))
        if not producers or not set(producers) & selected or set(producers) <= inside_attention:
            continue
        grouped |= set(producers)
        name = producers[0]
        if group.reason:
            skipped[name] = group.reason + (f" (the group's other layers: {list(producers[1:5])}{' ...' if len(producers) > 5 else ''})"
                                            if len(producers) > 1 else "")
        elif not set(producers) <= selected:
            skipped[name] = f"coupled with layers not selected for channel pruning: {sorted(set(producers) - selected)[:4]}"
        elif n_m_readers := sorted(group.readers & set(n_m_layers)):
            skipped[name] = (f"its channels are inputs of {n_m_readers[:4]}, pruned N:M: removing them would break its groups of M. "
                             "Give the reader the channel structure too, or these layers an N:M one (layer_structures)")
        else:
            candidates.append(_channel_spec(name, group, producers, model))
    if candidates and not _removal_is_exact(model, candidates, example_inputs):
        safe = []
        for candidate in candidates:
            if _removal_is_exact(model, [candidate], example_inputs):
                safe.append(candidate)
            elif candidate.kind == "head":
                skipped[candidate.name] = ("removing these heads changes the model's outputs (e.g. a norm or a position bias spanning all "
                                           "heads, or projections not laid out head after head)")
            else:
                skipped[candidate.name] = ("Torch-Pruning cannot remove these channels exactly: removing them changes the outputs of the model "
                                           "(e.g. a zero-padded shortcut, or channels that are themselves an output, such as those of a classifier)")
        candidates = safe
    for name in sorted(selected - grouped, key=order.get):
        skipped[name] = ("Torch-Pruning's graph gives its output channels no group: they are outputs of the model (e.g. a "
                         "classifier's classes), or the layer did not run on example_inputs")
    return candidates, {_display(name): why for name, why in skipped.items()}


def _display(name: str) -> str:
    """A group's name for messages: the model itself, when it is the layer, has the empty name."""
    return "(the model)" + name if not name or name.startswith(" ") else name


# --- compaction ----------------------------------------------------------------------------------------


def compact(model: nn.Module, example_inputs: ExampleInputs) -> nn.Module:
    """A copy of a finalized model without its all-zero coupled channels and heads: smaller and faster.

    A channel (head) goes when every coupled tensor (weights, biases, norm parameters; a head's query,
    key, value and output slices) is exactly zero there, so the outputs do not change; this is checked
    on `example_inputs` (a tensor, a tuple, or a dict of keyword tensors) before returning. Attention
    modules get their head counts updated. Zero channels that the outputs still need (an embedding's
    padding row, which a tied output layer turns into a class) stay, with a warning naming their group.

    Raises:
        ValueError: the model still has PDP's masks attached (finalize() first), or its outputs vary
            from call to call.
        RuntimeError: the compacted copy computes something else (the input model is left untouched).
        TypeError: the model rejects `example_inputs`.
    """
    refuse_parametrized(model, "compact()")
    with evaluating(model), torch.no_grad():
        expected = call_model(model, example_inputs)  # inputs the model rejects get call_model's error
        if not same_outputs(call_model(model, example_inputs), expected):
            raise ValueError(f"{type(model).__name__} gives other outputs at every call on the same example_inputs (it samples in "
                             "eval mode?), so compact() cannot check that removing channels keeps them: make it deterministic first")

    def removing_only(groups: list[str] | None) -> tuple[nn.Module, list[str]]:
        """A copy without the zero units of `groups` (of all groups: None), and every group that has some."""
        return _without_zero_units(model, example_inputs, lambda group: groups is None or group in groups)

    compacted, removable = removing_only(None)
    if _computes(compacted, example_inputs, expected):
        return compacted
    exact = _exact_groups(removable, lambda groups: _computes(removing_only(groups)[0], example_inputs, expected))
    compacted, _ = removing_only(exact)
    if not _computes(compacted, example_inputs, expected):
        raise RuntimeError("compaction changed the model's outputs; the original model is unchanged. Please report this model")
    kept = [_display(name) for name in removable if name not in exact]
    warnings.warn(f"compact() keeps the zero channels or heads of {kept[:4]}{' and more' if len(kept) > 4 else ''}: "
                  "removing them changes the outputs (e.g. a zero row of a tied embedding is still a class of the output)", stacklevel=2)
    return compacted


def _exact_groups(groups: list[str], exact: Callable[[list[str]], bool]) -> list[str]:
    """The groups whose removal keeps the outputs, when removing all of `groups` does not: halves are tried
    in turn, so a few such groups among many cost a few traces each, not one per group."""
    if len(groups) <= 1:
        return []
    halves = groups[: len(groups) // 2], groups[len(groups) // 2 :]
    return [group for half in halves for group in (half if exact(half) else _exact_groups(half, exact))]


def _without_zero_units(model: nn.Module, example_inputs: ExampleInputs, wanted: Callable[[str], bool]) -> tuple[nn.Module, list[str]]:
    """A copy of `model` without the all-zero heads and channels of the groups `wanted` accepts (by name:
    "<attention module> heads", or a channel group's root layer), and the names of every group that has some."""
    compacted, removable = _copy(model), []
    for spec in find_attention(compacted, example_inputs):
        dead = spec.dead_units(compacted)
        if dead and len(dead) < spec.kv_heads:
            removable.append(f"{spec.module} heads")
            if wanted(removable[-1]):
                spec.remove_units(compacted, dead)
    attention = find_attention(compacted, example_inputs)
    graph = _dependency_graph(compacted, example_inputs, attention)
    removals = []
    for group in _groups(compacted, graph, skip=_inside_attention(compacted, attention)):
        if group.reason:
            continue  # never pruned (find_structured_units left it dense for this reason)
        units = range(len(group.members[group.root_name]))
        dead = [u for u in units if all(_channels_are_zero(compacted.get_submodule(n), positions[u]) for n, positions in group.members.items())]
        if dead and len(dead) < len(units):
            removable.append(group.root_name)
            if wanted(group.root_name):
                removals.append((group.root, group.handler, group.root_channels(dead)))
    for root, handler, channels in removals:
        graph.get_pruning_group(root, handler, idxs=channels).prune()
    return compacted, removable


def _computes(model: nn.Module, example_inputs: ExampleInputs, expected: Any) -> bool:
    """Whether `model` runs on `example_inputs` and gives `expected`."""
    try:
        with evaluating(model), torch.no_grad():
            return same_outputs(call_model(model, example_inputs), expected)
    except TypeError:  # call_model's: the model broke on the inputs it took before
        return False


def _channels_are_zero(module: nn.Module, channels: list[int]) -> bool:
    dim = _output_dim(module)
    tensors = [(module.weight, dim), (getattr(module, "bias", None), 0)]
    index = torch.tensor(channels, dtype=torch.long)
    return all(t is None or not bool(t.index_select(d, index.to(t.device)).any()) for t, d in tensors)


def count_macs_and_parameters(model: nn.Module, example_inputs: ExampleInputs) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on `example_inputs` (half the floating-point operations
    PyTorch's FlopCounterMode counts: every matrix product and convolution, attention's included, whatever
    layer type runs it), and the parameter count. What FlopCounterMode misses is counted too: the CPU's
    scaled-dot-product attention kernel (as the GPUs' is), and nn.MultiheadAttention's fused inference
    kernels, switched off while counting."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    fused = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_flops}
    try:
        with evaluating(model), torch.no_grad(), FlopCounterMode(display=False, custom_mapping=cpu_attention) as counter:
            call_model(model, example_inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fused)
    return counter.get_total_flops() // 2, sum(parameter.numel() for parameter in model.parameters())


def save_compacted(path: str | os.PathLike, model: nn.Module, example_inputs: ExampleInputs, **metadata: Any) -> None:
    """Save a compacted model so that `load_compacted` rebuilds it from the original architecture.

    The file holds the weights and the example inputs (their shapes; the values of integer inputs such as
    token ids, up to 65,536 per input: the text they encode travels with the file), all weights-only-safe;
    no pickled classes.
    """
    refuse_parametrized(model, "save_compacted()")
    save_checkpoint(path, {"format": COMPACTED_FORMAT, "state_dict": model.state_dict(), "example_inputs": describe_inputs(example_inputs), **metadata})


def load_compacted(path: str | os.PathLike, model: nn.Module, example_inputs: ExampleInputs | None = None) -> nn.Module:
    """Shrink a fresh instance of the *original* architecture to the saved shapes, then load the weights.

    Every attention module loses as many heads, and every coupled group as many channels, as it lost
    when saved; which ones does not matter, since all values are then overwritten. The model is traced
    on inputs like those it was compacted with (their shapes, and the values of token ids and masks);
    pass `example_inputs` where the model needs other values to run.

    Raises:
        ValueError: the file is not a compacted model, or does not fit this architecture (the model is
            then left as it was).
    """
    state = load_checkpoint(path)
    if state.get("format") not in (COMPACTED_FORMAT, "pdprune.compacted/1"):
        raise ValueError(f"{str(path)!r} is not a compacted pdprune model (format {state.get('format')!r}); use torch.load for plain files")
    refuse_parametrized(model, "load_compacted()", "pass a fresh instance of the architecture, without a pruner")
    saved = state["state_dict"]
    advice = "Pass a fresh instance of the model that was compacted"
    if example_inputs is None:
        example_inputs = inputs_from_description(state["example_inputs"])
        if not has_input_values(state["example_inputs"]):
            advice += (", and example_inputs=... if it needs input values to run: this file, written by an earlier pdprune, keeps "
                       "only their shapes, and zeros stand in for them")
    else:
        advice += ", with example_inputs it accepts"
    try:
        _check_inputs(model, example_inputs)
    except TypeError as error:  # another architecture than the one compacted: it takes other inputs
        raise ValueError(f"{str(path)!r} does not fit this architecture: {error}. {advice}") from error
    with _restored_on_error(model):
        try:
            _shrink_to(model, saved, example_inputs)
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as error:
            raise ValueError(f"{str(path)!r} does not fit this architecture: its heads and channels could not be removed as saved "
                             f"({type(error).__name__}: {error}). {advice} (the model passed is left as it was)") from error
        mismatches = _mismatches(model.state_dict(), saved)
        if mismatches:
            raise ValueError(f"{str(path)!r} does not fit this architecture: {'; '.join(mismatches[:6])}. "
                             "Pass a fresh instance of the model that was compacted (the model passed is left as it was)")
        model.load_state_dict(saved)
    return model


def _shrink_to(model: nn.Module, saved: dict[str, torch.Tensor], example_inputs: ExampleInputs) -> None:
    """Remove from `model` as many heads and channels of each group as the saved state lacks."""
    for spec in find_attention(model, example_inputs):
        removed = spec.units_removed_in(model, saved)
        if removed:
            spec.remove_units(model, list(range(removed)))
    attention = find_attention(model, example_inputs)
    graph = _dependency_graph(model, example_inputs, attention)
    removals = []
    for group in _groups(model, graph, skip=_inside_attention(model, attention)):
        key, dim = f"{group.root_name}.weight", _output_dim(group.root)
        if group.reason or key not in saved:
            continue  # never compacted
        units = group.members[group.root_name]
        missing = group.root.weight.shape[dim] - saved[key].shape[dim]
        if missing > 0:
            removals.append((group.root, group.handler, group.root_channels(range(missing // len(units[0])))))
    for root, handler, channels in removals:
        graph.get_pruning_group(root, handler, idxs=channels).prune()


def _mismatches(current: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `saved` from loading into a model whose state is `current` (checked before any value is copied)."""
    missing, unexpected = sorted(current.keys() - saved.keys()), sorted(saved.keys() - current.keys())
    shapes = [f"{key}: {tuple(saved[key].shape)} saved, {tuple(current[key].shape)} here"
              for key in current.keys() & saved.keys() if saved[key].shape != current[key].shape]
    return ([f"missing {missing[:4]}"] if missing else []) + ([f"unexpected {unexpected[:4]}"] if unexpected else []) + sorted(shapes)


@contextlib.contextmanager
def _restored_on_error(model: nn.Module) -> Iterator[None]:
    """Undo what the block did to the modules of `model` if it raises: attributes set (head counts), and the
    dictionaries among them changed in place (parameters, buffers and children replaced, hooks added).
    Values written into tensors in place are not undone."""
    saved = {module: {name: dict(value) if isinstance(value, dict) else value for name, value in vars(module).items()}
             for module in model.modules()}
    try:
        yield
    except BaseException:
        for module, attributes in saved.items():
            current = vars(module)
            for name in set(current) - set(attributes):
                del current[name]
            for name, value in attributes.items():
                if isinstance(value, dict) and isinstance(current.get(name), dict):
                    current[name].clear()  # the same dictionary object: PyTorch holds references to some
                    current[name].update(value)
                else:
                    current[name] = value
        raise


