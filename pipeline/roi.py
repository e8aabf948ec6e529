"""Person-focused regions of interest: spend the model's input resolution where people are.

A small model sees a whole 854x480 frame at 256x256, so a full-body person is ~100 px tall
in its input and comes out blobby. ROI mode segments square crops around the people found
in the previous frame's mask instead, at the model's full input size, and pastes them back.

Per stream, one :class:`RoiTracker` runs the loop (the engine and ``segstream eval`` share it)::

    plan, images = tracker.begin(image, index=i, discontinuity=d)  # full frame and/or crops
    probs = segmenter.infer(segmenter.preprocess(images))          # the engine batches these
    out = tracker.finish(plan, probs)                              # labels + fg at source size

Planning (:func:`plan_rois`): the previous mask's connected components (at least ``min_area``
of the frame) become square boxes with a margin that grows with each region's speed and with
the index gap since the last update, centred where the region's velocity predicts; boxes that
overlap are merged and at most ``max_regions`` are kept (the closest pair merges first, so
nobody is dropped). A full-frame pass runs on the first frame, after a discontinuity, a scene
cut or a long gap (these also reset the state), every ``full_every`` frames, and on the frame
after a crop's mask collapsed, jumped or touched an inner crop border. A full pass runs together
with the crops of the known regions: the crops keep their resolution, the full frame finds
whoever is new. Without a full pass nothing outside the crops is foreground.

Pasting (:func:`compose`): each crop's probabilities are resized to its box and blended with a
window that ramps down toward the box's inner edges (not at frame edges, so pasting is exact
there); where the window is below 1 the base shows through (the full pass, or background).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.segmenter import letterbox_box
from pipeline.config import RoiConfig

_THUMB = (32, 18)  # (w, h) grey thumbnail for the scene-cut test


@dataclass(frozen=True, slots=True)
class Box:
    """A pixel rectangle ``[x0, x1) x [y0, y1)`` in source coordinates."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"empty box {(self.x0, self.y0, self.x1, self.y1)!r}")

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0

    def overlaps(self, other: Box) -> bool:
        return self.x0 < other.x1 and other.x0 < self.x1 and self.y0 < other.y1 and other.y0 < self.y1

    def intersection_area(self, other: Box) -> int:
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0, w) * max(0, h)

    def union(self, other: Box) -> Box:
        return Box(
            min(self.x0, other.x0), min(self.y0, other.y0), max(self.x1, other.x1), max(self.y1, other.y1)
        )


def square_box(cx: float, cy: float, side: float, frame: tuple[int, int]) -> Box:
    """A ``side`` square centred on (cx, cy), shifted (not cut) to lie inside the frame.

    A side longer than the frame's height or width is clamped to it on that axis only, so a
    region larger than the short side gives a rectangle that spans the frame on that axis.
    """
    h, w = frame
    s = max(1, int(math.ceil(side)))
    sw, sh = min(s, w), min(s, h)
    x0 = min(max(0, int(round(cx - sw / 2.0))), w - sw)
    y0 = min(max(0, int(round(cy - sh / 2.0))), h - sh)
    return Box(x0, y0, x0 + sw, y0 + sh)


@dataclass(frozen=True, slots=True)
class Region:
    """One tracked connected component: tight box, pixel area, centroid, velocity (px/frame)."""

    box: Box
    area: int
    cx: float
    cy: float
    vx: float = 0.0
    vy: float = 0.0
    # Seen through a crop last frame. A region only the full frame saw has a coarse mask, so its
    # first crop may legitimately move or shrink it: no jump/collapse test against it.
    cropped: bool = False


