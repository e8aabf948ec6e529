"""Temporal refinement on a generated sequence with known masks.

The scene: a static blocky background that is never very red, a static red square and a
red disc moving to the right, plus pixel noise. The fake segmenter thresholds "redness"
with a soft edge and adds per-frame logit noise (seeded by the frame content), which is
what makes a per-frame model flicker at edges and on ambiguous background.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import kernels
from models.temporal import Plan, TemporalParams, TemporalRefiner, TemporalState, luma_from_input

H = W = 64
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, params=["opencv", "numba"])
def cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs on both CPU implementations: OpenCV calls and the compiled kernels."""
    monkeypatch.setenv("SEGSTREAM_JIT", "1" if request.param == "numba" else "0")
    if request.param == "numba" and kernels.load() is None:
        pytest.skip(f"compiled kernels unavailable: {kernels.status()} (pip install 'segstream[jit]')")
    return str(request.param)


@dataclass(frozen=True)
class FakeSpec:
    name: str = "redness"
    classes: tuple[str, ...] = ("background", "red")
    input_size: tuple[int, int] = (H, W)
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    binary: bool = True
    foreground_class: int = 1


class FakeSegmenter:
    """Same methods as models.segmenter.Segmenter; deterministic and fast."""

    def __init__(self, logit_noise: float = 0.8) -> None:
        self.spec = FakeSpec()
        self.device = torch.device("cpu")
        self.logit_noise = logit_noise
        self.calls = 0

    def preprocess(self, images):
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) for im in images])
        x = F.interpolate(x.float() / 255.0, size=self.spec.input_size, mode="bilinear", align_corners=False)
        m = torch.tensor(MEAN).view(1, 3, 1, 1)
        s = torch.tensor(STD).view(1, 3, 1, 1)
        return (x - m) / s

    def infer(self, x):
        self.calls += x.shape[0]
        rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
        red = rgb[:, :1] - 0.5 * (rgb[:, 1:2] + rgb[:, 2:3])
        red = F.avg_pool2d(red, 3, stride=1, padding=1, count_include_pad=False)
        g = torch.Generator().manual_seed(int(abs(float(x.sum())) * 1000) % (2**31))
        logit = (red - 0.25) * 12 + self.logit_noise * torch.randn(red.shape, generator=g)
        p = torch.sigmoid(logit)
        return torch.cat([1 - p, p], dim=1)

    def postprocess(self, probs, sizes):
        out = []
        for p, (h, w) in zip(probs, sizes, strict=True):
            p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            out.append((p.argmax(0).to(torch.uint8).numpy(), p[1].numpy()))
        return out


