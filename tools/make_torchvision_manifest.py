"""Write tests/data/torchvision_manifest.json from real torchvision.

torchvision does not import beside the project's torch, so this runs once in a throwaway venv:

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /tmp/tvenv/bin/python tools/make_torchvision_manifest.py --out tests/data/torchvision_manifest.json

For each of the six segmentation models (weights=None, num_classes=21, aux_loss as the official
checkpoints have it) it records every state-dict key with its shape, plus a forward-pass
fingerprint: parameters filled by ``deterministic_fill`` (no RNG, so any torch version reproduces
them), a fixed 64×64 input, and a coarse grid of the output logits. The unit test rebuilds our
modules, applies the same fill and compares keys, shapes and logits.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

MODELS = {
    "fcn_resnet50": True,
    "fcn_resnet101": True,
    "deeplabv3_resnet50": True,
    "deeplabv3_resnet101": True,
    "deeplabv3_mobilenet_v3_large": True,
    "lraspp_mobilenet_v3_large": False,  # torchvision's LR-ASPP has no auxiliary head
}
FINGERPRINT_SIZE = 64
FINGERPRINT_STRIDE = 8


def deterministic_fill(module: torch.nn.Module) -> None:
    """Fill parameters and BN statistics with smooth, well-scaled values that need no RNG."""
    with torch.no_grad():
        for k, (name, t) in enumerate(sorted(module.state_dict().items())):
            if not t.is_floating_point():
                continue
            v = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.7 + k).reshape(t.shape)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                v = 1.0 + 0.5 * v.abs()
            elif leaf in ("running_mean", "bias"):
                v = 0.1 * v
            elif t.dim() == 1:  # norm weight
                v = 1.0 + 0.1 * v
            else:  # conv weight: keep activations O(1) through deep stacks
                fan_in = t[0].numel()
                v = v * (1.0 / math.sqrt(fan_in))
            t.copy_(v.to(t.dtype))


def fingerprint_input() -> torch.Tensor:
    n = 3 * FINGERPRINT_SIZE * FINGERPRINT_SIZE
    x = torch.cos(torch.arange(n, dtype=torch.float64) * 0.05)
    return x.reshape(1, 3, FINGERPRINT_SIZE, FINGERPRINT_SIZE).float()


def fingerprint(logits: torch.Tensor) -> list:
    return logits[0, :, ::FINGERPRINT_STRIDE, ::FINGERPRINT_STRIDE].double().round(decimals=5).tolist()


def main() -> None:
    import torchvision
    from torchvision.models import segmentation

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    manifest: dict = {"torch": torch.__version__, "torchvision": torchvision.__version__, "models": {}}
    for name, aux in MODELS.items():
        kwargs = {"weights": None, "weights_backbone": None, "num_classes": 21}
        if aux:
            kwargs["aux_loss"] = True
        model = getattr(segmentation, name)(**kwargs).eval()
        deterministic_fill(model)
        with torch.inference_mode():
            out = model(fingerprint_input())["out"]
        manifest["models"][name] = {
            "keys": {k: list(v.shape) for k, v in model.state_dict().items()},
            "fingerprint": fingerprint(out),
        }
        print(name, len(manifest["models"][name]["keys"]), "keys")
    args.out.write_text(json.dumps(manifest, indent=0, sort_keys=False))


if __name__ == "__main__":
    main()
