"""Segmentation heads: FCN, DeepLabV3 (ASPP), LR-ASPP and a light FPN decoder.

FCN/DeepLab/LR-ASPP keep torchvision's module indices so official checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import ConvNormAct


class FCNHead(nn.Sequential):
    """3×3 conv-BN-ReLU at in/4 channels, dropout, 1×1 classifier (torchvision keys 0, 1, 4)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )


class ASPPPooling(nn.Sequential):
    """Image-level branch: global average → 1×1 conv-BN-ReLU → broadcast back to the map size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        # Upsampling a 1×1 map bilinearly is a broadcast; expand avoids the interpolation kernel.
        return x.expand(-1, -1, *size)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1×1 + three dilated 3×3 + image pooling, concatenated, projected."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        branches: list[nn.Module] = [ConvNormAct(in_channels, out_channels, 1)]
        branches += [ConvNormAct(in_channels, out_channels, 3, dilation=r) for r in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    def __init__(
        self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36)
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, num_classes, 1),
        )


class LRASPPHead(nn.Module):
    """Lite R-ASPP: high-level features gated by their global context, plus a low-level classifier."""

    def __init__(
        self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128
    ) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class FPNDecoder(nn.Module):
    """Light feature-pyramid decoder: 1×1 laterals, top-down nearest upsampling and sum, one 3×3
    smoothing conv at the finest level, 1×1 classifier. Output at the finest input's resolution."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("FPNDecoder needs at least one input level")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = ConvNormAct(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        # features: finest first
        x = self.lateral[-1](features[-1])
        for lateral, feat in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            x = lateral(feat) + F.interpolate(x, size=feat.shape[-2:], mode="nearest")
        return self.classifier(self.smooth(x))