def make_scene(
    n: int = 24, *, speed: float = 3.0, noise: float = 4.0, seed: int = 0, moving: bool = True
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RGB frames and boolean ground-truth masks."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (H // 8, W // 8, 3)).astype(np.float32)
    bg = np.kron(bg, np.ones((8, 8, 1), np.float32))
    bg[..., 0] *= 0.35
    yy, xx = np.mgrid[0:H, 0:W]
    square = (yy >= 40) & (yy < 56) & (xx >= 44) & (xx < 60)
    frames, masks = [], []
    for t in range(n):
        disc = (xx - (8 + speed * t)) ** 2 + (yy - 20) ** 2 < 8**2 if moving else np.zeros_like(square)
        mask = square | disc
        img = bg.copy()
        img[mask] = (210, 50, 60)
        img += rng.normal(0.0, noise, img.shape).astype(np.float32)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(mask)
    return frames, masks


def run(frames, params, seg=None, *, indexes=None, discontinuities=()):
    seg = seg or FakeSegmenter()
    refiner = TemporalRefiner(params, mean=MEAN, std=STD)
    state = refiner.initial_state()
    preds, plans = [], []
    for i, img in enumerate(frames):
        index = indexes[i] if indexes is not None else i
        x = seg.preprocess([img])
        out, state, plan = refiner.step(x, state, seg.infer, index=index, discontinuity=i in discontinuities)
        preds.append(out.argmax(0).numpy() == 1)
        plans.append(plan)
    return preds, plans, state


def planned(refiner, seg, frame, state, index):
    """The plan for one frame from ``state`` and the model's probabilities for it."""
    x = seg.preprocess([frame])
    return refiner.plan(x, state, index=index), seg.infer(x)[0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return 1.0 if u == 0 else np.count_nonzero(a & b) / u


def flicker(preds, masks) -> float:
    changed = steady = 0
    for p0, p1, g0, g1 in zip(preds, preds[1:], masks, masks[1:], strict=False):
        s = g0 == g1
        steady += np.count_nonzero(s)
        changed += np.count_nonzero((p0 != p1) & s)
    return changed / steady


def test_params_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="'blink'"):
        TemporalParams(mode="blink")
    with pytest.raises(ValueError, match="motion_high"):
        TemporalParams(motion_low=0.1, motion_high=0.05)
    with pytest.raises(ValueError, match="keyframe_max_gap"):
        TemporalParams(keyframe_max_gap=0)


def test_params_accept_the_pipeline_config_fields():
    from pipeline.config import TemporalConfig

    cfg = TemporalConfig(mode="keyframe", keyframe_max_gap=5)
    assert TemporalParams(**cfg.model_dump()).keyframe_max_gap == 5


def test_luma_from_normalised_input_recovers_brightness():
    seg = FakeSegmenter()
    grey = np.full((H, W, 3), 128, np.uint8)
    y = luma_from_input(seg.preprocess([grey]), MEAN, STD)
    assert y.shape == (1, 1, H, W)
    assert torch.allclose(y, torch.full_like(y, 128 / 255), atol=1e-3)


def test_off_is_the_model_unchanged():
    frames, _ = make_scene(6)
    seg = FakeSegmenter()
    refiner = TemporalRefiner(TemporalParams(mode="off"), mean=MEAN, std=STD)
    state = refiner.initial_state()
    for i, img in enumerate(frames):
        x = seg.preprocess([img])
        plan = refiner.plan(x, state, index=i)
        assert plan.run_model
        probs = seg.infer(x)[0]
        out, state = refiner.refine(plan, probs, state)
        assert torch.equal(out, probs)
    assert state.full_frames == state.frames == 6


def test_smooth_lowers_flicker_without_lag_on_the_moving_edge():
    frames, masks = make_scene(24, speed=3.0)
    off, _, _ = run(frames, TemporalParams(mode="off"))
    smooth, _, _ = run(frames, TemporalParams(mode="smooth"))
    assert flicker(smooth, masks) <= 0.5 * flicker(off, masks)
    # The moving disc: per-frame IoU inside its own neighbourhood must not trail the model.
    yy, xx = np.mgrid[0:H, 0:W]
    for t in range(1, len(frames)):
        near = (np.abs(yy - 20) < 14) & (np.abs(xx - (8 + 3 * t)) < 14)
        assert iou(smooth[t] & near, masks[t] & near) >= iou(off[t] & near, masks[t] & near) - 0.05, t


def test_smooth_beats_a_plain_moving_average_on_the_moving_edge():
    frames, masks = make_scene(24, speed=4.0)
    seg = FakeSegmenter()
    ema_preds, prev = [], None
    for img in frames:
        p = seg.infer(seg.preprocess([img]))[0]
        prev = p if prev is None else 0.5 * p + 0.5 * prev
        ema_preds.append(prev.argmax(0).numpy() == 1)
    smooth, _, _ = run(frames, TemporalParams(mode="smooth"))
    miou = lambda preds: np.mean([iou(p, m) for p, m in zip(preds, masks, strict=True)])  # noqa: E731
    assert miou(smooth) > miou(ema_preds) + 0.01


def test_keyframe_skips_static_frames_and_catches_a_sudden_change_next_frame():
    frames, masks = make_scene(20, moving=False)
    # At frame 12 a red disc appears out of nowhere.
    yy, xx = np.mgrid[0:H, 0:W]
    disc = (xx - 16) ** 2 + (yy - 16) ** 2 < 9**2
    for t in range(12, 20):
        frames[t] = frames[t].copy()
        frames[t][disc] = (210, 50, 60)
        masks[t] = masks[t] | disc
    params = TemporalParams(mode="keyframe", keyframe_max_gap=8)
    preds, plans, state = run(frames, params)
    ran = [p.index for p in plans if p.run_model]
    assert ran[0] == 0 and 12 in ran
    assert state.full_frames <= 5, ran  # 0, 8, 12 and at most a couple more
    assert all(b - a <= 8 for a, b in zip(ran, ran[1:], strict=False)), ran
    assert iou(preds[12], masks[12]) > 0.85
    assert not plans[12].reset  # a new object is not a scene cut


def test_keyframe_falls_back_to_every_frame_on_fast_motion():
    frames, _ = make_scene(11, speed=5.0)  # the disc stays in view throughout
    _, plans, state = run(frames, TemporalParams(mode="keyframe"))
    assert state.full_frames == 11, [p.reason for p in plans]


@pytest.mark.parametrize("mode", ["smooth", "keyframe"])
def test_state_resets_on_discontinuity_and_scene_cut(mode):
    frames, _ = make_scene(12, moving=False)
    inverted = [255 - f for f in frames[6:10]]  # the residual is large everywhere: a new scene
    seq = frames[:6] + inverted + frames[6:]
    _, plans, state = run(seq, TemporalParams(mode=mode), discontinuities={3})
    assert plans[3].reset and plans[3].reason == "discontinuity" and plans[3].residual is None
    assert plans[6].reset and plans[6].reason == "scene_cut"
    assert plans[10].reason == "scene_cut"  # and back again
    assert all(plans[i].run_model for i in (3, 6, 10))
    assert state.resets == 3


def test_skipped_frames_widen_the_gate_and_long_gaps_reset():
    frames, masks = make_scene(12, speed=3.0)
    indexes = [0, 1, 2, 6, 7, 8, 9, 10, 80, 81, 82, 83]  # 3 then 69 frames dropped upstream
    preds, plans, state = run(frames, TemporalParams(mode="smooth", max_gap_reset=30), indexes=indexes)
    assert plans[3].gap == 3 and not plans[3].reset
    assert plans[8].gap == 69 and plans[8].reset and plans[8].reason == "gap"
    assert state.dropped == 72 and state.last_index == 83
    assert iou(preds[3], masks[3]) > 0.8


def test_gap_trusts_the_previous_mask_less():
    seg = FakeSegmenter()
    frames, _ = make_scene(3, moving=False)
    refiner = TemporalRefiner(TemporalParams(mode="smooth", hysteresis=0.0), mean=MEAN, std=STD)
    s0 = refiner.initial_state()
    _, s1, _ = refiner.step(seg.preprocess([frames[0]]), s0, seg.infer, index=0)
    x = seg.preprocess([frames[1]])
    new = seg.infer(x)[0]
    prev = s1.probs
    assert prev is not None
    near, _ = refiner.refine(refiner.plan(x, s1, index=1), new, s1)
    far, _ = refiner.refine(refiner.plan(x, s1, index=5), new, s1)
    # With frames missing the output stays closer to the model's fresh answer.
    assert (far - new).abs().mean() < 0.5 * (near - new).abs().mean()
    assert (near - new).abs().mean() > 0


def test_keyframe_carry_needs_no_probabilities_and_run_needs_them():
    seg = FakeSegmenter()
    frames, _ = make_scene(3, moving=False)
    refiner = TemporalRefiner(TemporalParams(mode="keyframe"), mean=MEAN, std=STD)
    _, state, _ = refiner.step(seg.preprocess([frames[0]]), TemporalState(), seg.infer, index=0)
    plan = refiner.plan(seg.preprocess([frames[1]]), state, index=1)
    assert isinstance(plan, Plan) and not plan.run_model and plan.reason == "carry"
    out, state2 = refiner.refine(plan, None, state)
    assert torch.equal(out, state.probs) and state2.full_frames == 1 and state2.frames == 2
    with pytest.raises(ValueError, match="no probabilities"):
        refiner.refine(refiner.plan(seg.preprocess([frames[1]]), TemporalState(), index=1), None, state)


def test_refine_keeps_a_batch_dimension_when_given_one():
    seg = FakeSegmenter()
    frames, _ = make_scene(2, moving=False)
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    state = refiner.initial_state()
    for i, img in enumerate(frames):
        x = seg.preprocess([img])
        out, state = refiner.refine(refiner.plan(x, state, index=i), seg.infer(x), state)
        assert out.shape == (1, 2, H, W)


def test_global_shift_finds_a_camera_pan_and_smooth_follows_it():
    from models.temporal import _global_shift, _residual, _warp

    big = F.avg_pool2d(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)), 5, 1, 2)
    ref, cur = big[:, :, 20:84, 20:84], big[:, :, 23:87, 18:82]  # content moved by (-2, +3) cells
    flow = _global_shift(cur, ref)
    assert flow is not None
    assert torch.allclose(flow.flatten() * 32, torch.tensor([-2.0, 3.0]), atol=0.1)
    assert float(_residual(cur, _warp(ref, flow)).mean()) < 0.2 * float(_residual(cur, ref).mean())


