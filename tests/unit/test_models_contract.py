"""Output contract of every registered model and of the Segmenter around it (tiny inputs, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.registry import DEFAULT_MODEL, build_model, get_spec, list_models
from models.segmenter import Segmenter, letterbox_box, prepare_input

TORCHVISION = {
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
}


def test_registry_has_the_promised_models() -> None:
    names = {s.name for s in list_models()}
    assert {"selfie", "selfie_landscape", "resnet18_fpn", "null"} | TORCHVISION <= names
    assert DEFAULT_MODEL == "selfie"
    for spec in list_models():
        assert spec.classes[0] == "background"
        assert len(spec.mean) == 3 and len(spec.std) == 3
        if spec.binary:
            assert spec.classes == ("background", "person") and spec.foreground_class == 1
        if spec.name in TORCHVISION:
            assert len(spec.classes) == 21 and spec.classes[spec.foreground_class] == "person"
            assert spec.weights.kind == "url" and spec.weights.url.startswith("https://download.pytorch.org/")
    assert "RANDOM INIT" in get_spec("resnet18_fpn").description


@pytest.mark.parametrize("name", [s.name for s in list_models() if s.name not in TORCHVISION])
@pytest.mark.parametrize("batch", [1, 3])
def test_small_models_output_contract(name: str, batch: int) -> None:
    # torchvision-layout models are checked in test_models_torchvision.py with one build each.
    module, spec = build_model(name, allow_download=False)
    h, w = (64, 96) if name != "selfie_landscape" else (48, 80)
    with torch.inference_mode():
        out = module(torch.rand(batch, 3, h, w))
    assert out.shape == (batch, spec.num_outputs, h, w)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not module.training


def test_null_model_has_no_parameters_and_predicts_background() -> None:
    seg = Segmenter.from_name("null", device="cpu")
    assert sum(p.numel() for p in seg.module.parameters()) == 0
    ((labels, fg),) = seg([np.full((20, 30, 3), 255, np.uint8)])
    assert labels.shape == (20, 30) and labels.dtype == np.uint8 and not labels.any()
    assert fg is not None and fg.dtype == np.float32 and float(fg.max()) < 1e-6


def test_segmenter_mixed_sizes_batch() -> None:
    seg = Segmenter.from_name("selfie", device="cpu")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(120, 160), (37, 300), (120, 160)]]
    x = seg.preprocess(images)
    assert x.shape == (3, 3, 256, 256) and x.dtype == torch.float32
    # selfie takes RGB scaled to [0, 1]
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    probs = seg.infer(x)
    assert probs.shape == (3, 2, 256, 256)
    assert torch.allclose(probs.sum(1), torch.ones(3, 256, 256), atol=1e-5)
    out = seg.postprocess(probs, [im.shape[:2] for im in images])
    for (labels, fg), im in zip(out, images, strict=True):
        assert labels.shape == im.shape[:2] and fg is not None and fg.shape == im.shape[:2]
        assert np.array_equal(labels, (fg > 0.5).astype(np.uint8))
    # identical images in one batch give identical results
    assert np.array_equal(out[0][0], out[2][0])
    # each row of a mixed batch is exactly that image's input alone, in its place
    for i, im in enumerate(images):
        assert torch.equal(x[i], seg.preprocess([im])[0])
    assert not torch.equal(x[0], x[1])


def test_segmenter_multiclass_letterbox_roundtrip() -> None:
    spec = get_spec("resnet18_fpn")
    module = spec.builder().eval()
    seg = Segmenter(module, spec, device="cpu")
    img = np.zeros((50, 200, 3), np.uint8)
    x = seg.preprocess([img])
    top, left, h, w = letterbox_box((50, 200), spec.input_size)
    assert (h, w) == (64, 256) and top == 96 and left == 0
    # padding is the mean colour, i.e. zero after normalisation; the black image is not
    assert float(x[0, :, :top].abs().max()) == 0.0
    assert float(x[0, :, top : top + h].abs().min()) > 1.0
    ((labels, fg),) = seg.postprocess(seg.infer(x), [(50, 200)])
    assert labels.shape == (50, 200) and fg is None and labels.max() < len(spec.classes)


def test_preprocess_rejects_bad_images() -> None:
    seg = Segmenter.from_name("null", device="cpu")
    with pytest.raises(ValueError, match="RGB uint8"):
        seg.preprocess([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="precision"):
        Segmenter(seg.module, seg.spec, precision="fp8")


def test_bf16_autocast_on_cpu_keeps_float32_probabilities() -> None:
    module, spec = build_model("selfie")
    seg = Segmenter(module, spec, device="cpu", precision="bf16", channels_last=True)
    probs = seg.infer(seg.preprocess([np.zeros((64, 64, 3), np.uint8)]))
    assert probs.dtype == torch.float32 and probs.shape == (1, 2, 256, 256)


@pytest.mark.parametrize("name", ["selfie", "resnet18_fpn"])  # stretch and letterbox
def test_inputs_prepared_on_a_capture_thread_are_bit_identical_to_preprocess(name: str) -> None:
    spec = get_spec(name)
    seg = Segmenter(spec.builder().eval(), spec, device="cpu", optimize=False)
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(720, 1280, 3), (300, 200, 3)]]
    ready = [prepare_input(spec, f) for f in frames]
    for a in ready:
        assert a.shape == (*spec.input_size, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    x = seg.from_prepared(ready)
    ref = seg.preprocess(frames)
    assert torch.equal(x, ref)  # same bits: same masks whichever thread prepared the input
    assert x.is_contiguous(memory_format=torch.channels_last)  # the frozen graphs' layout
    assert torch.equal(seg.from_prepared(ready[1:]), seg.preprocess(frames[1:]))  # a lone frame
    # read-only frames are fine; wrong shapes are refused with a clear message
    ro = frames[0].copy()
    ro.flags.writeable = False
    assert np.array_equal(prepare_input(spec, ro), ready[0])
    with pytest.raises(ValueError, match="expected float32"):
        seg.from_prepared([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare_input(spec, np.zeros((8, 8), np.uint8))
