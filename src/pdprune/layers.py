"""Which module types hold prunable weights, and where a weight's inputs and outputs lie.

PyTorch's layers keep their weight as (out, in, ...); others do not: its transposed convolutions keep
(in, out, ...), Hugging Face's GPT-2 `Conv1D` keeps (in, out). N:M groups run along the input dimension
and channels along the output dimension, so every prunable type is declared with its layout:

    pdprune.register_layer_type("MyLinear", MyLinear, input_dim=0, output_dim=1)

`transformers`' Conv1D is known out of the box (as "Conv1D") whenever transformers is imported, and so
are its mixture-of-experts modules (as "Experts"), which keep every expert's weights in 3-D tensors.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["LayerType", "register_layer_type", "layer_types", "layer_type_of", "DEFAULT_MODULE_TYPES"]


@dataclass(frozen=True)
class LayerType:
    """A module class whose `weight` (or other matrices: `tensors`) PDP may prune, with the dimension of
    their inputs and of their outputs."""

    name: str
    module_type: type[nn.Module]
    input_dim: int = 1
    output_dim: int = 0
    tensors: tuple[str, ...] = ("weight",)

    @property
    def channels_in_weight(self) -> bool:
        """Whether its `weight` holds its channels, as channel pruning and Torch-Pruning need (not a GRU's
        weight_ih_l0, nor nn.MultiheadAttention's packed projections)."""
        return self.tensors == ("weight",)

    def tensors_of(self, module: nn.Module) -> list[str]:
        """The names among `tensors` that `module` holds as tensors (nn.MultiheadAttention holds either
        its packed `in_proj_weight` or three separate projections, the others None)."""
        return [name for name in self.tensors if isinstance(getattr(module, name, None), Tensor)]

    def check(self, weight: Tensor, module_name: str, tensor: str = "weight") -> None:
        """Raise ValueError if `weight` (the `tensor` of module `module_name`) cannot have this layout."""
        if weight.dim() < 2 or max(self.input_dim, self.output_dim) >= weight.dim():
            raise ValueError(
                f"{module_name or 'the model'!r} is a {self.name} whose {tensor} has shape {tuple(weight.shape)}, but the layer type "
                f"{self.name!r} declares input_dim={self.input_dim} and output_dim={self.output_dim}; "
                "declare the layout its weight has with pdprune.register_layer_type, or exclude the module"
            )


_BUILT_IN = {
    "Linear": LayerType("Linear", nn.Linear),
    "Conv1d": LayerType("Conv1d", nn.Conv1d),
    "Conv2d": LayerType("Conv2d", nn.Conv2d),
    "Conv3d": LayerType("Conv3d", nn.Conv3d),
    # transposed convolutions keep their weight as (in, out / groups, *kernel)
    "ConvTranspose1d": LayerType("ConvTranspose1d", nn.ConvTranspose1d, input_dim=0, output_dim=1),
    "ConvTranspose2d": LayerType("ConvTranspose2d", nn.ConvTranspose2d, input_dim=0, output_dim=1),
    "ConvTranspose3d": LayerType("ConvTranspose3d", nn.ConvTranspose3d, input_dim=0, output_dim=1),
    "Embedding": LayerType("Embedding", nn.Embedding),
    # its output projection is an nn.Linear of its own; heads are not pruned inside it (channel structure)
    "MultiheadAttention": LayerType("MultiheadAttention", nn.MultiheadAttention,
                                    tensors=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")),
}
EXPERTS = "Experts"
"""The layer type of Hugging Face's mixture-of-experts modules (`hugging_face_experts`)."""
EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj")
_FROM_LIBRARIES = {"Conv1D": ("transformers", "transformers.pytorch_utils", "Conv1D", 0, 1)}
"""name -> (library, module path, class, input_dim, output_dim): known once the library is imported."""
_REGISTERED: dict[str, LayerType] = {}

DEFAULT_MODULE_TYPES = (
    "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "MultiheadAttention", "Conv1D",
    EXPERTS,
)
"""What `PruningConfig.module_types` selects by default (not embeddings)."""


def register_layer_type(
    name: str, module_type: type[nn.Module], *, input_dim: int = 1, output_dim: int = 0, tensors: tuple[str, ...] = ("weight",)
) -> LayerType:
    """Declare `module_type` (whose `weight` is a Parameter) prunable under `name`, for `module_types`.

    Args:
        name: what `PruningConfig(module_types=...)` calls it.
        input_dim: the weight's dimension that runs over the layer's inputs (N:M groups lie along it).
        output_dim: the weight's dimension that runs over its outputs (channels lie along it).
        tensors: the names of the Parameters to prune, if not `weight` (each of this layout; unstructured
            and N:M only: channel pruning follows a layer's `weight`).
    Raises:
        TypeError: `module_type` is not an `nn.Module` subclass.
        ValueError: the dimensions are negative or equal, `tensors` is empty, or `name` is taken by another type.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if isinstance(tensors, str) or not tensors or not all(isinstance(tensor, str) and tensor for tensor in tensors):
        raise ValueError(f"tensors of layer type {name!r} must be a non-empty tuple of Parameter names, e.g. ('weight',), got {tensors!r}")
    for label, value in (("input_dim", input_dim), ("output_dim", output_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} of layer type {name!r} must be an int >= 0 (a dimension of its weight), got {value!r}")
    if input_dim == output_dim:
        raise ValueError(
            f"layer type {name!r}: input_dim and output_dim are both {input_dim}; a weight's inputs and outputs lie along "
            "two different dimensions, e.g. input_dim=1, output_dim=0 for (out, in) as nn.Linear stores it"
        )
    if name == EXPERTS:
        raise ValueError(f"layer type name {EXPERTS!r} is taken by Hugging Face's mixture-of-experts modules; pick another name")
    known = layer_types().get(name)
    if known is not None and known.module_type is not module_type:
        raise ValueError(f"layer type name {name!r} is taken by {known.module_type.__qualname__}; pick another name")
    other = next((other for other in layer_types().values() if other.module_type is module_type and other.name != name), None)
    if other is not None:
        raise ValueError(f"{module_type.__qualname__} is the layer type {other.name!r} already (one class has one layout); "
                         f"use that name in module_types, or register a subclass")
    layer_type = LayerType(name, module_type, input_dim, output_dim, tuple(tensors))
    _REGISTERED[name] = layer_type
    return layer_type


def layer_types() -> dict[str, LayerType]:
    """Every known prunable layer type by name: built in, from imported libraries, registered."""
    known = dict(_BUILT_IN)
    for name, (library, path, class_name, input_dim, output_dim) in _FROM_LIBRARIES.items():
        if library in sys.modules:  # only where the user's model may use it: importing it here would be slow
            try:
                known[name] = LayerType(name, getattr(importlib.import_module(path), class_name), input_dim, output_dim)
            except (ImportError, AttributeError):
                pass
    return known | _REGISTERED


def known_names() -> set[str]:
    """Names `module_types` accepts, including those of libraries not imported (yet)."""
    return set(_BUILT_IN) | set(_FROM_LIBRARIES) | set(_REGISTERED) | {EXPERTS}


def layer_type_of(module: nn.Module, types: dict[str, LayerType] | None = None) -> LayerType | None:
    """The layer type of `module` (its own class first, then the nearest base class, then Hugging Face's
    experts), or None."""
    types = layer_types() if types is None else types
    by_class = {layer_type.module_type: layer_type for layer_type in types.values()}
    for cls in type(module).__mro__:
        if cls in by_class:
            return by_class[cls]
    return hugging_face_experts(module)


def hugging_face_experts(module: nn.Module) -> LayerType | None:
    """The "Experts" layout of `module` if it is a mixture's experts as transformers (5 and later) keeps
    them, else None. Each model has its own class, but every one is marked by `use_experts_implementation`,
    which sets `is_transposed` and `has_gate` on the instance: its `gate_up_proj` (or `up_proj`) and
    `down_proj` are (experts, out, in), or (experts, in, out) where transposed (GPT-OSS)."""
    transposed = getattr(module, "is_transposed", None)
    if not isinstance(transposed, bool) or not isinstance(getattr(module, "has_gate", None), bool):
        return None
    weights = [getattr(module, name) for name in EXPERT_TENSORS if isinstance(getattr(module, name, None), Tensor)]
    if not weights or any(weight.dim() != 3 for weight in weights):
        return None
    return LayerType(EXPERTS, type(module), input_dim=1 if transposed else 2, output_dim=2 if transposed else 1, tensors=EXPERT_TENSORS)


def is_lora_layer(module: nn.Module) -> bool:
    """Whether `module` is a LoRA layer as PEFT builds them: a `base_layer` next to its adapters `lora_A`
    (and `lora_B`), whose dense update adds to the base layer's output."""
    return isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A")
