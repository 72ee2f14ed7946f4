"""Augmentation on batches of tensors (no PIL in the loop): CIFAR's random crop and horizontal flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["random_crop_flip"]


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Zero-pad by `padding`, crop back at a random offset per image, flip half the images left-right.

    Args:
        images: (batch, channels, height, width), already normalized (padding adds the mean colour).
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)  # (batch, channels, height + 2p, width + 2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, batch), generator=generator)
    rows = (offsets[0, :, None] + torch.arange(height))[:, None, :, None]  # (batch, 1, height, 1)
    columns = (offsets[1, :, None] + torch.arange(width))[:, None, None, :]  # (batch, 1, 1, width)
    flip = torch.rand(batch, generator=generator) < 0.5
    columns = torch.where(flip[:, None, None, None], columns.flip(-1), columns)
    index = torch.arange(batch)[:, None, None, None]
    channel = torch.arange(images.shape[1])[None, :, None, None]
    device = images.device
    return padded[index.to(device), channel.to(device), rows.to(device), columns.to(device)]  # (batch, channels, height, width)
