"""A small VGG for 32x32 images: three stages of two 3x3 convs with BatchNorm, then a linear head."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGGSmall"]

STAGES = (64, 128, 256)


class VGGSmall(nn.Module):
    """[conv-BN-ReLU x2 -> maxpool] for 64, 128, 256 channels -> global average -> linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in STAGES:
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (batch, 256)
