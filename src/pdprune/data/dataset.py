"""In-memory datasets and the batch iterator: decoded tensors, augmentation on tensors, no DataLoader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

__all__ = ["Dataset", "batches"]

Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class Dataset:
    """A classification dataset held as tensors.

    `evaluations` maps a split's name (as reported) to its (inputs, labels); the first is the primary one.
    """

    name: str
    train_inputs: Tensor
    train_labels: Tensor
    evaluations: dict[str, tuple[Tensor, Tensor]]
    num_classes: int
    augment: Augment | None = field(default=None, repr=False)
    vocabulary: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.train_inputs) != len(self.train_labels):
            raise ValueError(f"{self.name}: {len(self.train_inputs)} inputs but {len(self.train_labels)} labels")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, without the batch: (1, 8, 8) for the digits, (64,) token ids for SST-2."""
        return tuple(self.train_inputs.shape[1:])

    @property
    def primary_evaluation(self) -> str:
        """The name of the first evaluation split, the one reported first (e.g. "test")."""
        return next(iter(self.evaluations))

    def steps_per_epoch(self, batch_size: int) -> int:
        """Optimizer steps in one epoch (the last partial batch counts)."""
        return -(-len(self.train_inputs) // batch_size)

    def subset(self, train_size: int, evaluation_size: int) -> Dataset:
        """The first examples of every split: for smoke tests and quick runs."""
        return replace(
            self,
            train_inputs=self.train_inputs[:train_size],
            train_labels=self.train_labels[:train_size],
            evaluations={k: (x[:evaluation_size], y[:evaluation_size]) for k, (x, y) in self.evaluations.items()},
        )


def batches(
    inputs: Tensor,
    labels: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches in a random order drawn from `generator` (in order if None), augmented if asked."""
    order = torch.randperm(len(inputs), generator=generator) if generator is not None else torch.arange(len(inputs))
    for start in range(0, len(inputs), batch_size):
        index = order[start : start + batch_size]
        batch = inputs[index]
        if augment is not None and generator is not None:
            batch = augment(batch, generator)
        yield batch, labels[index]
