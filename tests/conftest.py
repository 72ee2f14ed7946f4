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
    directory = Path(os.environ.get("PDPRUNE_DATA") or SHARED_DATA).resolve()  # tests link to it from elsewhere
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


class TinyResNet(nn.Module):
    """A stem, an identity residual block and a projection residual block: two coupled streams.

    `width` channels in the first stream, twice that in the second (so width=4 is what 50% channel
    pruning of the default leaves).
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        wide = 2 * width
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.block1_conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block1_bn1 = nn.BatchNorm2d(width)
        self.block1_conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.block1_bn2 = nn.BatchNorm2d(width)
        self.block2_conv1 = nn.Conv2d(width, wide, 3, stride=2, padding=1, bias=False)
        self.block2_bn1 = nn.BatchNorm2d(wide)
        self.block2_conv2 = nn.Conv2d(wide, wide, 3, padding=1, bias=False)
        self.block2_bn2 = nn.BatchNorm2d(wide)
        self.block2_shortcut = nn.Conv2d(width, wide, 1, stride=2, bias=False)
        self.block2_shortcut_bn = nn.BatchNorm2d(wide)
        self.fc = nn.Linear(wide, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        y = torch.relu(self.block1_bn1(self.block1_conv1(x)))
        x = torch.relu(x + self.block1_bn2(self.block1_conv2(y)))
        y = torch.relu(self.block2_bn1(self.block2_conv1(x)))
        x = torch.relu(self.block2_shortcut_bn(self.block2_shortcut(x)) + self.block2_bn2(self.block2_conv2(y)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture
def tiny_resnet() -> TinyResNet:
    return TinyResNet()


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that channels differ."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model