@dataclass(frozen=True, slots=True)
class RoiState:
    """What one stream remembers between frames; ``plan_rois``/``update_state`` return new ones."""

    regions: tuple[Region, ...] = ()
    last_index: int | None = None
    last_full_index: int | None = None
    pending: str | None = None  # why the next frame must have a full pass
    thumb: np.ndarray | None = None
    frames: int = 0
    full_passes: int = 0
    crops: int = 0
    resets: int = 0

    @property
    def inputs_per_frame(self) -> float:
        """Model inputs per frame: the compute relative to full-frame mode (which is 1.0)."""
        return (self.full_passes + self.crops) / self.frames if self.frames else 0.0


@dataclass(frozen=True, slots=True)
class RoiPlan:
    """The decision for one frame, made before the model runs."""

    index: int
    size: tuple[int, int]  # (H, W) of the frame
    full: bool
    boxes: tuple[Box, ...]
    reason: str  # first|discontinuity|scene_cut|gap|periodic|collapse|jump|border|large|track|idle
    members: tuple[tuple[Region, ...], ...] = ()  # the regions each box was made for
    gap: int = 1
    reset: bool = False
    thumb: np.ndarray | None = None

    @property
    def inputs(self) -> int:
        return int(self.full) + len(self.boxes)


def _thumb(image: np.ndarray) -> np.ndarray:
    grey = image.mean(axis=2, dtype=np.float32) if image.ndim == 3 else image.astype(np.float32)
    return cv2.resize(grey, _THUMB, interpolation=cv2.INTER_AREA) / 255.0


def _change(a: np.ndarray | None, b: np.ndarray) -> float:
    return 1.0 if a is None or a.shape != b.shape else float(np.abs(a - b).mean())


def _side(r: Region, cfg: RoiConfig, gap: int, short: int) -> float:
    extent = max(r.box.width, r.box.height)
    speed = math.hypot(r.vx, r.vy)
    pad = cfg.margin * extent + cfg.motion_margin * speed * gap + cfg.gap_margin * extent * (gap - 1)
    return max(extent + 2.0 * pad, cfg.min_crop * short)


def _merged(a: tuple[Box, tuple[Region, ...]], b: tuple[Box, tuple[Region, ...]], frame: tuple[int, int]):
    u = a[0].union(b[0])
    return square_box(*u.center, max(u.width, u.height), frame), a[1] + b[1]


def region_boxes(
    regions: tuple[Region, ...], frame: tuple[int, int], cfg: RoiConfig, gap: int = 1
) -> list[tuple[Box, tuple[Region, ...]]]:
    """Square crop boxes for ``regions`` ``gap`` frames later: margin, prediction, merge, cap."""
    short = min(frame)
    boxes: list[tuple[Box, tuple[Region, ...]]] = []
    for r in regions:
        cx, cy = r.box.center
        boxes.append((square_box(cx + r.vx * gap, cy + r.vy * gap, _side(r, cfg, gap, short), frame), (r,)))
    merged = True
    while merged:  # merging can make a box overlap a third one, so repeat until stable
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                # Boxes that mostly overlap become one crop; a slight overlap stays two crops
                # (blended where they meet) so two people side by side keep their resolution.
                a, b = boxes[i][0], boxes[j][0]
                if a.intersection_area(b) > cfg.merge_overlap * min(a.area, b.area):
                    boxes[i] = _merged(boxes[i], boxes[j], frame)
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    while len(boxes) > cfg.max_regions:  # over the cap: merge the pair that makes the smallest box
        pairs = [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))]
        i, j = min(pairs, key=lambda p: _merged(boxes[p[0]], boxes[p[1]], frame)[0].area)
        boxes[i] = _merged(boxes[i], boxes[j], frame)
        del boxes[j]
    return boxes


