"""Attention heads as structured units: which modules are multi-head attention, where each head lies in
their projections, and how to remove heads and update the module's head counts.

Recognized from what models have in common rather than from a list of classes: a module with query,
key and value projections (separate, or fused in one [q | k | v] layer such as GPT-2's `c_attn`) among
its children, a head count or head size among its attributes, and an output projection that reads the
heads, inside it (`o_proj`, `out_lin`, `c_proj`, ...) or right after it (BERT's `output.dense`, found by
following the attention's output through one forward pass). With grouped-query attention (fewer key-value
heads than query heads) a unit is one key-value head with all the query heads that share it. What is
recognized is only trusted after the removal check in `structure.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pdprune.layer_surgery import prune_entries
from pdprune.layers import layer_type_of, layer_types
from pdprune.model_io import ExampleInputs, call_model, evaluating, tensor_leaves
from pdprune.units import Slice, UnitSpec

__all__ = ["AttentionSpec", "find_attention", "update_head_counts"]

QUERY_NAMES = ("query", "q_proj", "q", "q_lin", "wq", "to_q")
KEY_NAMES = ("key", "k_proj", "k", "k_lin", "wk", "to_k")
VALUE_NAMES = ("value", "v_proj", "v", "v_lin", "wv", "to_v")
FUSED_NAMES = ("c_attn", "qkv", "wqkv", "qkv_proj")
OUTPUT_NAMES = ("o_proj", "o", "out_lin", "out_proj", "wo", "c_proj", "dense")
"""The projections' names above, in lower case: children's names are compared without case (ModernBERT's
`Wqkv` and `Wo`)."""
HEADS_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KEY_VALUE_HEADS_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
HEAD_SIZE_ATTRIBUTES = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size", "d_head")
INNER_SIZE_ATTRIBUTES = ("all_head_size", "inner_dim", "split_size")


def _size(module: nn.Module, output: bool) -> int:
    layer_type = layer_type_of(module)
    return module.weight.shape[layer_type.output_dim if output else layer_type.input_dim]


@dataclass
class AttentionSpec:
    """One multi-head attention module: its projections (module names), heads and head size.

    `query`, `key`, `value` are the same module for a fused projection (laid out [q | k | v]).
    """

    module: str
    query: str
    key: str
    value: str
    output: str
    output_inside: bool
    heads: int
    kv_heads: int
    head_size: int
    input_size: int  # the hidden size it reads
    output_size: int  # the size of what Torch-Pruning sees it write: hidden (output inside) or heads x head size

    @property
    def fused(self) -> bool:
        return self.query == self.key == self.value

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.query, self.key, self.value, self.output)))

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads

    def _offsets(self) -> tuple[int, int, int]:
        """Where the queries, keys and values start along the (fused) projection's outputs."""
        if not self.fused:
            return 0, 0, 0
        return 0, self.heads * self.head_size, (self.heads + self.kv_heads) * self.head_size

    def _rows(self, unit: int) -> tuple[list[int], list[int], list[int]]:
        """The query, key and value output rows of key-value head `unit` (and its query heads)."""
        d, (q0, k0, v0) = self.head_size, self._offsets()
        queries = list(range(q0 + unit * self.group * d, q0 + (unit + 1) * self.group * d))
        return queries, list(range(k0 + unit * d, k0 + (unit + 1) * d)), list(range(v0 + unit * d, v0 + (unit + 1) * d))

    def _columns(self, unit: int) -> list[int]:
        d = self.head_size
        return list(range(unit * self.group * d, (unit + 1) * self.group * d))

    def unit_spec(self, model: nn.Module) -> UnitSpec:
        """The `UnitSpec` of this module's heads: q, k, v rows and o columns score each unit; the values'
        rows carry its soft mask (removing a head is exactly zeroing its values); the rest is cleared."""
        known = layer_types()
        out_dim = {name: layer_type_of(model.get_submodule(name), known).output_dim for name in (self.query, self.key, self.value)}
        in_dim = layer_type_of(model.get_submodule(self.output), known).input_dim
        rows = [self._rows(unit) for unit in range(self.kv_heads)]
        queries, keys, values = ([r[i] for r in rows] for i in range(3))
        columns = [self._columns(unit) for unit in range(self.kv_heads)]

        def with_bias(name: str, positions: list[list[int]]) -> list[Slice]:
            pieces = [Slice(name, "weight", out_dim[name], positions)]
            if getattr(model.get_submodule(name), "bias", None) is not None:
                pieces.append(Slice(name, "bias", 0, positions))
            return pieces

        scoring = [Slice(self.query, "weight", out_dim[self.query], queries), Slice(self.key, "weight", out_dim[self.key], keys),
                   Slice(self.value, "weight", out_dim[self.value], values), Slice(self.output, "weight", in_dim, columns)]
        cleared = [*with_bias(self.query, queries), *with_bias(self.key, keys), Slice(self.output, "weight", in_dim, columns)]
        return UnitSpec(f"{self.module} heads", "head", self.kv_heads, scoring, with_bias(self.value, values), cleared)

    def dead_units(self, model: nn.Module) -> list[int]:
        """Key-value heads whose query, key, value and output slices are all exactly zero."""
        spec = self.unit_spec(model)
        alive = torch.zeros(self.kv_heads, dtype=torch.bool)
        for piece in (*spec.scoring, *spec.gated, *spec.cleared):
            tensor = getattr(model.get_submodule(piece.module), piece.tensor_name).detach()
            entries = tensor.ne(0).movedim(piece.dim, 0).reshape(tensor.shape[piece.dim], -1).any(dim=1).cpu()
            alive |= torch.stack([entries[positions].any() for positions in piece.positions])
        return [unit for unit in range(self.kv_heads) if not alive[unit]]

    def remove_units(self, model: nn.Module, units: list[int]) -> None:
        """Remove key-value heads `units` (with their query heads) and update the module's head counts."""
        rows = [self._rows(unit) for unit in units]
        queries, keys, values = (sorted(p for r in rows for p in r[i]) for i in range(3))
        if self.fused:
            prune_entries(model.get_submodule(self.query), queries + keys + values, output=True)
        else:
            for name, entries in ((self.query, queries), (self.key, keys), (self.value, values)):
                prune_entries(model.get_submodule(name), entries, output=True)
        prune_entries(model.get_submodule(self.output), sorted(p for unit in units for p in self._columns(unit)), output=False)
        self.heads -= len(units) * self.group
        self.kv_heads -= len(units)
        update_head_counts(model.get_submodule(self.module), self)

    def units_removed_in(self, model: nn.Module, state_dict: Mapping[str, Tensor]) -> int:
        """How many key-value heads this module had lost when `state_dict` was saved (0 if not in it)."""
        key = f"{self.key}.weight"
        if key not in state_dict:
            return 0
        saved = state_dict[key].shape[layer_type_of(model.get_submodule(self.key)).output_dim]
        per_unit = (self.group + 2) * self.head_size if self.fused else self.head_size  # [q | k | v] or k alone
        return self.kv_heads - saved // per_unit


