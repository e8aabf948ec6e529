"""The temporal refiner's compiled CPU kernels against its OpenCV path, and how they load.

The refiner's own behaviour is tested (on both implementations) in test_temporal.py; here:
each kernel gives the OpenCV path's numbers at the model's real input size, a whole sequence
gives the same plans and outputs either way, and loading never blocks or breaks the refiner.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import kernels
from models.temporal import _SURE, TemporalParams, TemporalRefiner, _gate_binary_cpu

MEAN = (0.5, 0.5, 0.5)  # the default model's normalisation
STD = (0.5, 0.5, 0.5)


@pytest.fixture
def jit(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SEGSTREAM_JIT", "1")
    k = kernels.load()
    if k is None:
        pytest.skip(f"compiled kernels unavailable: {kernels.status()} (pip install 'segstream[jit]')")
    return k


def _path(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("SEGSTREAM_JIT", "1" if name == "numba" else "0")


def _input(seed: int, size: int = 256) -> torch.Tensor:
    """A normalised channels-last model input, as the CPU segmenter hands it over: coloured
    blocks with pixel noise, and values beyond [0, 1] once denormalised (the thumbnail clips)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.rand(1, 3, 8, 8, generator=g) * 1.4 - 0.2
    rgb = blocks.repeat_interleave(size // 8, dim=2).repeat_interleave(size // 8, dim=3)
    rgb = rgb + 0.05 * torch.randn(1, 3, size, size, generator=g)
    return ((rgb - 0.5) / 0.5).contiguous(memory_format=torch.channels_last)


def _probs(seed: int, size: int = 256, shift: int = 0) -> torch.Tensor:
    """Two-class probabilities: sure background, a sure object with an unsure outline, noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    d = torch.sqrt((yy - size / 2.0) ** 2 + (xx - size / 2.0 - shift) ** 2) - size / 5
    fg = torch.sigmoid(-d / 3 + 0.6 * torch.randn(size, size, generator=g))
    return torch.stack((1 - fg, fg))


def test_thumbnail_and_residual_equal_the_opencv_path(jit, monkeypatch: pytest.MonkeyPatch) -> None:
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    prev_thumb, _, _ = refiner._thumbnail(_input(0))
    for seed in (1, 2):
        x = _input(seed)
        thumb, residual, mean = refiner._thumbnail(x, prev_thumb)
        assert residual is not None  # the kernel made the residual alongside
        _path(monkeypatch, "opencv")
        cv_thumb, cv_residual, _ = refiner._thumbnail(x, prev_thumb)
        _path(monkeypatch, "numba")
        assert cv_residual is None
        from models.temporal import _mean, _residual

        expected = _residual(cv_thumb, prev_thumb)
        assert thumb.shape == cv_thumb.shape == (1, 3, 64, 64)
        torch.testing.assert_close(thumb, cv_thumb, atol=1e-6, rtol=0)
        torch.testing.assert_close(residual, expected, atol=1e-6, rtol=0)
        assert mean == pytest.approx(_mean(expected), abs=1e-6)
        assert float(thumb.min()) == 0.0 and float(thumb.max()) == 1.0  # clipped like OpenCV's


def test_thumbnail_kernel_leaves_other_shapes_to_opencv(jit) -> None:
    """Odd block sizes and sizes the block does not divide take the OpenCV path (no residual)."""
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    for h, w in [(255, 190), (192, 192)]:  # blocks of 2 do not divide 255; 192 // 64 = 3 is odd
        x = torch.randn(1, 3, h, w).contiguous(memory_format=torch.channels_last)
        prev, _, _ = refiner._thumbnail(x)
        thumb, residual, _ = refiner._thumbnail(x, prev)
        assert residual is None and thumb.shape == prev.shape


@pytest.mark.parametrize("gap", [0, 2])
def test_gate_equals_the_opencv_gate(jit, monkeypatch: pytest.MonkeyPatch, gap: int) -> None:
    params = TemporalParams(mode="smooth")
    refiner = TemporalRefiner(params)
    lo, hi, trust = refiner._gates(gap)
    g = torch.Generator().manual_seed(gap)
    residual = 0.3 * torch.rand(1, 1, 64, 64, generator=g) ** 3
    prev = _probs(3)
    for box in (None, (60, 50, 140, 150)):
        fast = _gate_binary_cpu(prev, residual, lo, hi, trust, params, box)
        _path(monkeypatch, "opencv")
        slow = _gate_binary_cpu(prev, residual, lo, hi, trust, params, box)
        _path(monkeypatch, "numba")
        assert fast.prev_unsure is None and slow.prev_unsure is not None
        np.testing.assert_allclose(fast.still, slow.still, atol=1e-7, rtol=0)
        assert tuple(fast.prev_rect) == tuple(slow.prev_rect)
        assert 0 < fast.prev_rect[2] < 256  # a real box around the outline


@pytest.mark.parametrize("hysteresis", [0.0, 0.05, 0.2])
def test_fusion_equals_the_opencv_and_torch_paths(
    jit, monkeypatch: pytest.MonkeyPatch, hysteresis: float
) -> None:
    params = TemporalParams(mode="smooth", hysteresis=hysteresis)
    refiner = TemporalRefiner(params)
    new, prev = _probs(4, shift=2), _probs(5)
    residual = 0.2 * torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(6)) ** 2
    fast = refiner._blend(new, prev, residual, gap=0)
    _path(monkeypatch, "opencv")
    slow = refiner._blend(new, prev, residual, gap=0)
    _path(monkeypatch, "numba")
    exact = refiner._blend(new.double(), prev.double(), residual.double(), gap=0).float()  # torch
    torch.testing.assert_close(fast, slow, atol=2e-6, rtol=0)
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=0)
    assert not torch.allclose(fast, new, atol=1e-2)  # it did blend


@pytest.mark.parametrize("mode", ["smooth", "keyframe"])
def test_a_sequence_gives_the_same_plans_and_outputs_either_way(
    jit, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The engine's loop (plan, model, refine into the model's output) over a drifting scene:
    every plan, output and remembered box agree between the two implementations."""
    params = TemporalParams(mode=mode)
    results: dict[str, list] = {}
    for name in ("numba", "opencv"):
        _path(monkeypatch, name)
        refiner = TemporalRefiner(params, mean=MEAN, std=STD)
        state = refiner.initial_state()
        out_seq = []
        base = _input(7)
        for i in range(12):
            x = (base + 0.02 * i).contiguous(memory_format=torch.channels_last)
            if i == 6:
                x = _input(8)  # a cut: everything changes
            plan = refiner.plan(x, state, index=i)
            probs = _probs(10 + i, shift=i) if plan.run_model else None
            out, state = refiner.refine(plan, probs, state, overwrite=True)
            out_seq.append((plan.run_model, plan.reason, out.clone(), state.unsure_box))
        results[name] = out_seq
    reasons = [r[1] for r in results["numba"]]
    assert "scene_cut" in reasons and reasons[0] == "first"
    for (run_a, why_a, out_a, box_a), (run_b, why_b, out_b, box_b) in zip(
        results["numba"], results["opencv"], strict=True
    ):
        assert (run_a, why_a) == (run_b, why_b)
        torch.testing.assert_close(out_a, out_b, atol=2e-6, rtol=0)
        assert box_a == box_b


def test_fusion_kernel_box_holds_every_unsure_pixel(jit) -> None:
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    state = refiner.initial_state()
    base = _input(20)
    for i in range(4):
        plan = refiner.plan(base + 0.01 * i, state, index=i)
        out, state = refiner.refine(plan, _probs(30 + i, shift=3 * i), state)
    assert state.unsure_box is not None and state.resets == 0
    x0, y0, bw, bh = state.unsure_box
    fg = out[1].numpy()
    unsure = (fg >= _SURE) & (fg <= 1 - _SURE)
    assert unsure[y0 : y0 + bh, x0 : x0 + bw].any()
    unsure[y0 : y0 + bh, x0 : x0 + bw] = False
    assert not unsure.any()
    assert bw * bh < fg.size


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_JIT", "0")
    assert kernels.current() is None and kernels.load() is None
    assert kernels.status() == "OpenCV (SEGSTREAM_JIT=0)"


def _fresh_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGSTREAM_JIT", "1")
    for name, value in (("_kernels", None), ("_error", None), ("_tried", False), ("_loader", None)):
        monkeypatch.setattr(kernels, name, value)


def test_loading_never_blocks_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first ``current()`` starts compiling in the background and returns at once; the
    refiner runs on OpenCV meanwhile, and on the kernels once they are there."""
    _fresh_loader(monkeypatch)
    entered, release = threading.Event(), threading.Event()
    made = SimpleNamespace(version="test")
    compiles = []

    def slow_compile():  # type: ignore[no-untyped-def]
        compiles.append(1)
        entered.set()
        release.wait(10)
        return made

    monkeypatch.setattr(kernels, "_compile", slow_compile)
    t0 = time.monotonic()
    assert kernels.current() is None
    assert entered.wait(5)  # the loader is compiling now
    assert kernels.current() is None  # still loading: no second loader, no wait
    assert time.monotonic() - t0 < 1.0
    release.set()
    deadline = time.monotonic() + 10
    while kernels.current() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert kernels.current() is made and compiles == [1]


def test_a_failed_compile_falls_back_to_opencv(monkeypatch: pytest.MonkeyPatch) -> None:
    _fresh_loader(monkeypatch)

    def broken():  # type: ignore[no-untyped-def]
        raise ImportError("No module named 'numba'")

    monkeypatch.setattr(kernels, "_compile", broken)
    assert kernels.load() is None
    assert kernels.status() == "OpenCV (ImportError: No module named 'numba')"
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    state = refiner.initial_state()
    base = _input(40)
    for i in range(3):
        plan = refiner.plan(base + 0.01 * i, state, index=i)
        out, state = refiner.refine(plan, _probs(50 + i), state)
        assert (plan.gate is None) == (i == 0)
        assert plan.gate is None or plan.gate.prev_unsure is not None  # OpenCV's gate
    assert out.shape == (2, 256, 256) and state.full_frames == 3


@pytest.mark.parametrize("how", ["added", "patched"])
def test_the_engine_loads_the_kernels_for_the_first_refined_stream_before_its_frames(
    monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Loading takes about a second of CPU and 100 MB: a CPU engine starts it when a stream
    with refinement is added (or switched to it), while its source connects, and not at all
    for streams without refinement."""
    from pipeline.config import TemporalConfig
    from pipeline.slot import FrameSlot
    from tests.unit.test_engine import TorchSegmenter, start_engine

    _fresh_loader(monkeypatch)
    compiled = threading.Event()
    made = SimpleNamespace(version="test")

    def fake_compile():  # type: ignore[no-untyped-def]
        compiled.set()
        return made

    monkeypatch.setattr(kernels, "_compile", fake_compile)
    eng, _ = start_engine({"t": TorchSegmenter()})
    try:
        eng.add_stream("plain", FrameSlot(on_put=eng.notify), model="t")
        assert kernels._loader is None  # nothing started for a stream without refinement
        smooth = TemporalConfig(mode="smooth")
        if how == "added":
            eng.add_stream("s", FrameSlot(on_put=eng.notify), model="t", temporal=smooth)
        else:
            eng.update_stream("plain", temporal=smooth)
        assert compiled.wait(5)  # no frame was sent at all
        deadline = time.monotonic() + 5
        while kernels.current() is not made and time.monotonic() < deadline:
            time.sleep(0.01)
        assert kernels.current() is made
    finally:
        assert eng.stop(2)


def test_loading_hands_the_gil_over_often_and_restores_the_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While numba imports in the background, the GIL changes hands every 0.5 ms instead of
    5 ms, so the engine thread is not held up after each torch call; the interpreter's own
    interval is back afterwards, also when compiling fails."""
    import sys

    before = sys.getswitchinterval()
    for outcome in ("ok", "fails"):
        _fresh_loader(monkeypatch)
        seen = []

        def compile_(outcome=outcome, seen=seen):  # type: ignore[no-untyped-def]
            seen.append(sys.getswitchinterval())
            if outcome == "fails":
                raise RuntimeError("no locator")
            return SimpleNamespace(version="test")

        monkeypatch.setattr(kernels, "_compile", compile_)
        kernels.load()
        assert seen == [pytest.approx(0.0005)]
        assert sys.getswitchinterval() == before