def test_smooth_compensation_keeps_the_gate_shut_on_a_pure_pan():
    frames, _ = make_scene(2, moving=False)
    pan = [frames[0], np.roll(frames[0], 2, axis=1)]
    _, comp, _ = run(pan, TemporalParams(mode="smooth", compensate=True))
    _, plain, _ = run(pan, TemporalParams(mode="smooth"))  # fixed-camera default: no compensation
    assert comp[1].flow is not None and plain[1].flow is None
    assert float(comp[1].residual.mean()) < 0.5 * float(plain[1].residual.mean())


def test_cpu_fast_path_matches_the_torch_path():
    g = torch.Generator().manual_seed(1)
    fg_new, fg_prev = torch.rand(1, 48, 40, generator=g), torch.rand(1, 48, 40, generator=g)
    new, prev = torch.cat((1 - fg_new, fg_new)), torch.cat((1 - fg_prev, fg_prev))
    residual = 0.08 * torch.rand(1, 1, 12, 10, generator=g)
    params = TemporalParams(mode="smooth", hysteresis=0.2)
    refiner = TemporalRefiner(params)
    fast = refiner._blend(new, prev, residual, gap=1)  # float32 on the CPU: OpenCV
    # float64 takes the torch path
    ref = refiner._blend(new.double(), prev.double(), residual.double(), gap=1).float()
    assert torch.allclose(fast, ref, atol=1e-5)
    assert not torch.allclose(fast, new, atol=1e-2)  # it did blend somewhere


