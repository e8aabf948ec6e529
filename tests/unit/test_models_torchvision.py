"""Key/shape and numerical parity of the torchvision-layout models with real torchvision 0.29.1.

The manifest was generated once by tools/make_torchvision_manifest.py in a throwaway venv
(torchvision cannot be imported beside this project's torch). Besides every state-dict key and
shape, it holds logits for a fixed input with parameters set by a deterministic (RNG-free) fill,
so the test also proves that the forward computation matches, not only the layout.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from models.registry import get_spec

DATA = Path(__file__).resolve().parents[1] / "data"
TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_torchvision_manifest.py"
MANIFEST = json.loads((DATA / "torchvision_manifest.json").read_text())


def _tool():
    spec = importlib.util.spec_from_file_location("make_torchvision_manifest", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", sorted(MANIFEST["models"]))
def test_torchvision_parity_and_contract(name: str) -> None:
    tool = _tool()
    spec = get_spec(name)
    model = spec.builder().eval()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = MANIFEST["models"][name]["keys"]
    assert sorted(set(ref) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(ref)) == [], "unexpected keys"
    assert {k: v for k, v in ours.items() if v != ref[k]} == {}, "shape mismatches"

    if not name.endswith("resnet101"):
        # The ResNet-101 variants run the same code as the ResNet-50 ones with more blocks in
        # layer3 (their layout is checked above); filling 40M+ parameters would dominate test time.
        tool.deterministic_fill(model)
        with torch.inference_mode():
            out = model(tool.fingerprint_input())
        got = torch.tensor(tool.fingerprint(out))
        want = torch.tensor(MANIFEST["models"][name]["fingerprint"])
        # fingerprints are rounded to 1e-5; values are O(1)
        assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())

    # output contract at batch 1 and 3, odd input size
    with torch.inference_mode():
        for batch in (1, 3):
            y = model(torch.rand(batch, 3, 24, 40))
            assert y.shape == (batch, 21, 24, 40) and torch.isfinite(y).all()