def plan_rois(
    image: np.ndarray, state: RoiState, cfg: RoiConfig, *, index: int, discontinuity: bool = False
) -> RoiPlan:
    """Decide the full pass and the crops for frame ``index`` of a stream."""
    h, w = image.shape[:2]
    thumb = _thumb(image)
    reset = None
    if state.last_index is None:
        reset = "first"
    elif discontinuity:
        reset = "discontinuity"
    elif index <= state.last_index or index - state.last_index > cfg.max_gap_reset:
        reset = "gap"
    elif _change(state.thumb, thumb) > cfg.scene_cut:
        reset = "scene_cut"
    if reset is not None:
        return RoiPlan(index, (h, w), True, (), reset, reset=True, thumb=thumb)
    assert state.last_index is not None
    gap = index - state.last_index
    made = region_boxes(state.regions, (h, w), cfg, gap)
    boxes = tuple(b for b, _ in made)
    members = tuple(m for _, m in made)
    due = state.last_full_index is None or index - state.last_full_index >= cfg.full_every
    full_reason = state.pending or ("periodic" if due else None)
    large = [k for k, b in enumerate(boxes) if b.area >= cfg.full_area * h * w]
    if large:
        # A crop that covers most of the frame sees it at about the full pass's scale: run the
        # full pass instead of it (the other crops stay; the full pass covers its regions).
        keep = [k for k in range(len(boxes)) if k not in large]
        boxes = tuple(boxes[k] for k in keep)
        members = tuple(members[k] for k in keep)
        full_reason = full_reason or "large"
    if full_reason is not None:
        return RoiPlan(index, (h, w), True, boxes, full_reason, members, gap, thumb=thumb)
    return RoiPlan(index, (h, w), False, boxes, "track" if boxes else "idle", members, gap, thumb=thumb)


def crop_images(image: np.ndarray, plan: RoiPlan) -> list[np.ndarray]:
    """The model inputs for ``plan``: the full frame first when it has a full pass, then the crops."""
    out = [image] if plan.full else []
    out += [np.ascontiguousarray(image[b.y0:b.y1, b.x0:b.x1]) for b in plan.boxes]
    return out


# -- pasting back -----------------------------------------------------------------------------


def fit_probs(probs: torch.Tensor, size: tuple[int, int], spec: Any) -> torch.Tensor:
    """Model-resolution probabilities (C x h x w) to ``size``: the fg channel only for binary models."""
    p = probs.unsqueeze(0).float()
    if getattr(spec, "resize", "stretch") == "letterbox":
        top, left, bh, bw = letterbox_box(size, tuple(spec.input_size))
        p = p[:, :, top:top + bh, left:left + bw]
    if spec.binary:
        p = p[:, 1:2]
    if tuple(p.shape[-2:]) != tuple(size):
        p = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
    return p[0]


def crop_window(box: Box, frame: tuple[int, int], feather: float, device: Any = "cpu") -> torch.Tensor:
    """1 x h x w blend weights: 1 inside, ramping toward inner edges; no ramp on frame edges."""
    h, w = frame

    def ramp(n: int, lo_inner: bool, hi_inner: bool) -> torch.Tensor:
        f = max(1.0, feather * n)
        pos = torch.arange(n, dtype=torch.float32, device=device) + 0.5
        r = torch.ones(n, dtype=torch.float32, device=device)
        if lo_inner:
            r = torch.minimum(r, pos / f)
        if hi_inner:
            r = torch.minimum(r, (n - pos) / f)
        return r

    wy = ramp(box.height, box.y0 > 0, box.y1 < h)
    wx = ramp(box.width, box.x0 > 0, box.x1 < w)
    return (wy[:, None] * wx[None, :]).unsqueeze(0)