@pytest.mark.parametrize("hysteresis", [0.0, 0.2])
def test_cpu_fast_path_blends_only_where_a_map_is_unsure(hysteresis: float) -> None:
    """Sure background around an unsure outline: the fast path works on the outline's box
    only, and agrees with the torch path everywhere, inside the box and out."""
    from models.temporal import _SURE

    g = torch.Generator().manual_seed(2)
    fg_new = torch.rand(1, 64, 80, generator=g) * 0.01  # sure background ...
    fg_prev = torch.rand(1, 64, 80, generator=g) * 0.01
    fg_new[:, 20:40, 30:50] = 0.3 + 0.4 * torch.rand(1, 20, 20, generator=g)  # ... an unsure patch
    fg_prev[:, 22:44, 28:46] = 0.3 + 0.4 * torch.rand(1, 22, 18, generator=g)
    fg_new[:, 50:60, 5:15] = 0.995  # sure of an object the previous frame was sure was not there
    new, prev = torch.cat((1 - fg_new, fg_new)), torch.cat((1 - fg_prev, fg_prev))
    residual = torch.zeros(1, 1, 16, 20)  # nothing moved: the previous output counts wherever allowed
    params = TemporalParams(mode="smooth", hysteresis=hysteresis)
    refiner = TemporalRefiner(params)
    fast = refiner._blend(new, prev, residual, gap=0)
    ref = refiner._blend(new.double(), prev.double(), residual.double(), gap=0).float()
    assert torch.allclose(fast, ref, atol=1e-5)
    unsure = ((fg_new >= _SURE) & (fg_new <= 1 - _SURE)) | ((fg_prev >= _SURE) & (fg_prev <= 1 - _SURE))
    assert torch.equal(fast[:, ~unsure[0]], new[:, ~unsure[0]])  # sure pixels: the new values as they are
    assert not torch.allclose(fast[1][unsure[0]], fg_new[unsure], atol=1e-2)  # the outline was blended


@pytest.mark.parametrize("mode", ["smooth", "keyframe"])
def test_cpu_gate_prepared_before_the_model_changes_nothing(mode: str) -> None:
    """The plan prepares the CPU blend's gate before the model runs; refining with it, without
    it, or into the model's own output (``overwrite``) gives the same probabilities."""
    frames, _ = make_scene(6)
    seg = FakeSegmenter()
    refiner = TemporalRefiner(TemporalParams(mode=mode, keyframe_max_gap=1), mean=MEAN, std=STD)
    state = refiner.initial_state()
    blended = 0
    for i, frame in enumerate(frames):
        plan, probs = planned(refiner, seg, frame, state, i)
        plain, _ = refiner.refine(dataclasses.replace(plan, gate=None), probs.clone(), state)
        kept = probs.clone()
        out, state = refiner.refine(plan, probs, state, overwrite=True)
        if plan.gate is not None:
            blended += 1
            assert out.data_ptr() == probs.data_ptr()  # written into the model's output
            assert not torch.equal(out, kept)
        assert torch.allclose(out, plain, atol=1e-6)
    assert blended >= 4


def test_smooth_takes_a_large_disagreement_at_once():
    refiner = TemporalRefiner(TemporalParams(mode="smooth", hysteresis=0.0))
    still = torch.zeros(1, 1, 8, 8)
    prev_fg = torch.full((1, 32, 32), 0.1)
    new_fg = prev_fg.clone()
    new_fg[:, :16] = 0.9  # the model now sees an object in the top half; the picture did not change
    new_fg[:, 16:] = 0.2  # and is a little less sure about the bottom half
    out = refiner._blend(torch.cat((1 - new_fg, new_fg)), torch.cat((1 - prev_fg, prev_fg)), still, gap=0)
    assert torch.allclose(out[1, :16], new_fg[:, :16])  # 0.8 apart: beyond `agreement`, no lag
    assert torch.all(out[1, 16:] < 0.2) and torch.all(out[1, 16:] > 0.1)  # noise: averaged


