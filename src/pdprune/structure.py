"""Coupled channel groups from Torch-Pruning's dependency graph, and their physical removal.

Torch-Pruning traces the model and says which output channels must go together (the convs feeding a
residual add, a depthwise conv and its producer, ...). We trust a group only after checking it: the
model with some of the group's channels zeroed must compute the same as the model with those channels
removed by Torch-Pruning. Groups that fail (e.g. through zero-padded "option A" shortcuts, which it
cannot map) are left dense and reported.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pdprune.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["ChannelGroupSpec", "find_channel_groups", "compact", "save_compacted", "load_compacted", "count_macs_and_parameters"]

PRODUCER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
MEMBER_TYPES = PRODUCER_TYPES + (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
COMPACTED_FORMAT = "pdprune.compacted/1"


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise ImportError(
            "channel pruning, compaction and MAC counts use Torch-Pruning, a dependency of pdprune that is not "
            "installed here: pip install torch-pruning"
        ) from error
    return torch_pruning


@dataclass(frozen=True)
class ChannelGroupSpec:
    """One group of coupled output channels: root channel i is channel `indices[name][i]` of each member."""

    name: str
    size: int
    members: dict[str, list[int]]  # module name -> its channel for each root channel
    producers: tuple[str, ...]  # the members whose Conv/Linear weight scores the channels


def _as_tuple(example_inputs: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)


def _dependency_graph(model: nn.Module, example_inputs: tuple[Tensor, ...]):
    tp = _torch_pruning()
    was_training = model.training
    model.eval()  # tracing runs a forward pass: never update BatchNorm statistics
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=list(example_inputs), verbose=False)
    finally:
        model.train(was_training)
    return graph


def _output_modules(graph) -> list[nn.Module]:
    """Modules whose outputs are the model's outputs: their channels are not ours to remove."""
    return [module for module, node in graph.module2node.items() if not node.outputs]


def _groups(model: nn.Module, graph) -> Iterable[tuple[nn.Module, Any, dict[str, dict[int, int]], bool]]:
    """(root module, root pruning function, member name -> {root channel: member channel}, supported)."""
    names = {module: name for name, module in model.named_modules()}
    outputs = set(_output_modules(graph))
    for group in graph.get_all_groups(ignored_layers=list(outputs), root_module_types=PRODUCER_TYPES):
        root = group[0].dep.target.module
        members: dict[str, dict[int, int]] = {}
        supported = True
        for item in group:
            module = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler) or module not in names:
                continue
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if not isinstance(module, MEMBER_TYPES) or module in outputs:
                supported = False
            members[names[module]] = {int(r): int(i) for r, i in zip(item.root_idxs, item.idxs)}
        yield root, group[0].dep.handler, members, supported


def _zero_channels(model: nn.Module, members: dict[str, dict[int, int]], root_channels: Iterable[int]) -> None:
    with torch.no_grad():
        for name, mapping in members.items():
            module = model.get_submodule(name)
            channels = [mapping[r] for r in root_channels if r in mapping]
            for tensor in (module.weight, getattr(module, "bias", None)):
                if tensor is not None:
                    tensor[channels] = 0


def _same_outputs(a: nn.Module, b: nn.Module, example_inputs: tuple[Tensor, ...]) -> bool:
    a.eval(), b.eval()
    with torch.no_grad():
        try:
            out_a, out_b = a(*example_inputs), b(*example_inputs)
        except RuntimeError:  # a shape mismatch: the removal broke the model
            return False
    out_a, out_b = torch.as_tensor(out_a), torch.as_tensor(out_b)
    if out_a.shape != out_b.shape:
        return False
    return bool(torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5 * (1 + float(out_a.abs().max()))))


