"""Named models: what each network is, what it predicts, and where its weights come from.

Weights precedence in ``build_model``: an explicit file > the embedded file shipped in
``models/weights/`` > the official URL (SHA-256 checked, cached in torch's hub cache). Models with
no weight source are randomly initialised, and their description says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import nn

from models.segmenters import MobileNetDeepLab, MobileNetLRASPP, NullSegmenter, ResNetFPN, ResNetSegmenter
from models.selfie import SelfieSegmenter
from models.weights import WeightsError, apply_state_dict, fetch_cached, hub_cache_path, read_state_dict

__all__ = [
    "ModelSpec",
    "WeightsSource",
    "UnknownModelError",
    "WeightsError",
    "list_models",
    "get_spec",
    "weights_status",
    "build_model",
    "DEFAULT_MODEL",
    "WEIGHTS_DIR",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "selfie"

VOC_CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
PERSON_CLASSES = ("background", "person")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(ValueError):
    """No model of that name; the message lists the available ones."""


@dataclass(frozen=True)
class WeightsSource:
    kind: Literal["embedded", "url", "none"]
    file: str = ""  # embedded: file name under models/weights/
    url: str = ""  # url: official download location
    sha256: str = ""  # url: digest or torchvision's 8-digit prefix (from the file name)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    binary: bool
    foreground_class: int | None
    description: str
    weights: WeightsSource
    builder: Callable[[], nn.Module] = field(repr=False, compare=False)
    resize: Literal["stretch", "letterbox"] = "stretch"

    @property
    def num_outputs(self) -> int:
        """Channels the network emits (1 for binary models)."""
        return 1 if self.binary else len(self.classes)


def _tv(name: str, builder: Callable[[], nn.Module], url_file: str, what: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        classes=VOC_CLASSES,
        input_size=(520, 520),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        binary=False,
        foreground_class=15,
        description=f"{what}, 21 Pascal VOC classes (torchvision COCO-trained weights, BSD-3-Clause)",
        weights=WeightsSource(
            "url",
            url=f"https://download.pytorch.org/models/{url_file}",
            sha256=url_file.rsplit("-", 1)[-1].split(".")[0],
        ),
        builder=builder,
        resize="letterbox",
    )


_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="selfie",
        classes=PERSON_CLASSES,
        input_size=(256, 256),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        binary=True,
        foreground_class=1,
        description="MediaPipe selfie segmentation, general 256x256, converted; offline default, Apache-2.0",
        weights=WeightsSource("embedded", file="selfie.safetensors"),
        builder=SelfieSegmenter,
    ),
    ModelSpec(
        name="selfie_landscape",
        classes=PERSON_CLASSES,
        input_size=(144, 256),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        binary=True,
        foreground_class=1,
        description="MediaPipe selfie segmentation (landscape, 144x256), converted (Apache-2.0)",
        weights=WeightsSource("embedded", file="selfie_landscape.safetensors"),
        builder=SelfieSegmenter,
    ),
    ModelSpec(
        name="resnet18_fpn",
        classes=PERSON_CLASSES,
        input_size=(256, 256),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        binary=False,
        foreground_class=1,
        description="ResNet-18 + light FPN, person/background; RANDOM INIT unless a weights file is given",
        weights=WeightsSource("none"),
        builder=lambda: ResNetFPN(num_classes=2),
        resize="letterbox",
    ),
    _tv(
        "deeplabv3_resnet50",
        lambda: ResNetSegmenter(head="deeplabv3", depth=50),
        "deeplabv3_resnet50_coco-cd0a2569.pth",
        "DeepLabV3 ResNet-50",
    ),
    _tv(
        "deeplabv3_resnet101",
        lambda: ResNetSegmenter(head="deeplabv3", depth=101),
        "deeplabv3_resnet101_coco-586e9e4e.pth",
        "DeepLabV3 ResNet-101",
    ),
    _tv(
        "fcn_resnet50",
        lambda: ResNetSegmenter(head="fcn", depth=50),
        "fcn_resnet50_coco-1167a1af.pth",
        "FCN ResNet-50",
    ),
    _tv(
        "fcn_resnet101",
        lambda: ResNetSegmenter(head="fcn", depth=101),
        "fcn_resnet101_coco-7ecb50ca.pth",
        "FCN ResNet-101",
    ),
    _tv(
        "deeplabv3_mobilenet_v3_large",
        MobileNetDeepLab,
        "deeplabv3_mobilenet_v3_large-fc3c493d.pth",
        "DeepLabV3 MobileNetV3-Large",
    ),
    _tv(
        "lraspp_mobilenet_v3_large",
        MobileNetLRASPP,
        "lraspp_mobilenet_v3_large-d234d4ea.pth",
        "LR-ASPP MobileNetV3-Large",
    ),
    ModelSpec(
        name="null",
        classes=PERSON_CLASSES,
        input_size=(32, 32),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        binary=True,
        foreground_class=1,
        description="No network: background everywhere at zero cost (pipeline measurements and tests)",
        weights=WeightsSource("none"),
        builder=NullSegmenter,
    ),
)
_BY_NAME = {s.name: s for s in _SPECS}


def list_models() -> list[ModelSpec]:
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(_BY_NAME)}") from None


def weights_status(spec: ModelSpec, weights: str | Path | None = None) -> dict:
    """Where ``spec``'s weights come from and whether they are on disk now."""
    if weights is not None:
        return {"source": "file", "location": str(weights), "present": Path(weights).is_file()}
    src = spec.weights
    if src.kind == "embedded":
        path = WEIGHTS_DIR / src.file
        return {"source": "embedded", "location": str(path), "present": path.is_file()}
    if src.kind == "url":
        path = hub_cache_path(src.url)
        return {
            "source": "url",
            "location": src.url,
            "cache": str(path),
            "present": path.is_file(),
            "sha256": src.sha256,
        }
    if spec.name == "null":
        return {"source": "none", "location": "no parameters", "present": True}
    return {"source": "none", "location": "random initialisation (untrained)", "present": False}


def build_model(
    name: str, *, weights: str | Path | None = None, allow_download: bool = True
) -> tuple[nn.Module, ModelSpec]:
    """The named network in eval mode on the CPU with its weights loaded."""
    spec = get_spec(name)
    module = spec.builder()
    src = spec.weights
    path: Path | None = None
    if weights is not None:
        path = Path(weights)
    elif src.kind == "embedded":
        path = WEIGHTS_DIR / src.file
    elif src.kind == "url":
        path = fetch_cached(src.url, src.sha256, allow_download=allow_download)
    if path is not None:
        if spec.name == "null":
            raise WeightsError(f"{path}: model 'null' has no parameters to load")
        apply_state_dict(module, read_state_dict(path), source=str(path))
    return module.eval(), spec
