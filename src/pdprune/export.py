"""Hand over a pruned model: a compressed sparse file (bitmask + values), ONNX, `torch.export`.

The sparse format stores each tensor with enough zeros as a packed bitmask of its non-zeros (one bit
per weight) and the non-zero values; other tensors as they are. A 90% sparse float32 model takes about
3% (mask) + 10% (values) of its dense size. Loading gives back the exact `state_dict`, bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pdprune._version import __version__
from pdprune.checkpoint import load_checkpoint, save_checkpoint
from pdprune.model_io import evaluating, refuse_parametrized

__all__ = ["save_sparse", "load_sparse", "read_state_dict", "export_onnx", "SPARSE_FORMAT"]

SPARSE_FORMAT = "pdprune.sparse/1"


def _sparse_pays(tensor: Tensor) -> bool:
    """A bitmask plus the non-zeros is smaller than the dense tensor."""
    if not tensor.is_floating_point() or tensor.numel() < 64:
        return False
    nonzeros = int(torch.count_nonzero(tensor))
    return nonzeros * tensor.element_size() + tensor.numel() / 8 < tensor.numel() * tensor.element_size()


def save_sparse(path: str | os.PathLike, state: nn.Module | Mapping[str, Tensor], **metadata: Any) -> None:
    """Write a model's `state_dict` compressed: packed non-zero bitmask + non-zero values per tensor.

    All masks share one byte buffer and all values one buffer per dtype, so a model of many small
    tensors pays no per-tensor container overhead.

    Args:
        state: a model (its `state_dict()` is saved) or a state_dict.
        metadata: numbers and strings to keep alongside (e.g. the model's name and input shape).
    """
    if isinstance(state, nn.Module):
        refuse_parametrized(state, "save_sparse()")
    state_dict = state.state_dict() if isinstance(state, nn.Module) else dict(state)
    attached = [name for name in state_dict if ".parametrizations." in f".{name}"]
    if attached:
        raise ValueError(f"save_sparse() needs plain weights, but the state_dict holds PDP's masks ({attached[:2]}): call pruner.finalize() "
                         "first, or save pruner.finalized_state_dict()")
    masks: list[np.ndarray] = []
    values: dict[str, list[Tensor]] = {}
    entries, mask_end, value_ends = {}, 0, {}
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a tensor; finalize() the pruner before saving")
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        dtype = str(tensor.dtype).removeprefix("torch.")
        entry = {"shape": list(state_dict[name].shape), "dtype": dtype}
        if _sparse_pays(tensor):
            nonzero = tensor != 0
            bits = np.packbits(nonzero.numpy())  # (ceil(n / 8),)
            masks.append(bits)
            entry["mask"] = [mask_end, mask_end + bits.size]
            mask_end += bits.size
            tensor = tensor[nonzero]
        start = value_ends.get(dtype, 0)
        values.setdefault(dtype, []).append(tensor)
        value_ends[dtype] = start + tensor.numel()
        entry["values"] = [start, value_ends[dtype]]
        entries[name] = entry
    save_checkpoint(path, {
        "format": SPARSE_FORMAT, "entries": entries, "metadata": metadata,
        "masks": torch.from_numpy(np.concatenate(masks)) if masks else torch.zeros(0, dtype=torch.uint8),
        "values": {dtype: torch.cat(parts) for dtype, parts in values.items()},
    })


def load_sparse(path: str | os.PathLike) -> dict[str, Tensor]:
    """The exact `state_dict` saved by `save_sparse`, in its original order.

    Raises:
        ValueError: the file is not a pdprune sparse file, comes from a newer format, or is damaged.
    """
    state = load_checkpoint(path)
    if not str(state.get("format", "")).startswith("pdprune.sparse/"):
        raise ValueError(f"{os.fspath(path)!r} is not a pdprune sparse model file (format {state.get('format')!r})")
    if state["format"] != SPARSE_FORMAT:
        raise ValueError(
            f"{os.fspath(path)!r} has format {state['format']!r} (pdprune {state.get('pdprune_version')}); "
            f"pdprune {__version__} reads {SPARSE_FORMAT}: upgrade pdprune"
        )
    masks = state["masks"].numpy()
    tensors = {}
    for name, entry in state["entries"].items():
        numel = int(np.prod(entry["shape"], dtype=np.int64))
        values = state["values"][entry["dtype"]][entry["values"][0] : entry["values"][1]]
        if "mask" not in entry:
            if values.numel() != numel:
                raise ValueError(f"{os.fspath(path)!r} is damaged: tensor {name!r} of shape {tuple(entry['shape'])} has {values.numel()} values")
            tensors[name] = values.clone().reshape(entry["shape"])
            continue
        nonzero = torch.from_numpy(np.unpackbits(masks[entry["mask"][0] : entry["mask"][1]], count=numel).astype(bool))
        if int(nonzero.sum()) != values.numel():
            raise ValueError(f"{os.fspath(path)!r} is damaged: tensor {name!r} has {int(nonzero.sum())} mask bits but {values.numel()} values")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[nonzero] = values
        tensors[name] = dense.reshape(entry["shape"])
    return tensors


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and metadata of any model file pdprune writes (sparse, `pdprune train`'s model.pt, a
    compacted model) or of a plain (or `{"state_dict": ...}`) torch file.

    Raises:
        ValueError: the file is unreadable, holds no weights (e.g. a list), or holds a model that is
            still being pruned (a training checkpoint: its weights are not final).
    """
    state = load_checkpoint(path)
    if not isinstance(state, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not model weights; pass a state_dict or a file that pdprune wrote")
    if str(state.get("format", "")).startswith("pdprune.sparse/"):
        return load_sparse(path), dict(state.get("metadata", {}))
    weights, metadata = None, {}
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            metadata = {k: v for k, v in state.items() if k != key and not isinstance(v, (Mapping, Tensor))}
            weights = {str(n).removeprefix("module."): t for n, t in state[key].items()}
            break
    else:
        if state and all(isinstance(value, Tensor) for value in state.values() if not isinstance(value, str)):
            weights = {n: t for n, t in state.items() if isinstance(t, Tensor)}
    if not weights or not all(isinstance(tensor, Tensor) for tensor in weights.values()):
        raise ValueError(f"{os.fspath(path)!r} holds no model weights pdprune recognizes (keys {list(state)[:6]})")
    if any(".parametrizations." in name or name.startswith("parametrizations.") for name in weights):
        raise ValueError(f"{os.fspath(path)!r} holds a model still being pruned (its weights are under PDP's masks, e.g. a training "
                         "checkpoint); use the model.pt that pdprune train writes at the end, or finalize() the pruner first")
    return weights, metadata


def export_onnx(model: nn.Module, example_inputs: Tensor | Sequence[Tensor] | Mapping[str, Tensor], path: str | os.PathLike) -> Path:
    """Export a finalized (plain) model to ONNX with `torch.onnx.export`, batch dimension dynamic.

    Args:
        example_inputs: a tensor, a tuple of positional tensors, or a dict of keyword tensors.
    Raises:
        ValueError: the model still has PDP's masks attached (finalize() first).
        ImportError: the ONNX exporter's packages are missing (`pip install 'pdprune[onnx]'`).
    """
    refuse_parametrized(model, "export_onnx()")
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError as error:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'pdprune[onnx]'") from error
    keywords = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}
    positional = () if keywords else (example_inputs,) if isinstance(example_inputs, Tensor) else tuple(example_inputs)
    path = Path(path)
    batch = torch.export.Dim("batch")
    shapes = {key: {0: batch} for key in keywords} if keywords else tuple({0: batch} for _ in positional)
    with evaluating(model):
        torch.onnx.export(model, positional, path, kwargs=keywords or None, dynamo=True, dynamic_shapes=shapes, external_data=False)
    return path