def _removal_is_exact(model: nn.Module, candidates: list[tuple[str, dict[str, dict[int, int]], int]], example_inputs: tuple[Tensor, ...]) -> bool:
    """Zero a third of each candidate group's channels in one copy, remove them in another, compare."""
    tp = _torch_pruning()
    masked, removed = copy.deepcopy(model), copy.deepcopy(model)
    graph = _dependency_graph(removed, example_inputs)
    roots = {name: module for name, module in removed.named_modules()}
    generator = torch.Generator().manual_seed(0)
    for root_name, members, size in candidates:
        chosen = torch.randperm(size, generator=generator)[: max(1, size // 3)].tolist()
        _zero_channels(masked, members, chosen)
        root = roots[root_name]
        handler = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        root_mapping = members[root_name]
        graph.get_pruning_group(root, handler, idxs=[root_mapping[r] for r in chosen]).prune()
    return _same_outputs(masked, removed, example_inputs)


def find_channel_groups(
    model: nn.Module, example_inputs: Tensor | Sequence[Tensor], selected: set[str]
) -> tuple[list[ChannelGroupSpec], dict[str, str]]:
    """Groups of coupled output channels whose producers are all in `selected` (module names).

    Returns:
        The groups that are safe to prune, and group name -> why it is left dense, for the others.
    """
    example_inputs = _as_tuple(example_inputs)
    graph = _dependency_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    order = {name: position for position, name in enumerate(names.values())}
    candidates, skipped = [], {}
    for root, _, members, supported in _groups(model, graph):
        producers = tuple(sorted((n for n in members if isinstance(model.get_submodule(n), PRODUCER_TYPES)), key=order.get))
        if not producers or not set(producers) & selected:
            continue
        name = producers[0]
        if not supported:
            skipped[name] = "a coupled layer is not a Conv, Linear or BatchNorm layer (or is a model output)"
        elif not set(producers) <= selected:
            skipped[name] = f"coupled with layers not selected for channel pruning: {sorted(set(producers) - selected)[:4]}"
        else:
            root_name = names[root]
            size = len(members[root_name])
            candidates.append((name, root_name, members, size, producers))
    safe = []
    if candidates and not _removal_is_exact(model, [(r, m, s) for _, r, m, s, _ in candidates], example_inputs):
        for candidate in candidates:
            if _removal_is_exact(model, [candidate[1:4]], example_inputs):
                safe.append(candidate)
            else:
                skipped[candidate[0]] = "Torch-Pruning cannot remove these channels exactly (e.g. a zero-padded shortcut)"
    else:
        safe = candidates
    specs = []
    for name, root_name, members, size, producers in safe:
        roots = sorted(members[root_name])
        specs.append(ChannelGroupSpec(name, size, {m: [mapping[r] for r in roots] for m, mapping in members.items()}, producers))
    return specs, skipped


def compact(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> nn.Module:
    """A copy of a finalized model without its all-zero coupled channels: smaller and faster.

    A channel goes when every coupled tensor (weights, biases, norm scales and shifts) is exactly zero
    there, so the outputs do not change; this is checked on `example_inputs` before returning.

    Raises:
        RuntimeError: the compacted copy computes something else (the input model is left untouched).
    """
    example_inputs = _as_tuple(example_inputs)
    compacted = copy.deepcopy(model)
    graph = _dependency_graph(compacted, example_inputs)
    removals = []
    for root, handler, members, supported in _groups(compacted, graph):
        if not supported or not members:
            continue
        root_channels = set.intersection(*(set(mapping) for mapping in members.values()))
        dead = [r for r in sorted(root_channels) if all(_channel_is_zero(compacted.get_submodule(n), members[n][r]) for n in members)]
        if dead and len(dead) < len(root_channels):
            root_name = next(n for n, m in compacted.named_modules() if m is root)
            removals.append((root, handler, [members[root_name][r] for r in dead]))
    for root, handler, channels in removals:
        graph.get_pruning_group(root, handler, idxs=channels).prune()
    if not _same_outputs(model, compacted, example_inputs):
        raise RuntimeError("compaction changed the model's outputs; the original model is unchanged. Please report this model")
    return compacted


def _channel_is_zero(module: nn.Module, channel: int) -> bool:
    tensors = [module.weight, getattr(module, "bias", None)]
    return all(t is None or not bool(t[channel].any()) for t in tensors)


def count_macs_and_parameters(model: nn.Module, example_inputs: Tensor | Sequence[Tensor]) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on `example_inputs`, and the parameter count."""
    tp = _torch_pruning()
    was_training = model.training
    model.eval()
    try:
        macs, parameters = tp.utils.count_ops_and_params(model, list(_as_tuple(example_inputs)))
    finally:
        model.train(was_training)
    return int(macs), int(parameters)


def save_compacted(path: str | os.PathLike, model: nn.Module, example_inputs: Tensor | Sequence[Tensor], **metadata: Any) -> None:
    """Save a compacted model so that `load_compacted` rebuilds it from the original architecture.

    The file holds the weights and the example input shapes, all weights-only-safe; no pickled classes.
    """
    shapes = [{"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")} for x in _as_tuple(example_inputs)]
    save_checkpoint(path, {"format": COMPACTED_FORMAT, "state_dict": model.state_dict(), "example_inputs": shapes, **metadata})


def load_compacted(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Shrink a fresh instance of the *original* architecture to the saved shapes, then load the weights.

    Every coupled group loses as many channels as the saved model lost; which ones does not matter,
    since all values are then overwritten.

    Raises:
        ValueError: the file is not a compacted model, or does not fit this architecture.
    """
    state = load_checkpoint(path)
    if state.get("format") != COMPACTED_FORMAT:
        raise ValueError(f"{str(path)!r} is not a compacted pdprune model (format {state.get('format')!r}); use torch.load for plain files")
    saved = state["state_dict"]
    example_inputs = tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in state["example_inputs"])
    graph = _dependency_graph(model, example_inputs)
    names = {module: name for name, module in model.named_modules()}
    removals = []
    for root, handler, members, _ in _groups(model, graph):
        key = f"{names[root]}.weight"
        if key in saved and saved[key].shape[0] < root.weight.shape[0]:
            removals.append((root, handler, list(range(root.weight.shape[0] - saved[key].shape[0]))))
    for root, handler, channels in removals:
        graph.get_pruning_group(root, handler, idxs=channels).prune()
    try:
        model.load_state_dict(saved)
    except RuntimeError as error:
        raise ValueError(f"{str(path)!r} does not fit this architecture: {str(error).splitlines()[0]}. Pass a fresh instance of the model that was compacted") from error
    return model
