"""Shared fixtures: tiny models, a fixed seed, and the shared data directory (required in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def seed() -> int:
    torch.manual_seed(0)
    return 0


@pytest.fixture
def data_dir() -> Path:
    """The real data (`PDPRUNE_DATA` or ../shared/data). Missing data fails in CI and skips elsewhere."""
    directory = Path(os.environ.get("PDPRUNE_DATA") or SHARED_DATA)
    if not directory.is_dir():
        message = f"real data not found at {directory}; set PDPRUNE_DATA"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return directory


class TinyConvNet(nn.Module):
    """Conv -> BN -> ReLU -> Conv -> pool -> Linear: every prunable kind, in a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny_convnet() -> TinyConvNet:
    return TinyConvNet()


@pytest.fixture
def tiny_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
