"""The model zoo behind a name registry: `build_model("resnet20", input_shape, num_classes)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pdprune.models.mlp import MLP
from pdprune.models.mobilenet import MobileNetV1
from pdprune.models.resnet_cifar import ResNetCifar

__all__ = ["MODELS", "build_model"]

ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]

def _resnet_cifar(depth: int) -> ModelBuilder:
    def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return ResNetCifar(depth, num_classes, in_channels=input_shape[0])

    return build


MODELS: dict[str, ModelBuilder] = {
    "mlp": MLP,
    "mobilenet_v1": lambda input_shape, num_classes: MobileNetV1(num_classes, in_channels=input_shape[0]),
    **{f"resnet{depth}": _resnet_cifar(depth) for depth in (20, 32, 44, 56)},
}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (without the batch) and `num_classes` outputs."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes)
