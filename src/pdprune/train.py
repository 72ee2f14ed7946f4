"""The one training loop, used by the CLI and the benchmarks: plain PyTorch, top to bottom."""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pdprune.checkpoint import load_checkpoint, save_checkpoint
from pdprune.data.dataset import Dataset, batches
from pdprune.model_io import has_batchnorm

__all__ = ["TrainConfig", "TrainResult", "PruningMethod", "train", "evaluate", "evaluate_splits", "has_batchnorm", "recalibrate_batchnorm"]

OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")


class PruningMethod(Protocol):
    """What the loop needs of a pruning method: PDP's pruner and every baseline fit it."""

    def step(self) -> None:
        """Advance the method's schedule; called after every optimizer step."""

    def finalize(self) -> nn.Module:
        """Leave the model at its final sparsity, as plain weights, and return it."""

    def state_dict(self) -> dict[str, Any]:
        """The method's state (numbers, strings, tensors), for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from `state_dict()`."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer, learning-rate schedule and budget of one training run."""

    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    seed: int = 0
    channels_last: bool = False  # NHWC layout for image models: oneDNN's convolutions run faster on CPU

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a finite number > 0, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class TrainResult:
    """Final accuracy per evaluation split (fractions), per-epoch history, wall-clock seconds."""

    accuracy: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(model: nn.Module, inputs: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on (inputs, labels), a fraction in [0, 1]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            x = inputs[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
    model.train(was_training)
    return correct / len(inputs)


def evaluate_splits(model: nn.Module, dataset: Dataset) -> dict[str, float]:
    """Top-1 accuracy on every evaluation split of `dataset`, by split name."""
    return {name: evaluate(model, inputs, labels) for name, (inputs, labels) in dataset.evaluations.items()}


def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int = 128, num_batches: int = 100, seed: int = 0) -> bool:
    """Re-estimate every BatchNorm's running mean and variance on `num_batches` training batches.

    A hard cut (PDP's `finalize()`, one-shot pruning) changes the activations that the running
    statistics were averaged over while training, so fresh statistics may give back part of the lost
    accuracy (the benchmark harness reports both). Uses `torch.optim.swa_utils.update_bn`. Returns
    False (and changes nothing) for a model without BatchNorm.
    """
    if not has_batchnorm(model):
        return False
    generator = torch.Generator().manual_seed(seed)
    sample = batches(dataset.train_inputs, dataset.train_labels, batch_size, generator, dataset.augment)
    torch.optim.swa_utils.update_bn(itertools.islice(sample, num_batches), model, device=next(model.parameters()).device)
    return True


def _summary(epoch: dict[str, float], primary: str) -> str:
    return f"loss {epoch['loss']:.3f}, {primary} {100 * epoch[f'{primary}_accuracy']:.2f}%"


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, momentum=config.momentum,
            weight_decay=config.weight_decay, nesterov=config.momentum > 0,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


def _lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = config.epochs * steps_per_epoch
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def train(
    model: nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    method: PruningMethod | None = None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    progress: bool = True,
    description: str = "train",
) -> TrainResult:
    """Train `model` on `dataset`; if `method` is given, step it after every optimizer step and
    finalize it at the end. With `checkpoint_path`, every epoch is saved and a rerun resumes there.

    The learning rate follows the schedule per optimizer step; the data order comes from `config.seed`.
    """
    device = next(model.parameters()).device
    memory_format = torch.preserve_format
    if config.channels_last:
        if dataset.train_inputs.dim() != 4:
            raise ValueError(f"channels_last needs image inputs (N, C, H, W); this dataset's are {tuple(dataset.train_inputs.shape)}; set channels_last=False")
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    steps_per_epoch = dataset.steps_per_epoch(config.batch_size)
    optimizer = _optimizer(model, config)
    lr_schedule = _lr_schedule(optimizer, config, steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    first_epoch, seconds = 0, 0.0
    if checkpoint_path is not None and Path(checkpoint_path).exists():
        state = load_checkpoint(checkpoint_path, map_location=device)
        if state["train_config"] != asdict(config):
            raise ValueError(
                f"checkpoint {str(checkpoint_path)!r} belongs to another run (train config differs); "
                "delete it or pass another checkpoint path"
            )
        if method is not None:  # first: a method may have to re-create the tensors the model state holds
            method.load_state_dict(state["method"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        generator.set_state(state["generator"].cpu())  # map_location moved it to the model's device
        if "torch_rng" in state:  # dropout and other global random numbers continue where they stopped
            torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        first_epoch, history, seconds = state["epoch"], state["history"], state["seconds"]

    primary = dataset.primary_evaluation
    # One bar over every batch of the run: the rate and the time left show from the first batches on.
    bar = tqdm(total=config.epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch, desc=description,
               unit="batch", disable=not progress, dynamic_ncols=True)
    with bar:
        for epoch in range(first_epoch, config.epochs):
            started = time.perf_counter()
            model.train()
            loss_sum, seen = 0.0, 0
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs}" + (f", {_summary(history[-1], primary)}" if history else ""))
            for x, y in batches(dataset.train_inputs, dataset.train_labels, config.batch_size, generator, dataset.augment):
                x, y = x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_schedule.step()
                if method is not None:
                    method.step()
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
                bar.update()
            seconds += time.perf_counter() - started
            accuracy = evaluate(model, *dataset.evaluations[primary])
            history.append({"epoch": epoch + 1, "loss": loss_sum / seen, f"{primary}_accuracy": accuracy})
            bar.set_postfix_str(f"epoch {epoch + 1}/{config.epochs}, {_summary(history[-1], primary)}")
            if checkpoint_path is not None and epoch + 1 < config.epochs:
                save_checkpoint(checkpoint_path, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "lr_schedule": lr_schedule.state_dict(),
                    "method": None if method is None else method.state_dict(),
                    "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "epoch": epoch + 1,
                    "history": history,
                    "seconds": seconds,
                    "train_config": asdict(config),
                })
    if method is not None:
        method.finalize()
    return TrainResult(evaluate_splits(model, dataset), history, seconds)
