"""Removing entries of layers in place: Torch-Pruning's pruners for the layers it knows, and one built
from the declared layout for the registered layer types it does not (transformers' Conv1D, ...)."""

from __future__ import annotations

from torch import nn

from pdprune.layers import LayerType, layer_type_of

__all__ = ["torch_pruning", "layout_pruner", "prune_entries"]


def torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise ImportError(
            "channel pruning, compaction and MAC counts use Torch-Pruning, a dependency of pdprune that is not "
            "installed here: pip install torch-pruning"
        ) from error
    return torch_pruning


def layout_pruner(layer_type: LayerType):
    """A Torch-Pruning pruner for a registered layer type it does not know (transformers' Conv1D, ...)."""
    tp = torch_pruning()

    class LayoutPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = layer_type.module_type

        def _prune(self, layer: nn.Module, idxs, dim: int, attributes: tuple[str, ...], bias: bool) -> nn.Module:
            keep = sorted(set(range(layer.weight.shape[dim])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, dim)
            if bias and getattr(layer, "bias", None) is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            for attribute in attributes:
                if isinstance(getattr(layer, attribute, None), int):
                    setattr(layer, attribute, len(keep))
            return layer

        def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
            return self._prune(layer, idxs, layer_type.output_dim, ("nf", "out_features", "out_channels"), bias=True)

        def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
            return self._prune(layer, idxs, layer_type.input_dim, ("nx", "in_features", "in_channels"), bias=False)

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[layer_type.output_dim]

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.weight.shape[layer_type.input_dim]

    return LayoutPruner()


def prune_entries(module: nn.Module, idxs: list[int], output: bool) -> None:
    """Remove output (or input) entries `idxs` of a layer in place, with Torch-Pruning's own pruners for
    the layers it knows and the layer type's layout for the others."""
    tp = torch_pruning()
    if isinstance(module, nn.Linear):
        (tp.prune_linear_out_channels if output else tp.prune_linear_in_channels)(module, idxs)
    elif isinstance(module, nn.modules.conv._ConvNd):
        (tp.prune_conv_out_channels if output else tp.prune_conv_in_channels)(module, idxs)
    else:
        layer_type = layer_type_of(module)
        if layer_type is None:
            raise TypeError(f"cannot remove entries of a {type(module).__name__}: not a prunable layer type")
        pruner = layout_pruner(layer_type)
        (pruner.prune_out_channels if output else pruner.prune_in_channels)(module, idxs)