def update_head_counts(module: nn.Module, spec: AttentionSpec) -> None:
    """Set the head-count and inner-size attributes the module has to the spec's (after removing heads)."""
    for name in HEADS_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, spec.heads)
    for name in KEY_VALUE_HEADS_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, spec.kv_heads)
    for name in INNER_SIZE_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, spec.heads * spec.head_size)


def _int_attribute(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _storage(tensor: Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _consumers(model: nn.Module, example_inputs: ExampleInputs, attention: dict[str, nn.Module]) -> dict[str, str]:
    """For each attention module, the first prunable layer called after it that reads its output
    (BERT's `output.dense`), found in one forward pass."""
    known = layer_types()
    names = {module: name for name, module in model.named_modules()}
    produced: dict[int, tuple[str, Tensor]] = {}  # storage of an attention output -> attention module name, the output
    found: dict[str, str] = {}
    handles = []

    def after_attention(module: nn.Module, args: Any, output: Any) -> None:
        leaves = tensor_leaves(output)
        if leaves:  # the output is held until the pass ends: a freed storage's address could be reused
            produced[_storage(leaves[0])] = names[module], leaves[0]

    def before_layer(module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = tensor_leaves((args, kwargs))
        if leaves and _storage(leaves[0]) in produced:
            found.setdefault(produced.pop(_storage(leaves[0]))[0], names[module])

    for module in attention.values():
        handles.append(module.register_forward_hook(after_attention))
    for module in model.modules():
        if layer_type_of(module, known) is not None:
            handles.append(module.register_forward_pre_hook(before_layer, with_kwargs=True))
    try:
        with evaluating(model), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


def find_attention(model: nn.Module, example_inputs: ExampleInputs | None = None) -> list[AttentionSpec]:
    """Every multi-head attention module of `model` that pdprune can prune by heads (see the module's
    docstring); `example_inputs` finds output projections that live outside the attention module."""
    known = layer_types()

    def projection(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | tuple[None, None]:
        for wanted in names:
            for name, child in module._modules.items():
                if (name.lower() == wanted and child is not None and layer_type_of(child, known) is not None
                        and isinstance(getattr(child, "weight", None), Tensor)):
                    return name, child
        return None, None

    candidates: dict[str, tuple[nn.Module, dict[str, Any]]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        query_name, query = projection(module, QUERY_NAMES)
        key_name, key = projection(module, KEY_NAMES)
        value_name, value = projection(module, VALUE_NAMES)
        if query is None or key is None or value is None:
            fused_name, fused = projection(module, FUSED_NAMES)
            if fused is None or _size(fused, True) % 3:
                continue
            query_name = key_name = value_name = fused_name
            query_size = key_size = _size(fused, True) // 3
        else:
            query_size, key_size = _size(query, True), _size(key, True)
            if _size(value, True) != key_size:
                continue
        head_size = _int_attribute(module, HEAD_SIZE_ATTRIBUTES)
        heads = _int_attribute(module, HEADS_ATTRIBUTES)
        if head_size is None and heads is not None and query_size % heads == 0:
            head_size = query_size // heads
        if head_size is None or query_size % head_size or key_size % head_size:
            continue
        heads, kv_heads = query_size // head_size, key_size // head_size
        if heads % kv_heads:
            continue
        output_name, output = projection(module, OUTPUT_NAMES)
        inside = output is not None and _size(output, False) == query_size
        entry = {"query": prefix + query_name, "key": prefix + key_name, "value": prefix + value_name, "heads": heads,
                 "kv_heads": kv_heads, "head_size": head_size, "input_size": _size(model.get_submodule(prefix + query_name), False)}
        if inside:
            entry |= {"output": prefix + output_name, "output_inside": True, "output_size": _size(output, True)}
        candidates[name] = (module, entry)
    outside = {name: module for name, (module, entry) in candidates.items() if "output" not in entry}
    consumers = _consumers(model, example_inputs, outside) if outside and example_inputs is not None else {}
    specs = []
    for name, (module, entry) in candidates.items():
        if "output" not in entry:
            consumer = consumers.get(name)
            if consumer is None or _size(model.get_submodule(consumer), False) != entry["heads"] * entry["head_size"]:
                continue
            entry |= {"output": consumer, "output_inside": False, "output_size": entry["heads"] * entry["head_size"]}
        specs.append(AttentionSpec(module=name, **entry))
    return specs
