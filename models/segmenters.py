"""Complete segmenters: backbone + head, logits N×C×H×W at the input's size.

The torchvision-compatible builders produce exactly torchvision's state-dict layout (including
``aux_classifier.*`` where the official checkpoints carry it), so ``load_state_dict(strict=True)``
accepts the published files. The auxiliary head is only evaluated by ``forward_aux`` (training);
inference never pays for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones import MobileNetV3, ResNet
from models.heads import DeepLabHead, FCNHead, FPNDecoder, LRASPPHead


def _resize_to(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if x.shape[-2:] == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ResNetSegmenter(nn.Module):
    """FCN or DeepLabV3 on a dilated ResNet-50/101 (output stride 8), torchvision layout."""

    def __init__(self, *, head: str, depth: int, num_classes: int = 21, aux: bool = True) -> None:
        super().__init__()
        self.backbone = ResNet(depth=depth, replace_stride_with_dilation=(False, True, True))
        c4, c3 = self.backbone.channels["layer4"], self.backbone.channels["layer3"]
        if head == "fcn":
            self.classifier: nn.Module = FCNHead(c4, num_classes)
        elif head == "deeplabv3":
            self.classifier = DeepLabHead(c4, num_classes)
        else:
            raise ValueError(f"head must be 'fcn' or 'deeplabv3', got {head!r}")
        self.aux_classifier = FCNHead(c3, num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_aux(x, aux=False)[0]

    def forward_aux(self, x: torch.Tensor, *, aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = x.shape[-2:]
        f = self.backbone(x)
        out = _resize_to(self.classifier(f["layer4"]), size)
        if not aux or self.aux_classifier is None:
            return out, None
        return out, _resize_to(self.aux_classifier(f["layer3"]), size)


class MobileNetDeepLab(nn.Module):
    """DeepLabV3 on a dilated MobileNetV3-Large (torchvision's ``deeplabv3_mobilenet_v3_large``)."""

    def __init__(self, *, num_classes: int = 21, aux: bool = True) -> None:
        super().__init__()
        self.backbone = MobileNetV3(arch="large", dilated=True)
        idx = self.backbone.stage_indices
        self.out_pos, self.aux_pos = idx[-1], idx[-4]
        self.classifier = DeepLabHead(self.backbone.channels_at(self.out_pos), num_classes)
        self.aux_classifier = FCNHead(self.backbone.channels_at(self.aux_pos), num_classes) if aux else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_aux(x, aux=False)[0]

    def forward_aux(self, x: torch.Tensor, *, aux: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.backbone.forward_features(x, {self.out_pos: "out", self.aux_pos: "aux"})
        out = _resize_to(self.classifier(f["out"]), x.shape[-2:])
        if not aux or self.aux_classifier is None:
            return out, None
        return out, _resize_to(self.aux_classifier(f["aux"]), x.shape[-2:])


class MobileNetLRASPP(nn.Module):
    """LR-ASPP on a dilated MobileNetV3-Large (torchvision's ``lraspp_mobilenet_v3_large``)."""

    def __init__(self, *, num_classes: int = 21, arch: str = "large") -> None:
        super().__init__()
        self.backbone = MobileNetV3(arch=arch, dilated=True)
        idx = self.backbone.stage_indices
        self.low_pos, self.high_pos = idx[-4], idx[-1]
        self.classifier = LRASPPHead(
            self.backbone.channels_at(self.low_pos), self.backbone.channels_at(self.high_pos), num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_features(x, {self.low_pos: "low", self.high_pos: "high"})
        return _resize_to(self.classifier(f["low"], f["high"]), x.shape[-2:])


class ResNetFPN(nn.Module):
    """Our fast residual segmenter: ResNet-18/34 (no dilation) + light FPN over layer1..4 (1/4 res)."""

    def __init__(self, *, num_classes: int, depth: int = 18, channels: int = 64) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.backbone = ResNet(depth=depth)
        levels = ("layer1", "layer2", "layer3", "layer4")
        self.levels = levels
        self.decoder = FPNDecoder([self.backbone.channels[k] for k in levels], num_classes, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone(x)
        return _resize_to(self.decoder([f[k] for k in self.levels]), x.shape[-2:])


class NullSegmenter(nn.Module):
    """No parameters, no compute: one background-everywhere logit map (measures the pipeline alone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 1, *x.shape[-2:]), -30.0, dtype=x.dtype, device=x.device)
