"""MobileNet-v1 (Howard et al. 2017) at CIFAR resolution: depthwise-separable blocks, width 32..1024."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MobileNetV1"]

# (output channels, stride) of each depthwise-separable block, as in the common CIFAR adaptation.
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """A 3x3 stem, then depthwise 3x3 + pointwise 1x1 blocks, global pooling, a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        channels = int(32 * width)
        layers = [_conv_bn_relu(in_channels, channels, 3, 1)]
        for out_channels, stride in BLOCKS:
            out_channels = int(out_channels * width)
            layers.append(nn.Sequential(
                _conv_bn_relu(channels, channels, 3, stride, groups=channels),  # depthwise
                _conv_bn_relu(channels, out_channels, 1, 1),  # pointwise
            ))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))  # (batch, channels)