def compose(
    plan: RoiPlan, spec: Any, full: torch.Tensor | None, crops: list[torch.Tensor], feather: float
) -> torch.Tensor:
    """Paste crop probabilities (already fitted to their boxes) over the base: C' x H x W."""
    h, w = plan.size
    if full is not None:
        base = full
    else:
        ref = crops[0] if crops else None
        channels = 1 if spec.binary else len(spec.classes)
        base = torch.zeros((channels, h, w), dtype=torch.float32, device=None if ref is None else ref.device)
        if not spec.binary:
            base[0] = 1.0  # background is class 0
    if not crops:
        return base
    acc = torch.zeros_like(base)
    wsum = torch.zeros((1, h, w), dtype=base.dtype, device=base.device)
    alpha = torch.zeros_like(wsum)
    for box, p in zip(plan.boxes, crops, strict=True):
        win = crop_window(box, (h, w), feather, base.device)
        sl = (slice(None), slice(box.y0, box.y1), slice(box.x0, box.x1))
        acc[sl] += win * p
        wsum[sl] += win
        alpha[sl] = torch.maximum(alpha[sl], win)
    blended = acc / wsum.clamp_min(1e-6)
    return base * (1.0 - alpha) + blended * alpha


# -- state update -----------------------------------------------------------------------------


def components(mask: np.ndarray, min_pixels: float) -> list[Region]:
    """Connected components (8-connected) of a boolean mask with at least ``min_pixels`` pixels."""
    n, _, stats, cents = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area >= max(1.0, min_pixels):
            out.append(Region(Box(x, y, x + bw, y + bh), area, float(cents[i][0]), float(cents[i][1])))
    return out


def _health(
    plan: RoiPlan, k: int, fg: np.ndarray, cfg: RoiConfig
) -> tuple[str | None, tuple[float, float] | None]:
    """Check crop ``k``'s own mask against the regions it was made for: (problem, velocity)."""
    box, members = plan.boxes[k], plan.members[k]
    h, w = plan.size
    ys, xs = np.nonzero(fg)
    prev_area = sum(r.area for r in members)
    checked = all(r.cropped for r in members)
    if ys.size == 0 or ys.size < cfg.collapse * prev_area:
        # An unconfirmed seed that comes out empty is a false alarm: it just drops out.
        return ("collapse" if checked else None), None
    pcx = sum(r.cx * r.area for r in members) / prev_area
    pcy = sum(r.cy * r.area for r in members) / prev_area
    cx, cy = box.x0 + float(xs.mean()), box.y0 + float(ys.mean())
    v = ((cx - pcx) / plan.gap, (cy - pcy) / plan.gap)
    mvx = sum(r.vx * r.area for r in members) / prev_area
    mvy = sum(r.vy * r.area for r in members) / prev_area
    extent = max(max(r.box.width, r.box.height) for r in members)
    if checked and math.hypot(cx - pcx - mvx * plan.gap, cy - pcy - mvy * plan.gap) > cfg.jump * extent:
        return "jump", v
    edges = []
    if box.y0 > 0:
        edges.append(fg[0, :])
    if box.y1 < h:
        edges.append(fg[-1, :])
    if box.x0 > 0:
        edges.append(fg[:, 0])
    if box.x1 < w:
        edges.append(fg[:, -1])
    if any(e.mean() > cfg.border_touch for e in edges):
        return "border", v
    return None, v


def update_state(
    state: RoiState, plan: RoiPlan, mask: np.ndarray, crop_fg: list[np.ndarray], cfg: RoiConfig
) -> tuple[RoiState, str | None]:
    """The state after ``plan``'s frame produced ``mask`` (bool H x W); also the problem found."""
    h, w = plan.size
    if plan.reset:
        state = RoiState(frames=state.frames, full_passes=state.full_passes, crops=state.crops,
                         resets=state.resets + (plan.reason != "first"))
    problem = None
    velocity: list[tuple[Box, tuple[float, float]]] = []
    for k, fg in enumerate(crop_fg):
        issue, v = _health(plan, k, fg, cfg)
        problem = problem or issue
        if v is not None:
            old = plan.members[k]
            a = sum(r.area for r in old)
            ovx, ovy = sum(r.vx * r.area for r in old) / a, sum(r.vy * r.area for r in old) / a
            velocity.append((plan.boxes[k], (0.5 * (ovx + v[0]), 0.5 * (ovy + v[1]))))
    regions = []
    for r in sorted(components(mask, cfg.min_area * h * w), key=lambda r: -r.area):
        cx, cy = r.box.center
        for box, (vx, vy) in velocity:  # a component inherits the motion of the crop it sits in
            if box.x0 <= cx < box.x1 and box.y0 <= cy < box.y1:
                r = replace(r, vx=vx, vy=vy, cropped=True)
                break
        regions.append(r)
    return replace(
        state,
        regions=tuple(regions),
        last_index=plan.index,
        last_full_index=plan.index if plan.full else state.last_full_index,
        pending=None if plan.full else problem,
        thumb=plan.thumb,
        frames=state.frames + 1,
        full_passes=state.full_passes + int(plan.full),
        crops=state.crops + len(plan.boxes),
    ), problem


