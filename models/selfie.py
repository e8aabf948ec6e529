"""MediaPipe selfie segmentation as an explicit PyTorch module.

Architecture (read from ``selfie_segmentation.tflite``, MediaPipe 0.10.14, Apache-2.0): a
MobileNetV3-small-like encoder with squeeze-excitation down to 1/16 resolution, a gated 32→128
channel bottleneck, three decoder stages that fuse gated skip connections from the 1/8, 1/4 and
1/2 levels, and a 2×2 stride-2 transposed convolution to one foreground logit per pixel.

The graph was trained in TensorFlow, so strided convolutions use TF's asymmetric 'SAME' padding and
upsampling is half-pixel bilinear (``align_corners=False``). Weights are converted by
``tools/convert_selfie.py``; conv order in this module equals the order of convolutions in the
TFLite graph, which is what the converter relies on.

``forward`` returns logits N×1×H×W; the probability is ``sigmoid(logits)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import SqueezeExcitation, conv1x1_linear, tf_same_pad


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric on strided convs)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, groups: int = 1) -> None:
        pad = 0 if stride > 1 else (kernel - 1) // 2
        super().__init__(in_ch, out_ch, kernel, stride, pad, groups=groups, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride, kernel = self.stride[0], self.kernel_size[0]
        if stride == 1:
            return super().forward(x)
        h, w = x.shape[-2:]
        if stride == 2 and kernel % 2 == 1 and h % 2 == 0 and w % 2 == 0:
            # Even input, stride 2: SAME pads (k-2)//2 before and one more after. A (k+1)×(k+1) kernel
            # with a zero first row and column under symmetric padding samples exactly those pixels,
            # without copying the input into a padded tensor (same result, no full-frame copy).
            weight = F.pad(self.weight, (1, 0, 1, 0))
            return F.conv2d(x, weight, self.bias, stride, kernel // 2, 1, self.groups)
        return super().forward(tf_same_pad(x, kernel=kernel, stride=stride))


def _act(kind: str) -> nn.Module:
    return nn.Hardswish() if kind == "HS" else nn.ReLU()


class SelfieEncoderBlock(nn.Module):
    """Inverted residual (expand → depthwise → [SE] → project), residual when shapes allow."""

    def __init__(
        self, in_ch: int, kernel: int, expanded: int, out_ch: int, *, se: int, act: str, stride: int
    ) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(in_ch, expanded, 1), _act(act))
        self.depthwise = nn.Sequential(
            SameConv2d(expanded, expanded, kernel, stride=stride, groups=expanded), _act(act)
        )
        # The TFLite graph gates with a plain sigmoid, not MobileNetV3's hard-sigmoid.
        self.se = SqueezeExcitation(expanded, se, gate=nn.Sigmoid) if se else None
        self.project = nn.Conv2d(expanded, out_ch, 1)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.depthwise(self.expand(x))
        if self.se is not None:
            y = self.se(y)
        y = self.project(y)
        return x + y if self.residual else y


class GatedBottleneck(nn.Module):
    """relu(1×1 conv(x)) scaled by a sigmoid channel gate computed from x's global mean."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.features = nn.Conv2d(in_ch, out_ch, 1)
        self.gate = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(conv1x1_linear(self.gate, x.mean((2, 3))))
        return torch.relu(self.features(x)) * g[:, :, None, None]


class GatedSkipDecoder(nn.Module):
    """One decoder stage: upsample ×2, fuse a channel-gated skip, refine with a residual depthwise conv.

    ``up = proj(upsample(x)); x = skip * gate(skip + up) + up; y = relu(conv(x)); out = y + relu(dw(y))``.
    The 1×1 projection runs before the upsampling here: both are linear and the bilinear weights sum
    to one, so the result is the same while the conv touches 4× fewer pixels.
    """

    def __init__(self, in_ch: int, skip_ch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_ch, skip_ch, 1)
        self.gate = SqueezeExcitation(skip_ch, skip_ch, gate=nn.Sigmoid)
        self.conv = nn.Conv2d(skip_ch, skip_ch, 1)
        self.depthwise = nn.Conv2d(skip_ch, skip_ch, 3, padding=1, groups=skip_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.proj(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        fused = skip * self.gate.gate(skip + up) + up
        y = torch.relu(self.conv(fused))
        return y + torch.relu(self.depthwise(y))


# (in, kernel, expanded, out, se squeeze channels (0 = none), activation, stride)
ENCODER: tuple[tuple[int, int, int, int, int, str, int], ...] = (
    (16, 3, 16, 16, 8, "RE", 2),  # → 1/4, skip
    (16, 3, 72, 24, 0, "RE", 2),
    (24, 3, 88, 24, 0, "RE", 1),  # → 1/8, skip
    (24, 5, 96, 32, 24, "HS", 2),
    (32, 5, 128, 32, 32, "HS", 1),
    (32, 5, 128, 32, 32, "HS", 1),
    (32, 5, 96, 32, 24, "HS", 1),
    (32, 5, 96, 32, 24, "HS", 1),  # → 1/16
)


class SelfieSegmenter(nn.Module):
    """Person/background segmenter; any input size divisible by 16 (256×256 general, 144×256 landscape)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(SameConv2d(3, 16, 3, stride=2), nn.Hardswish())
        self.encoder = nn.ModuleList(
            SelfieEncoderBlock(i, k, e, o, se=s, act=a, stride=st) for i, k, e, o, s, a, st in ENCODER
        )
        self.bottleneck = GatedBottleneck(32, 128)
        self.decode8 = GatedSkipDecoder(128, 24)
        self.decode4 = GatedSkipDecoder(24, 16)
        self.decode2 = GatedSkipDecoder(16, 16)
        self.segment = nn.ConvTranspose2d(16, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s2 = self.stem(x)
        y = s2
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.encoder):
            y = block(y)
            if i in (0, 2):
                skips.append(y)
        s4, s8 = skips
        y = self.bottleneck(y)
        y = self.decode8(y, s8)
        y = self.decode4(y, s4)
        y = self.decode2(y, s2)
        return _transposed_2x2(self.segment, y)


def _transposed_2x2(conv: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """A 2×2 stride-2 transposed conv as a 1×1 conv to 4·C_out channels and a pixel shuffle.

    Each output pixel depends on exactly one input pixel, so the two are the same arithmetic; the
    1×1 conv runs on the fast GEMM path instead of the generic transposed-convolution kernel.
    """
    c_in, c_out = conv.weight.shape[:2]
    weight = conv.weight.permute(1, 2, 3, 0).reshape(c_out * 4, c_in, 1, 1)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
    y = F.conv2d(x, weight, bias)
    n, _, h, w = y.shape
    # The pixel shuffle as one permuted copy from N×H×W×C order, which is a free view of a
    # channels-last result (``F.pixel_shuffle`` walks channels-last memory far more slowly).
    y = y.permute(0, 2, 3, 1).reshape(n, h, w, c_out, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return y.reshape(n, c_out, 2 * h, 2 * w)


def conv_modules(model: SelfieSegmenter) -> list[nn.Conv2d | nn.ConvTranspose2d]:
    """Convolutions in the TFLite graph's order (the converter pairs them one to one)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
