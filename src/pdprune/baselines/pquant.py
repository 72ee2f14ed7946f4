"""PQuantML's PDP (`pquant-ml` 0.1.0, CERN, Apache-2.0): the other packaged implementation of the same
method (Cho, Adya, Naik, NeurIPS 2023), used through its own config, layer wrappers and stage hooks.

`add_compression_layers` swaps every nn.Linear, nn.Conv1d and nn.Conv2d for PQuantML's PQDense/PQConv
layer, whose `PDP` module recomputes t with a full top-k and the mask with a two-way softmax on every
forward pass, at PQuantML's absolute temperature (1e-5 by default). PQuantML's own `train_model` calls
its stage hooks once per epoch; the harness owns the loop, so this adapter calls the same hooks at the
same points, counted in optimizer steps:

    warm-up                    PQuantML's pre-training: the mask is all ones
    end of warm-up             post_pretrain_functions: per-layer budgets r_l from one global sort
    every epoch after that     pre_epoch_functions: r = min(1, eps * (e + 1)) * r_l;
                               post_epoch_functions: the soft mask is stored
    finalize()                 post_epoch_functions, pre_finetune_functions (hard mask: m >= 0.5),
                               apply_final_compression, then plain layers again

with eps = 1 / (ramp_end - warmup + 1), pdprune's own mapping, so that both reach the target at the
ramp end (PQuantML in whole epochs, pdprune per step). There is no fine-tuning stage: like pdprune's
PDP in the harness, the soft mask trains until the end. Quantization is off: pruning only.

Structures: unstructured, and channels (`structured_pruning`: a Conv's output channels, a Linear's
rows). No N:M. For channels, only the producers of pdprune's channel groups are pruned (the others,
such as the classifier, go to `disable_pruning_for_layers`), as for every channel method here; each
layer prunes its own channels, uncoupled from its BatchNorm and from the layers it is added to.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from pdprune.baselines.base import Baseline, MethodSpec, channel_producers, selected_weights

__all__ = ["PQuantPDP"]


def _import_pquant():
    """PQuantML's torch backend; it picks its backend from KERAS_BACKEND when first imported."""
    backend = os.environ.setdefault("KERAS_BACKEND", "torch")
    if backend != "torch":
        raise RuntimeError(f"PQuantML's PyTorch backend needs KERAS_BACKEND=torch, got KERAS_BACKEND={backend!r}; "
                           "unset it or set it to 'torch' before the first import of pquant")
    try:
        import pquant
        from pquant.core.torch import layers
    except ImportError as error:
        raise ImportError(f"the 'pquant_pdp' baseline needs PQuantML ({error}); pip install 'pdprune[peers]'") from error
    return pquant, layers


class PQuantPDP(Baseline):
    """PQuantML's PDP on `model` (its layers are replaced in place until `finalize()`).

    Option `temperature`: PQuantML's absolute tau (its default, 1e-5, when not given).
    """

    OPTIONS = ("temperature",)

    def __init__(self, model: nn.Module, spec: MethodSpec, example_inputs: Tensor) -> None:
        super().__init__(model, spec)
        if spec.structure not in ("unstructured", "channel"):
            raise ValueError(f"PQuantML's PDP prunes 'unstructured' or 'channel' sparsity, not {spec.structure!r}")
        if any(isinstance(module, nn.MultiheadAttention) for module in model.modules()):
            raise ValueError("PQuantML replaces nn.MultiheadAttention with its own attention layer, which this "
                             "adapter cannot turn back into a plain one; use a model with nn.Linear projections")
        pquant, self._hooks = _import_pquant()
        wrapped = (nn.Linear, nn.Conv1d, nn.Conv2d)  # PQuantML wraps exactly these classes
        layers = [name for name, module in model.named_modules() if type(module) in wrapped]
        config = pquant.pdp_config()
        config.quantization_parameters.enable_quantization = False
        config.pruning_parameters.sparsity = float(spec.sparsity)
        config.pruning_parameters.epsilon = 1.0 / (spec.ramp_end_epoch - spec.warmup_epochs + 1)
        config.pruning_parameters.structured_pruning = spec.structure == "channel"
        temperature = spec.options.get("temperature", config.pruning_parameters.temperature)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"PQuantML's temperature must be a number > 0, got {temperature!r}; its default is 1e-5")
        config.pruning_parameters.temperature = float(temperature)
        if spec.structure == "channel":
            prunable = channel_producers(model, example_inputs, set(selected_weights(model)))
            config.pruning_parameters.disable_pruning_for_layers = sorted(set(layers) - prunable)
        self.config = config
        pquant.add_compression_layers(model, config)
        self.layers = {name: module for name, module in model.named_modules() if isinstance(module, self._hooks.LAYERS_WITH_PRUNING_LAYER)}
        if not self.layers:
            raise ValueError("PQuantML wraps nn.Linear, nn.Conv1d and nn.Conv2d layers inside a model, and this model has none")
        # PQuantML creates its (here unused) quantizers on the first forward pass: create them now, so
        # that the model's state_dict has the same keys at every checkpoint.
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(example_inputs)
        model.train(was_training)
        self.pruning = False
        if spec.start_step == 0:
            self._start_pruning()

    def _start_pruning(self) -> None:
        self._hooks.post_pretrain_functions(self.model, self.config)
        self._hooks.pre_epoch_functions(self.model, 0, 0)  # PDP ignores the epoch count
        self.pruning = True

    def on_step(self) -> None:
        if not self.pruning:
            if self.steps_done >= self.spec.start_step:
                self._start_pruning()
            return
        epoch, within = divmod(self.steps_done - self.spec.start_step, self.spec.steps_per_epoch)
        if within == 0:  # one epoch of PQuantML's pruning stage ends, the next begins
            self._hooks.post_epoch_functions(self.model, epoch - 1, 0)
            self._hooks.pre_epoch_functions(self.model, epoch, 0)

    def finalize(self) -> nn.Module:
        if not self.pruning:
            self._start_pruning()
        self._hooks.post_epoch_functions(self.model, -1, 0)  # the soft mask of the final weights
        self._hooks.pre_finetune_functions(self.model)  # hard mask: m >= 0.5
        self._hooks.apply_final_compression(self.model)  # weight <- mask * weight
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, _plain_layer(layer))
        return self.model

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pruning": self.pruning,
                "budgets": {name: float(layer.pruning_layer.init_r) for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the stage and the budgets; the masks and the ramp position r are in the model's state."""
        super().load_state_dict(state)
        if state["pruning"] and not self.pruning:
            for layer in self.layers.values():
                layer.post_pre_train_function()  # what post_pretrain_functions does, without a new allocation
            self.pruning = True
        for name, layer in self.layers.items():
            layer.pruning_layer.init_r = float(state["budgets"][name])


def _plain_layer(layer: nn.Module) -> nn.Module:
    """The torch layer a PQuantML layer wraps, holding its (already pruned) parameters."""
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer._bias is not None, device="meta")
    else:
        kind = nn.Conv2d if isinstance(layer, nn.Conv2d) else nn.Conv1d
        plain = kind(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                     layer.groups, layer._bias is not None, layer.padding_mode, device="meta")
    plain.weight = layer._weight
    if layer._bias is not None:
        plain.bias = layer._bias
    return plain.train(layer.training)