@dataclass(frozen=True, slots=True)
class RoiOutput:
    labels: np.ndarray  # uint8 H x W class indices
    fg: np.ndarray | None  # float32 H x W foreground probability (binary models)
    info: dict[str, Any]


class RoiTracker:
    """One stream's ROI loop around any segmenter with ``spec`` (input_size, binary, classes...)."""

    def __init__(self, cfg: RoiConfig, spec: Any) -> None:
        self.cfg = cfg
        self.spec = spec
        self.state = RoiState()
        fg = getattr(spec, "foreground_class", None)
        self.fg_class = 1 if fg is None else int(fg)

    def begin(
        self, image: np.ndarray, *, index: int, discontinuity: bool = False
    ) -> tuple[RoiPlan, list[np.ndarray]]:
        plan = plan_rois(image, self.state, self.cfg, index=index, discontinuity=discontinuity)
        return plan, crop_images(image, plan)

    def finish(self, plan: RoiPlan, probs: torch.Tensor | None) -> RoiOutput:
        """``probs``: ``plan.inputs`` x C x h x w model probabilities, in ``crop_images`` order."""
        n = 0 if probs is None else int(probs.shape[0])
        if n != plan.inputs:
            raise ValueError(f"plan has {plan.inputs} model inputs, got {n} probability maps")
        with torch.inference_mode():
            rows = list(probs) if probs is not None else []
            full = fit_probs(rows[0], plan.size, self.spec) if plan.full else None
            crop_rows = rows[int(plan.full):]
            pairs = zip(crop_rows, plan.boxes, strict=True)
            crops = [fit_probs(p, (b.height, b.width), self.spec) for p, b in pairs]
            canvas = compose(plan, self.spec, full, crops, self.cfg.feather)
            if self.spec.binary:
                fg_t = canvas[0]
                labels = (fg_t > 0.5).to(torch.uint8).cpu().numpy() * np.uint8(self.fg_class)
                fg_np = fg_t.cpu().numpy()
                fg: np.ndarray | None = fg_np
                crop_fg = [(c[0] > 0.5).cpu().numpy() for c in crops]
                # A person small in the full frame often scores below 0.5 there: outside the crops
                # a lower seed threshold still starts a crop on them (inside, 0.5 keeps boxes tight).
                seeds = labels == self.fg_class
                if plan.full:
                    low = np.asarray(fg_np > min(0.5, self.cfg.seed_threshold))
                    for box in plan.boxes:
                        low[box.y0:box.y1, box.x0:box.x1] = False
                    seeds |= low
            else:
                labels = canvas.argmax(dim=0).to(torch.uint8).cpu().numpy()
                fg = None
                crop_fg = [(c.argmax(dim=0) == self.fg_class).cpu().numpy() for c in crops]
                seeds = labels == self.fg_class
        self.state, problem = update_state(self.state, plan, seeds, crop_fg, self.cfg)
        info = {"crops": len(plan.boxes), "full": plan.full, "reason": plan.reason, "inputs": plan.inputs}
        if problem is not None:
            info["problem"] = problem
        return RoiOutput(labels, fg, info)
