"""The model zoo behind a name registry: `build_model("resnet20", input_shape, num_classes)`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from pdprune.models.lenet import LeNet5
from pdprune.models.mlp import MLP
from pdprune.models.mobilenet import MobileNetV1
from pdprune.models.resnet_cifar import ResNetCifar
from pdprune.models.transformer import TransformerClassifier
from pdprune.models.vgg import VGGSmall

__all__ = ["MODELS", "build_model", "load_pretrained"]

ModelBuilder = Callable[..., nn.Module]


def _resnet_cifar(depth: int) -> ModelBuilder:
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return ResNetCifar(depth, num_classes, in_channels=input_shape[0])

    return build


def _transformer(input_shape: tuple[int, ...], num_classes: int, vocabulary_size: int | None = None) -> nn.Module:
    if vocabulary_size is None:
        raise ValueError("model 'transformer' reads token ids: pass vocabulary_size= (the dataset's len(vocabulary))")
    return TransformerClassifier(vocabulary_size, num_classes, max_length=input_shape[0])


MODELS: dict[str, ModelBuilder] = {
    "mlp": MLP,
    "lenet5": LeNet5,
    **{f"resnet{depth}": _resnet_cifar(depth) for depth in (20, 32, 44, 56)},
    "mobilenet_v1": lambda input_shape, num_classes: MobileNetV1(num_classes, in_channels=input_shape[0]),
    "vgg_small": lambda input_shape, num_classes: VGGSmall(num_classes, in_channels=input_shape[0]),
    "transformer": _transformer,
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, vocabulary_size: int | None = None) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (without the batch) and `num_classes` outputs.

    `vocabulary_size` is needed by text models only.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "transformer":
        return _transformer(tuple(input_shape), num_classes, vocabulary_size)
    return MODELS[name](tuple(input_shape), num_classes)


def load_pretrained(model: nn.Module, path: str | os.PathLike, state: Mapping[str, Any] | None = None) -> nn.Module:
    """Load weights into `model` from a plain state_dict, a `{"state_dict": ...}` or `{"model": ...}`
    checkpoint, with or without DataParallel's `module.` prefix (as in the akamaster ResNets); or from
    `state`, the weights read from `path` already (e.g. by `pdprune.export.read_state_dict`).

    Raises:
        ValueError: the file cannot be read as weights, or its tensors do not fit the model (the first
            mismatches are named).
    """
    if state is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - torch raises many kinds for a file that is not weights
            raise ValueError(
                f"cannot read weights from {os.fspath(path)!r} ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                "pass a torch state_dict or checkpoint file"
            ) from error
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{os.fspath(path)!r} holds a {type(state).__name__}, not a state_dict of tensors; pass a model's weights")
    state = {name.removeprefix("module."): tensor for name, tensor in state.items()}
    ours = model.state_dict()
    missing = sorted(k for k in set(ours) - set(state) if not k.endswith("num_batches_tracked"))  # older files lack it
    unexpected = sorted(set(state) - set(ours))
    reshaped = sorted(k for k in set(ours) & set(state) if ours[k].shape != state[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{os.fspath(path)!r} does not fit {type(model).__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
            f"different shapes {reshaped[:4]}; build the architecture that was trained"
        )
    model.load_state_dict(state, strict=False)
    return model
