"""Building blocks shared by every network in this package.

The common language is the residual block ``y = x + F(x)``: ResNet's BasicBlock and
Bottleneck, MobileNetV3's inverted residual, and the selfie decoder's refinement block.
Attribute names follow torchvision where torchvision has the block, so that published
state dicts load without renaming.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

NormFactory = Callable[[int], nn.Module]


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10% (MobileNet rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def tf_same_pad(x: torch.Tensor, *, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow 'SAME' padding: asymmetric (extra row/column at the bottom/right) on strided convs.

    PyTorch's symmetric padding shifts the sampling grid by one pixel on stride-2 convolutions, which
    visibly breaks networks trained in TensorFlow, so converted models pad explicitly.
    """
    h, w = x.shape[-2:]
    pad_h = max((-(-h // stride) - 1) * stride + kernel - h, 0)
    pad_w = max((-(-w // stride) - 1) * stride + kernel - w, 0)
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


def conv1x1_linear(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1×1 ``conv`` applied to pooled features N×C as a matrix product (N×C_out).

    Same arithmetic as the conv on an N×C×1×1 tensor, without the convolution machinery's per-call
    overhead, which dominates at 1×1 spatial size.
    """
    return F.linear(x, conv.weight.flatten(1), conv.bias)


class ConvNormAct(nn.Sequential):
    """conv → norm → activation, laid out like torchvision's ``Conv2dNormActivation`` (keys 0, 1)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: NormFactory | None = nn.BatchNorm2d,
        activation: Callable[..., nn.Module] | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation=dilation,
                groups=groups,
                bias=norm is None,
            )
        ]
        if norm is not None:
            layers.append(norm(out_channels))
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """Channel gate ``x * gate(fc2(act(fc1(mean(x)))))`` (torchvision keys ``fc1``, ``fc2``)."""

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        *,
        activation: Callable[..., nn.Module] = nn.ReLU,
        gate: Callable[..., nn.Module] = nn.Hardsigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = activation()
        self.scale_activation = gate()

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel scale alone (N×C×1×1), for gates applied to a tensor other than ``x``."""
        s = self.activation(conv1x1_linear(self.fc1, x.mean((2, 3))))
        return self.scale_activation(conv1x1_linear(self.fc2, s))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3×3 convs and an identity (or 1×1 projected) shortcut."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block: 1×1 reduce, 3×3 (strided/dilated), 1×1 expand ×4, plus shortcut."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1×1 expand → k×k depthwise → [squeeze-excite] → 1×1 project, residual when
    shapes allow. ``self.block`` indices match torchvision (expand is omitted when it would be 1:1)."""

    def __init__(
        self,
        in_channels: int,
        kernel: int,
        expanded: int,
        out_channels: int,
        *,
        use_se: bool,
        activation: str,
        stride: int,
        dilation: int = 1,
        norm: NormFactory,
    ) -> None:
        super().__init__()
        if activation not in ("RE", "HS"):
            raise ValueError(f"activation must be 'RE' or 'HS', got {activation!r}")
        act: Callable[..., nn.Module] = nn.Hardswish if activation == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expanded != in_channels:
            layers.append(ConvNormAct(in_channels, expanded, 1, norm=norm, activation=act))
        layers.append(
            ConvNormAct(
                expanded,
                expanded,
                kernel,
                stride=1 if dilation > 1 else stride,
                dilation=dilation,
                groups=expanded,
                norm=norm,
                activation=act,
            )
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8)))
        layers.append(ConvNormAct(expanded, out_channels, 1, norm=norm, activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` directly followed by ``BatchNorm2d`` inside a ``Sequential`` into one conv.

    Inference-only speed-up (one op instead of two); call after loading weights, never before training.
    Returns the same module, changed in place.
    """
    for child in module.children():
        fold_batchnorm(child)
    if isinstance(module, nn.Sequential):
        items = list(module._modules.items())
        for (_, conv), (bn_name, bn) in zip(items, items[1:], strict=False):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                _fold_pair(conv, bn)
                module._modules[bn_name] = nn.Identity()
    return module


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_var is not None and bn.running_mean is not None
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * scale + bn.bias
        conv.bias = nn.Parameter(new_bias)