def test_smooth_on_a_panning_camera_lowers_flicker_without_lag():
    """A moving disc over a background that pans by 1 px per frame (a following camera).

    Much of the flicker here follows the disc's motion and cannot be removed without lag;
    the model's noise on top of it can.
    """
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (H // 8, 2 * W // 8, 3)).astype(np.float32)
    wide = np.kron(wide, np.ones((8, 8, 1), np.float32))
    wide[..., 0] *= 0.35
    yy, xx = np.mgrid[0:H, 0:W]
    frames, masks = [], []
    for t in range(24):
        img = wide[:, t : t + W].copy()
        disc = (xx - (10 + 2 * t)) ** 2 + (yy - 30) ** 2 < 9**2
        img[disc] = (210, 50, 60)
        img += rng.normal(0.0, 4.0, img.shape).astype(np.float32)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
        masks.append(disc)
    off, _, _ = run(frames, TemporalParams(mode="off"))
    smooth, _, _ = run(frames, TemporalParams(mode="smooth"))
    assert flicker(smooth, masks) <= 0.85 * flicker(off, masks)
    for t in range(1, len(frames)):
        near = (np.abs(yy - 30) < 14) & (np.abs(xx - (10 + 2 * t)) < 14)
        assert iou(smooth[t] & near, masks[t] & near) >= iou(off[t] & near, masks[t] & near) - 0.05, t


def test_thumbnail_is_the_same_for_channels_last_and_planar_input() -> None:
    # the CPU segmenter hands over channels-last tensors; eval and tests often planar ones
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    for h, w in [(256, 256), (250, 190), (144, 256)]:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h))
        planar = refiner.plan(x, refiner.initial_state(), index=0).thumb
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        nhwc = refiner.plan(x_nhwc, refiner.initial_state(), index=0).thumb
        assert planar is not None and nhwc is not None
        assert planar.shape == nhwc.shape and torch.allclose(planar, nhwc, atol=1e-6)


def test_gate_upsampled_for_a_box_equals_the_whole_picture_resized() -> None:
    """The gate is upsampled for the fused box only; it must equal that box of the whole
    picture's half-pixel resize, at picture borders and for scales that do not divide."""
    import cv2

    from models.temporal import _upsampled

    rng = np.random.default_rng(0)
    for _ in range(500):
        hs, ws = (int(v) for v in rng.integers(1, 17, 2))
        sy, sx = (int(v) for v in rng.integers(1, 6, 2))
        h, w = hs * sy + int(rng.integers(0, 2)), ws * sx
        small = rng.random((hs, ws), dtype=np.float32)
        y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        box = (slice(y0, int(rng.integers(y0 + 1, h + 1))), slice(x0, int(rng.integers(x0 + 1, w + 1))))
        whole = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[box]
        np.testing.assert_allclose(_upsampled(small, (h, w), box), whole, atol=1e-6)


def test_smooth_remembers_where_its_output_is_unsure() -> None:
    """After a CPU blend the state keeps a box holding every unsure pixel of its output; the
    next frame scans only that box of it and still blends exactly as the torch path."""
    from models.temporal import _SURE

    frames, _ = make_scene(5)
    seg = FakeSegmenter(logit_noise=0.0)
    refiner = TemporalRefiner(TemporalParams(mode="smooth"), mean=MEAN, std=STD)
    state = refiner.initial_state()
    boxes = 0
    for i, frame in enumerate(frames):
        plan, probs = planned(refiner, seg, frame, state, i)
        ref = None
        if plan.gate is not None and state.probs is not None:
            prev, residual = state.probs.double(), plan.residual.double()
            ref = refiner._blend(probs.double(), prev, residual, plan.gap).float()
        out, state = refiner.refine(plan, probs, state)
        if ref is not None:
            assert torch.allclose(out, ref, atol=1e-5)
        if state.unsure_box is not None:
            boxes += 1
            x0, y0, bw, bh = state.unsure_box
            fg = out[1].numpy()
            unsure = (fg >= _SURE) & (fg <= 1 - _SURE)
            unsure[y0 : y0 + bh, x0 : x0 + bw] = False
            assert not unsure.any()
            assert bw * bh < fg.size  # a real box, not the whole picture
    assert boxes == len(frames) - 1
