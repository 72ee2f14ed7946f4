"""Calling other people's models: inputs as a tensor, a tuple or a dict of keyword tensors (a Hugging
Face batch); outputs as whatever the model returns (tensors, tuples, dicts, `ModelOutput`s), compared
leaf by leaf."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree

__all__ = [
    "ExampleInputs", "call_model", "evaluating", "tensor_leaves", "same_outputs", "describe_inputs", "inputs_from_description",
    "has_input_values", "refuse_parametrized", "has_batchnorm",
]

ExampleInputs = Tensor | Sequence[Tensor] | Mapping[str, Tensor]


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """The models in eval mode inside the block (a forward pass that only looks must not update BatchNorm
    statistics or draw dropout), each back in the mode it had afterwards, even on an error."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


def call_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """model(x), model(*inputs) or model(**inputs), as the inputs are given.

    Raises:
        TypeError: `example_inputs` is none of those, or the model rejects them (the message says how it
            was called and what the model said).
    """
    try:
        if isinstance(example_inputs, Tensor):
            return model(example_inputs)
        if isinstance(example_inputs, Mapping):
            return model(**example_inputs)
        if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
            return model(*example_inputs)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as error:
        how = {True: "model(**example_inputs)", False: "model(*example_inputs)"}[isinstance(example_inputs, Mapping)] \
            if not isinstance(example_inputs, Tensor) else "model(example_inputs)"
        keyword_model = not isinstance(example_inputs, Mapping) and not isinstance(error, RuntimeError)  # RuntimeError: shapes
        hint = "; a model that takes keyword inputs (input_ids=..., attention_mask=...) needs a dict" if keyword_model else ""
        raise TypeError(
            f"{type(model).__name__} rejected example_inputs {describe(example_inputs)} when called as {how}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{hint}"
        ) from error
    raise TypeError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, got {type(example_inputs).__name__}")


def describe(example_inputs: Any) -> str:
    """A short description of inputs for error messages: shapes and dtypes, not values."""
    if isinstance(example_inputs, Tensor):
        return f"tensor{tuple(example_inputs.shape)} {str(example_inputs.dtype).removeprefix('torch.')}"
    if isinstance(example_inputs, Mapping):
        return "{" + ", ".join(f"{key!r}: {describe(value)}" for key, value in example_inputs.items()) + "}"
    if isinstance(example_inputs, Sequence) and not isinstance(example_inputs, str):
        return "(" + ", ".join(describe(value) for value in example_inputs) + ")"
    return type(example_inputs).__name__


def tensor_leaves(outputs: Any) -> list[Tensor]:
    """Every tensor in a model's outputs (nested tuples, lists, dicts, dataclasses such as `ModelOutput`)."""
    if isinstance(outputs, Tensor):
        return [outputs]
    if isinstance(outputs, Mapping):  # ModelOutput is an OrderedDict of its non-None fields
        return [leaf for value in outputs.values() for leaf in tensor_leaves(value)]
    if isinstance(outputs, (list, tuple)):
        return [leaf for value in outputs for leaf in tensor_leaves(value)]
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):  # a plain @dataclass, which pytree does not open
        return [leaf for field in dataclasses.fields(outputs) for leaf in tensor_leaves(getattr(outputs, field.name))]
    return [leaf for leaf in _pytree.tree_leaves(outputs) if isinstance(leaf, Tensor)]


def same_outputs(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether two outputs hold the same tensors: same count, shapes and values (atol scaled by each
    leaf's largest magnitude)."""
    leaves_a, leaves_b = tensor_leaves(a), tensor_leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        scale = 1 + float(x.detach().abs().max()) if x.numel() else 1.0
        if not torch.allclose(x.detach(), y.detach(), rtol=rtol, atol=atol * scale):
            return False
    return True


KEPT_VALUES = 1 << 16
"""Integer and boolean inputs up to this many elements are described with their values: token ids and
masks decide what a model computes (a multimodal model counts its image tokens); floats are described
by their shape only."""


def describe_inputs(example_inputs: ExampleInputs) -> dict[str, Any]:
    """Shapes and dtypes (and keys) of example inputs, and the values of small integer ones, weights-only-safe,
    for `inputs_from_description`."""

    def entry(tensor: Tensor) -> dict[str, Any]:
        if not isinstance(tensor, Tensor):
            raise ValueError(f"save_compacted() stores example_inputs that are a tensor, a tuple of tensors or a dict of tensors; "
                             f"{describe(example_inputs)} holds a {type(tensor).__name__}: pass the tensors only (the model's "
                             "defaults then apply to the rest)")
        described = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
        if not tensor.is_floating_point() and not tensor.is_complex() and tensor.numel() <= KEPT_VALUES:
            described["values"] = tensor.detach().cpu().clone()
        return described

    if isinstance(example_inputs, Tensor):
        return {"kind": "tensor", "inputs": [entry(example_inputs)]}
    if isinstance(example_inputs, Mapping):
        return {"kind": "keywords", "keys": list(example_inputs), "inputs": [entry(value) for value in example_inputs.values()]}
    return {"kind": "positional", "inputs": [entry(value) for value in example_inputs]}


def has_input_values(description: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> bool:
    """Whether a description keeps the values of some input (files of earlier versions keep shapes only)."""
    items = description["inputs"] if isinstance(description, Mapping) else description
    return any("values" in item for item in items)


def inputs_from_description(description: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> ExampleInputs:
    """The described inputs: the values kept, zeros of the described shapes for the others, in the described
    structure."""
    if not isinstance(description, Mapping):  # pdprune 0.x files: a list of positional inputs
        description = {"kind": "positional", "inputs": list(description)}
    tensors = [item["values"] if "values" in item else torch.zeros(item["shape"], dtype=getattr(torch, item["dtype"]))
               for item in description["inputs"]]
    if description["kind"] == "tensor":
        return tensors[0]
    if description["kind"] == "keywords":
        return dict(zip(description["keys"], tensors))
    return tuple(tensors)


def refuse_parametrized(model: nn.Module, action: str, remedy: str = "call pruner.finalize() first") -> None:
    """Raise ValueError if the model still carries PDP's masks (before finalize()); the model's own
    parametrizations (weight_norm, ...) are its business."""
    from torch.nn.utils import parametrize

    attached = [
        name for name, module in model.named_modules() if parametrize.is_parametrized(module)
        and any(type(p).__module__.startswith("pdprune.") for chain in module.parametrizations.values() for p in chain)
    ]
    if attached:
        raise ValueError(
            f"{action} needs a plain model, but {attached[:3]} still carry parametrizations (PDP's masks): "
            f"{remedy}"
        )


def has_batchnorm(model: nn.Module) -> bool:
    """Whether `model` has a BatchNorm layer (whose statistics a hard cut can leave stale)."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
