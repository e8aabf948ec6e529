"""ROI mode with a fake colour segmenter: geometry, pasting, discovery, recovery, resets."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import RoiConfig
from pipeline.roi import (
    Box,
    Region,
    RoiPlan,
    RoiTracker,
    compose,
    crop_images,
    region_boxes,
    square_box,
)

H, W = 120, 200


@dataclass(frozen=True)
class Spec:
    input_size: tuple[int, int] = (32, 32)
    binary: bool = True
    classes: tuple[str, ...] = ("background", "person")
    foreground_class: int = 1
    resize: str = "stretch"
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


class RedSegmenter:
    """'Person' = red pixels. ``blind`` call numbers return nothing (a missed detection)."""

    def __init__(self, spec: Spec = Spec(), blind: set[int] = frozenset()) -> None:
        self.spec = spec
        self.blind = set(blind)
        self.calls = 0
        self.inputs = 0

    def preprocess(self, images):
        h, w = self.spec.input_size
        red = [cv2.resize(im[..., 0], (w, h), interpolation=cv2.INTER_AREA) for im in images]
        return torch.from_numpy(np.stack(red)).float().div(255.0).unsqueeze(1).repeat(1, 3, 1, 1)

    def infer(self, x):
        self.calls += 1
        self.inputs += x.shape[0]
        p = (x[:, :1] > 0.5).float()
        if self.calls in self.blind:
            p = torch.zeros_like(p)
        return torch.cat([1 - p, p], dim=1)

    def postprocess(self, probs, sizes):
        out = []
        for p, (h, w) in zip(probs, sizes, strict=True):
            fg = cv2.resize(p[1].numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
            out.append(((fg > 0.5).astype(np.uint8), fg))
        return out


def scene(blobs, h=H, w=W):
    """Grey frame with red rectangles (x, y, bw, bh); returns (image, mask)."""
    img = np.full((h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), bool)
    for x, y, bw, bh in blobs:
        img[y:y + bh, x:x + bw] = (230, 30, 30)
        mask[y:y + bh, x:x + bw] = True
    return img, mask


def step(tracker, seg, img, index, **kw):
    plan, images = tracker.begin(img, index=index, **kw)
    probs = seg.infer(seg.preprocess(images)) if images else None
    return plan, tracker.finish(plan, probs)


def iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def region(x, y, bw, bh, vx=0.0, vy=0.0):
    return Region(Box(x, y, x + bw, y + bh), bw * bh, x + bw / 2, y + bh / 2, vx, vy)


# -- geometry -------------------------------------------------------------------------------


def test_box_rejects_empty():
    with pytest.raises(ValueError, match="empty box"):
        Box(5, 5, 5, 9)


def test_square_box_shifts_inside_the_frame_and_clamps_to_the_short_side():
    b = square_box(2, 3, 40, (H, W))
    assert (b.x0, b.y0, b.width, b.height) == (0, 0, 40, 40)
    b = square_box(W - 1, H - 1, 40, (H, W))
    assert (b.x1, b.y1, b.width, b.height) == (W, H, 40, 40)
    b = square_box(100, 60, 500, (H, W))  # longer than both sides: the whole frame
    assert (b.x0, b.y0, b.x1, b.y1) == (0, 0, W, H)
    b = square_box(30, 60, 150, (H, W))  # longer than the height only
    assert (b.height, b.width, b.x0) == (H, 150, 0)


def test_overlapping_regions_merge_and_distant_ones_do_not():
    cfg = RoiConfig(enabled=True, min_crop=0.0)
    near = region_boxes((region(20, 20, 20, 30), region(45, 25, 20, 30)), (H, W), cfg)
    assert len(near) == 1
    box, members = near[0]
    assert len(members) == 2 and box.x0 <= 20 and box.x1 >= 65 and box.width == box.height
    far = region_boxes((region(5, 5, 20, 20), region(160, 80, 20, 20)), (H, W), cfg)
    assert len(far) == 2


def test_a_region_too_wide_for_one_square_crop_gets_side_by_side_crops():
    # people touching side by side: one component 150 px wide, 60 px tall in a 120 x 200 frame
    cfg = RoiConfig(enabled=True, min_crop=0.0, full_area=0.95)
    wide = region(20, 30, 150, 60)
    boxes = region_boxes((wide,), (H, W), cfg)
    assert len(boxes) >= 2  # not one frame-wide rectangle, which would lose the crops' resolution
    for box, _ in boxes:
        assert box.width == box.height <= H  # square crops
    covered = np.zeros(W, bool)
    for box, _ in boxes:
        covered[box.x0 : box.x1] = True
    assert covered[20:170].all()  # together they hold the whole region
    # a region that fits one square crop is left whole
    assert len(region_boxes((region(20, 30, 60, 60),), (H, W), cfg)) == 1


def test_two_people_touching_a_little_wider_than_tall_get_square_crops_that_fit_the_frame():
    # One walking in front of the other: one component 324 x 262 (wider than tall, less than
    # 1.25 times) in an 854 x 480 frame. Padded by a quarter of its width on each side it needs
    # 486 px, more than the frame's height: one crop would be a 486 x 480 rectangle squeezing
    # both people into the model's square input (the one behind was lost in it). It is sliced
    # instead, and the slices' crops are square and hold the whole component.
    frame = (480, 854)
    cfg = RoiConfig(enabled=True)
    pair = region(500, 218, 324, 262)
    boxes = region_boxes((pair,), frame, cfg)
    for box, _ in boxes:
        assert box.width == box.height < frame[0]
    assert min(b.x0 for b, _ in boxes) <= 500 and max(b.x1 for b, _ in boxes) >= 824
    assert sum(len(m) for _, m in boxes) >= 2  # made for the slices, not for the whole region
    # one person of the same height, narrower than tall, is left whole
    (box, members), = region_boxes((region(500, 218, 250, 262),), frame, cfg)
    assert members == (region(500, 218, 250, 262),) and box.width == box.height


def test_cap_merges_the_closest_regions_and_keeps_everyone_covered():
    cfg = RoiConfig(enabled=True, min_crop=0.0, margin=0.0, max_regions=2)
    regs = (region(0, 0, 10, 10), region(14, 0, 10, 10), region(180, 100, 10, 10), region(100, 0, 10, 10))
    boxes = region_boxes(regs, (H, W), cfg)
    assert len(boxes) == 2
    for r in regs:
        assert any(b.x0 <= r.box.x0 and b.x1 >= r.box.x1 and b.y0 <= r.box.y0 and b.y1 >= r.box.y1
                   for b, _ in boxes), r


def test_margin_grows_with_motion_and_with_the_frame_gap():
    cfg = RoiConfig(enabled=True, min_crop=0.0)

    def side(r, gap):
        return region_boxes((r,), (H, W), cfg, gap)[0][0].width

    still = region(90, 50, 16, 16)
    moving = region(90, 50, 16, 16, vx=4.0)
    assert side(still, 1) == 24  # 16 + 2 * 0.25 * 16
    assert side(still, 3) > side(still, 1)
    assert side(moving, 1) > side(still, 1)
    assert side(moving, 3) > side(moving, 1)
    # the box is centred where the velocity predicts
    b = region_boxes((moving,), (H, W), cfg, 3)[0][0]
    assert b.center[0] == pytest.approx(98 + 12, abs=1)


# -- crop and paste -------------------------------------------------------------------------


def test_crop_and_paste_are_exact_at_frame_borders():
    rng = np.random.default_rng(0)
    values = torch.from_numpy(rng.random((H, W), dtype=np.float32))
    img = np.zeros((H, W, 3), np.uint8)
    corner, far = square_box(0, 0, 50, (H, W)), square_box(W, H, 50, (H, W))
    plan = RoiPlan(0, (H, W), False, (corner, far), "track")
    crops = crop_images(img, plan)
    assert [c.shape[:2] for c in crops] == [(50, 50), (50, 50)]
    pasted = [values[b.y0:b.y1, b.x0:b.x1][None] for b in plan.boxes]
    canvas = compose(plan, Spec(), None, pasted, feather=0.1)[0]
    # frame edges have no blend ramp: the values come back unchanged there and inside
    assert torch.equal(canvas[0, :45], values[0, :45])
    assert torch.equal(canvas[:45, 0], values[:45, 0])
    assert torch.equal(canvas[H - 1, W - 45:], values[H - 1, W - 45:])
    assert torch.equal(canvas[10:40, 10:40], values[10:40, 10:40])
    # nothing outside the crops without a full pass
    assert float(canvas[:, 60:140].abs().max()) == 0.0
    # toward an inner edge the crop fades into the background
    assert 0 < float(canvas[20, 49]) < float(values[20, 49])


def test_overlapping_crops_blend_and_a_full_pass_fills_the_rest():
    a, b = Box(0, 0, 60, 60), Box(40, 0, 100, 60)
    plan = RoiPlan(0, (H, W), True, (a, b), "periodic")
    ones = torch.ones((1, 60, 60))
    base = torch.full((1, H, W), 0.25)
    canvas = compose(plan, Spec(), base, [ones, ones * 0.0], feather=0.2)[0]
    assert float(canvas[30, 10]) == 1.0 and float(canvas[30, 80]) == 0.0
    mid = canvas[30, 45:55]
    assert torch.all((mid > 0) & (mid < 1))
    assert torch.all(mid[1:] <= mid[:-1])  # a smooth hand-over, no seam
    assert float(canvas[100, 150]) == 0.25
    assert torch.equal(base, torch.full((1, H, W), 0.25))  # the full pass's map is not written to


def test_multiclass_background_outside_crops():
    spec = Spec(binary=False, classes=("bg", "a", "person"), foreground_class=2)
    plan = RoiPlan(0, (H, W), False, (Box(0, 0, 40, 40),), "track")
    p = torch.zeros((3, 40, 40))
    p[2] = 1.0
    canvas = compose(plan, spec, None, [p], feather=0.1)
    assert canvas.shape == (3, H, W)
    labels = canvas.argmax(0)
    assert int(labels[5, 5]) == 2 and int(labels[100, 150]) == 0


# -- the per-stream loop --------------------------------------------------------------------


def test_crops_beat_the_model_resolution_and_cost_one_input_per_region():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100), seg.spec)
    img, mask = scene([(150, 80, 7, 13)])  # small: at 32x32 the full frame blurs it away
    plan, out = step(tr, seg, img, 0)
    assert plan.full and plan.reason == "first"
    for i in range(1, 5):
        plan, out = step(tr, seg, img, i)
        assert not plan.full and len(plan.boxes) == 1 and plan.inputs == 1
        assert out.info == {"crops": 1, "full": False, "reason": "track", "inputs": 1}
    assert np.array_equal(out.labels == 1, mask)


def test_a_second_object_is_discovered_within_full_every_frames():
    seg = RedSegmenter()
    k = 4
    tr = RoiTracker(RoiConfig(enabled=True, full_every=k), seg.spec)
    a = (20, 30, 30, 40)
    b = (140, 50, 30, 40)
    seen = None
    for i in range(12):
        img, _ = scene([a] if i < 3 else [a, b])
        plan, out = step(tr, seg, img, i)
        found_b = (out.labels[50:90, 140:170] == 1).mean() > 0.9
        if i >= 3 and found_b and seen is None:
            seen = i
        assert (out.labels[30:70, 20:50] == 1).mean() > 0.9  # a never loses its mask
    assert seen is not None and seen - 3 <= k
    assert len(tr.state.regions) == 2
    assert plan.inputs == 2 and not plan.full  # both tracked by crops afterwards


def test_recovery_after_a_missed_frame():
    seg = RedSegmenter(blind={3})  # the model misses the object on its third call
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100), seg.spec)
    plans, outs = [], []
    for i in range(6):
        img, _ = scene([(60 + 3 * i, 40, 24, 36)])
        p, o = step(tr, seg, img, i)
        plans.append(p)
        outs.append(o)
    assert outs[2].info.get("problem") == "collapse"
    assert plans[3].full and plans[3].reason == "collapse"
    assert not (outs[2].labels == 1).any()  # the miss itself
    _, mask = scene([(75, 40, 24, 36)])
    assert iou(outs[5].labels == 1, mask) > 0.85 and not plans[5].full  # tracked by a crop again


def test_an_index_gap_widens_the_crop_and_keeps_a_fast_object():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100), seg.spec)
    for i in (0, 1, 2):
        step(tr, seg, scene([(20 + 8 * i, 40, 16, 30)])[0], i)
    img, mask = scene([(20 + 8 * 6, 40, 16, 30)])  # frames 3-5 dropped upstream
    plan, out = step(tr, seg, img, 6)
    assert plan.gap == 4 and not plan.full
    box = plan.boxes[0]
    assert box.x0 <= 68 and box.x1 >= 84  # the object is inside the widened, shifted crop
    assert iou(out.labels == 1, mask) > 0.75


def test_touching_the_crop_border_asks_for_a_full_pass():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100, min_crop=0.0), seg.spec)
    step(tr, seg, scene([(90, 50, 10, 10)])[0], 0)
    grown = scene([(90, 50, 10, 10), (92, 0, 4, 50)])[0]  # a bar grows out of the top
    _, out = step(tr, seg, grown, 1)
    assert out.info.get("problem") == "border"
    plan, _ = step(tr, seg, grown, 2)
    assert plan.full and plan.reason == "border"


def test_discontinuity_scene_cut_and_long_gap_reset_to_a_full_frame():
    seg = RedSegmenter()
    cfg = RoiConfig(enabled=True, full_every=100, max_gap_reset=10)
    tr = RoiTracker(cfg, seg.spec)
    img, _ = scene([(60, 40, 24, 36)])
    step(tr, seg, img, 0)
    step(tr, seg, img, 1)
    plan, _ = step(tr, seg, img, 2, discontinuity=True)
    assert plan.full and plan.reset and plan.reason == "discontinuity" and plan.boxes == ()
    assert tr.state.resets == 1
    plan, _ = step(tr, seg, img, 20)
    assert plan.reason == "gap" and plan.full
    other = np.full_like(img, 250)
    plan, _ = step(tr, seg, other, 21)
    assert plan.reason == "scene_cut" and plan.full
    assert tr.state.resets == 3


def test_nothing_tracked_runs_nothing_until_the_next_full_pass():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True, full_every=3), seg.spec)
    img = np.full((H, W, 3), 90, np.uint8)
    reasons = [step(tr, seg, img, i)[0].reason for i in range(7)]
    assert reasons == ["first", "idle", "idle", "periodic", "idle", "idle", "periodic"]
    assert seg.inputs == 3


def test_large_regions_fall_back_to_one_full_pass():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100), seg.spec)
    img, _ = scene([(10, 5, 170, 110)])
    step(tr, seg, img, 0)
    plan, out = step(tr, seg, img, 1)
    assert plan.full and plan.boxes == () and plan.reason == "large"


def test_finish_checks_the_number_of_maps():
    seg = RedSegmenter()
    tr = RoiTracker(RoiConfig(enabled=True), seg.spec)
    plan, images = tr.begin(scene([])[0], index=0)
    with pytest.raises(ValueError, match="1 model inputs, got 0"):
        tr.finish(plan, None)



# -- compute budget, held patches, stable boxes ----------------------------------------------


def test_budget_caps_mean_inputs_and_crops_take_turns_without_losing_anyone():
    seg = RedSegmenter()
    cfg = RoiConfig(enabled=True, full_every=100, budget=1.5)
    tr = RoiTracker(cfg, seg.spec)
    blobs = [(10, 10, 12, 20), (90, 60, 12, 20), (170, 20, 12, 20)]  # three people, far apart
    img, mask = scene(blobs)
    inputs, held = [], []
    for i in range(20):
        plan, out = step(tr, seg, img, i)
        inputs.append(plan.inputs)
        held.append(len(plan.held))
        if i >= 1:
            assert iou(out.labels == 1, mask) > 0.9, i  # everyone keeps a mask every frame
    assert sum(inputs) / len(inputs) <= 1.5
    assert tr.state.inputs_per_frame <= 1.5
    assert max(held) >= 1  # some frames paste an earlier crop instead of running it
    # frame 1 crops all three new regions (nothing to paste for them yet), spending ahead; frame 2
    # pays that back with patches only; afterwards someone is refreshed every frame
    assert inputs[:3] == [1, 3, 0] and min(inputs[3:]) >= 1
    # unlimited: one input per region every frame
    tr = RoiTracker(RoiConfig(enabled=True, full_every=100, budget=0), seg.spec)
    plans = [step(tr, seg, img, i)[0] for i in range(4)]
    assert [p.inputs for p in plans[2:]] == [3, 3] and not plans[3].held


def test_a_held_patch_moves_with_its_region():
    seg = RedSegmenter()
    # two objects, budget for one crop per frame: each is refreshed every other frame
    cfg = RoiConfig(enabled=True, full_every=100, budget=1.0, hold=0.0, min_crop=0.0)
    tr = RoiTracker(cfg, seg.spec)
    for i in range(12):
        img, mask = scene([(20 + 4 * i, 40, 16, 24), (150, 70, 16, 24)])
        plan, out = step(tr, seg, img, i)
        if i >= 4:
            assert plan.inputs == 1 and len(plan.held) == 1
            assert iou(out.labels == 1, mask) > 0.8, i  # the held one is pasted where it moved
    assert tr.state.inputs_per_frame <= 1.1


def test_patch_lands_shifted_and_cut_at_the_frame_edge():
    from pipeline.roi import Patch

    probs = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    p = Patch(Box(0, 0, 10, 10), probs, index=3, vx=2.0, vy=1.0)
    box, cut = p.at(5, (H, W))
    assert (box.x0, box.y0, box.x1, box.y1) == (4, 2, 14, 12) and torch.equal(cut, probs)
    left = Patch(Box(2, 0, 12, 10), probs, index=0, vx=-5.0).at(1, (H, W))
    assert left is not None
    box, cut = left
    assert (box.x0, box.x1) == (0, 7) and torch.equal(cut, probs[:, :, 3:])
    assert Patch(Box(0, 0, 10, 10), probs, index=0, vx=-20.0).at(1, (H, W)) is None


def test_the_crop_box_holds_still_while_the_region_fits():
    cfg = RoiConfig(enabled=True, min_crop=0.0, margin=0.5, motion_margin=0.0)
    first = region_boxes((region(80, 40, 20, 30),), (H, W), cfg)[0][0]
    moved = region_boxes((region(82, 41, 20, 31),), (H, W), cfg, held=(first,))[0][0]
    assert moved == first  # a small move keeps the same crop (same pixels, no jitter)
    fresh = region_boxes((region(82, 41, 20, 31),), (H, W), cfg)[0][0]
    assert fresh != first
    far = region_boxes((region(95, 41, 20, 30),), (H, W), cfg, held=(first,))[0][0]
    assert far != first and far.x1 >= 95 + 20 + 5  # out of the held box's inner margin: re-centred
    grown = region_boxes((region(80, 40, 20, 45),), (H, W), cfg, held=(first,))[0][0]
    assert grown != first  # much larger than the held box: a new one


def test_no_merge_into_a_frame_sized_crop():
    cfg = RoiConfig(enabled=True, min_crop=0.0, margin=0.25, merge_overlap=0.1, full_area=0.7)
    big = (region(5, 10, 95, 100), region(95, 10, 100, 100))  # merged, they would span the frame
    boxes = region_boxes(big, (H, W), cfg)
    assert len(boxes) == 2
    small = (region(20, 20, 20, 30), region(45, 25, 20, 30))
    assert len(region_boxes(small, (H, W), cfg)) == 1


# -- what the tracker's bookkeeping may skip, and must still find ------------------------------


def _plain_components(mask, min_pixels):
    """Reference: every component of the whole mask, labelled the straightforward way."""
    n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8, cv2.CV_32S)
    return sorted(
        (int(stats[i][0]), int(stats[i][1]), int(stats[i][0] + stats[i][2]), int(stats[i][1] + stats[i][3]),
         int(stats[i][4]), round(float(cents[i][0]), 6), round(float(cents[i][1]), 6))
        for i in range(1, n) if stats[i][4] >= max(1.0, min_pixels)
    )


def _as_tuples(regions):
    return sorted(
        (r.box.x0, r.box.y0, r.box.x1, r.box.y1, r.area, round(r.cx, 6), round(r.cy, 6)) for r in regions
    )


def test_components_inside_a_box_are_in_frame_coordinates_and_match_the_whole_mask():
    from pipeline.roi import components

    rng = np.random.default_rng(1)
    mask = np.zeros((H, W), bool)
    mask[10:50, 30:60] = True
    mask[70:110, 120:190] = True
    mask[72:80, 125:130] = False  # a hole
    mask |= rng.random((H, W)) > 0.995  # specks
    want = _plain_components(mask, 20)
    assert len(want) == 2
    assert _as_tuples(components(mask, 20)) == want
    assert _as_tuples(components(mask, 20, Box(0, 0, W, H))) == want
    # A box around both blobs; then each blob's own box: the same regions, frame coordinates.
    assert _as_tuples(components(mask & ~(rng.random((H, W)) > 2), 20, Box(25, 5, 195, 115))) == want
    parts = components(mask, 20, Box(25, 5, 65, 55)) + components(mask, 20, Box(115, 65, 195, 115))
    assert _as_tuples(parts) == want
    assert components(np.zeros((H, W), bool), 1, Box(10, 10, 50, 50)) == []


def test_tracked_regions_are_those_of_the_whole_output_mask():
    """Between full passes only the crops' boxes are searched for people: the regions the
    tracker keeps must be exactly the output mask's own components, crops apart or touching."""
    from pipeline.roi import components

    seg = RedSegmenter()
    cfg = RoiConfig(enabled=True, full_every=50, min_crop=0.0, budget=0)
    # apart; close (overlapping crops); one wide region cut into side-by-side crops that overlap
    for blobs in ([(20, 30, 20, 30), (150, 40, 20, 30)], [(40, 30, 20, 30), (66, 40, 20, 30)],
                  [(20, 50, 150, 40)]):
        tracker = RoiTracker(cfg, Spec())
        for i in range(6):
            moved = [(x + 2 * i, y, bw, bh) for x, y, bw, bh in blobs]
            img, _ = scene(moved)
            plan, out = step(tracker, seg, img, i)
            mask = out.labels != 0
            got = [(r.box, r.area) for r in tracker.state.regions]
            assert got, "the tracked people were lost"
            if plan.full:
                continue  # a full pass also seeds from fainter foreground than the output shows
            assert sorted(got, key=str) == sorted(
                [(r.box, r.area) for r in components(mask, cfg.min_area * H * W)], key=str
            )
        assert not plan.full  # the last frames ran crops only


def test_cpu_pasting_matches_torch_resizing():
    """On a CPU the crops' probabilities are resized with OpenCV: the same as torch's bilinear."""
    import torch.nn.functional as F

    from pipeline.roi import fit_probs

    probs = torch.rand(2, 32, 32)
    for size in ((17, 17), (45, 45), (120, 71)):
        got = fit_probs(probs, size, Spec())
        want = F.interpolate(probs[None, 1:2], size=size, mode="bilinear", align_corners=False)[0]
        assert got.shape == (1, *size)
        assert torch.allclose(got, want, atol=1e-4)


def test_blend_windows_are_shared_and_never_written():
    from pipeline.roi import crop_window

    box = Box(40, 20, 100, 80)
    first = crop_window(box, (H, W), 0.1).clone()
    plan = RoiPlan(0, (H, W), False, (box,), "track", ((region(50, 30, 20, 30),),))
    for _ in range(2):
        compose(plan, Spec(), None, [torch.full((1, 60, 60), 0.8)], 0.1)
    assert torch.equal(crop_window(box, (H, W), 0.1), first)
    assert crop_window(box, (H, W), 0.1) is crop_window(Box(40, 20, 100, 80), (H, W), 0.1)
