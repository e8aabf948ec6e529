"""Encoders: ResNet (BasicBlock/Bottleneck) and MobileNetV3 (inverted residuals with SE, hard-swish).

Module names and nesting mirror torchvision's classifiers *after* ``IntermediateLayerGetter``
dropped the classification tail, so ``backbone.*`` keys in official segmentation checkpoints map
one to one. Each backbone returns a dict of named feature maps.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from models.blocks import BasicBlock, Bottleneck, ConvNormAct, InvertedResidual

RESNET_LAYERS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


class ResNet(nn.Module):
    """ResNet encoder returning ``{"layer1": 1/4, "layer2": 1/8, "layer3": 1/16|1/8, "layer4": ...}``.

    ``replace_stride_with_dilation`` (three bools for layer2..4) trades stride for dilation exactly
    as torchvision does: the segmentation models use ``(False, True, True)`` for an output stride of 8.
    """

    def __init__(
        self, *, depth: int, replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)
    ) -> None:
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"replace_stride_with_dilation needs 3 entries, got {replace_stride_with_dilation!r}"
            )
        block, counts = RESNET_LAYERS[depth]
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, counts[0])
        self.layer2 = self._make_layer(
            block, 128, counts[1], stride=2, dilate=replace_stride_with_dilation[0]
        )
        self.layer3 = self._make_layer(
            block, 256, counts[2], stride=2, dilate=replace_stride_with_dilation[1]
        )
        self.layer4 = self._make_layer(
            block, 512, counts[3], stride=2, dilate=replace_stride_with_dilation[2]
        )
        self.channels = {f"layer{i + 1}": c * block.expansion for i, c in enumerate((64, 128, 256, 512))}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        *,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [
            block(self.inplanes, planes, stride=stride, dilation=previous_dilation, downsample=downsample)
        ]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            out[name] = x
        return out


# (in, kernel, expanded, out, use_se, activation, stride, dilated) — torchvision's tables.
MOBILENET_V3: dict[str, tuple[list[tuple[int, int, int, int, bool, str, int, bool]], int]] = {
    "large": (
        [
            (16, 3, 16, 16, False, "RE", 1, False),
            (16, 3, 64, 24, False, "RE", 2, False),
            (24, 3, 72, 24, False, "RE", 1, False),
            (24, 5, 72, 40, True, "RE", 2, False),
            (40, 5, 120, 40, True, "RE", 1, False),
            (40, 5, 120, 40, True, "RE", 1, False),
            (40, 3, 240, 80, False, "HS", 2, False),
            (80, 3, 200, 80, False, "HS", 1, False),
            (80, 3, 184, 80, False, "HS", 1, False),
            (80, 3, 184, 80, False, "HS", 1, False),
            (80, 3, 480, 112, True, "HS", 1, False),
            (112, 3, 672, 112, True, "HS", 1, False),
            (112, 5, 672, 160, True, "HS", 2, True),
            (160, 5, 960, 160, True, "HS", 1, True),
            (160, 5, 960, 160, True, "HS", 1, True),
        ],
        960,
    ),
    "small": (
        [
            (16, 3, 16, 16, True, "RE", 2, False),
            (16, 3, 72, 24, False, "RE", 2, False),
            (24, 3, 88, 24, False, "RE", 1, False),
            (24, 5, 96, 40, True, "HS", 2, False),
            (40, 5, 240, 40, True, "HS", 1, False),
            (40, 5, 240, 40, True, "HS", 1, False),
            (40, 5, 120, 48, True, "HS", 1, False),
            (48, 5, 144, 48, True, "HS", 1, False),
            (48, 5, 288, 96, True, "HS", 2, True),
            (96, 5, 576, 96, True, "HS", 1, True),
            (96, 5, 576, 96, True, "HS", 1, True),
        ],
        576,
    ),
}


class MobileNetV3(nn.Sequential):
    """MobileNetV3 ``features`` (stem, inverted residuals, 1×1 expansion) as one indexed Sequential.

    ``dilated=True`` replaces the last stage's stride with dilation 2 (output stride 16), as
    torchvision's segmentation models do. ``forward_features`` returns the outputs at ``taps``.
    """

    def __init__(self, *, arch: str = "large", dilated: bool = True) -> None:
        if arch not in MOBILENET_V3:
            raise ValueError(f"arch must be one of {sorted(MOBILENET_V3)}, got {arch!r}")
        table, last = MOBILENET_V3[arch]
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [ConvNormAct(3, 16, 3, stride=2, norm=norm, activation=nn.Hardswish)]
        for cin, k, exp, cout, se, act, stride, dil in table:
            layers.append(
                InvertedResidual(
                    cin,
                    k,
                    exp,
                    cout,
                    use_se=se,
                    activation=act,
                    stride=stride,
                    dilation=2 if (dilated and dil) else 1,
                    norm=norm,
                )
            )
        layers.append(ConvNormAct(table[-1][3], last, 1, norm=norm, activation=nn.Hardswish))
        super().__init__(*layers)
        # Same rule as torchvision: stem, every strided block, and the last layer mark a stage.
        self.stage_indices = (
            [0] + [i for i, b in enumerate(self) if getattr(b, "_is_cn", False)] + [len(self) - 1]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def channels_at(self, index: int) -> int:
        return int(self[index].out_channels)  # type: ignore[arg-type]

    def forward_features(self, x: torch.Tensor, taps: dict[int, str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        last = max(taps)
        for i, layer in enumerate(self):
            x = layer(x)
            if i in taps:
                out[taps[i]] = x
            if i == last:
                break
        return out
