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

Compute budget (``budget``, mean model inputs per frame): every frame earns ``budget`` inputs of
credit, a full pass and each crop spend one. Over it, crops take turns (oldest result first);
a crop that waits has its last result (a :class:`Patch`) pasted where its motion puts it. A
region nobody has cropped yet always runs. Last frame's box is kept while the region still fits
in it (``hold``), so a crop does not jitter by a pixel per frame.

Pasting (:func:`compose`): each crop's probabilities are resized to its box and blended with a
window that ramps down toward the box's inner edges (not at frame edges, so pasting is exact
there); where the window is below 1 the base shows through (the full pass, or background).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
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


@dataclass(frozen=True, slots=True, eq=False)
class Patch:
    """A crop's result kept for later frames: probabilities at ``box``'s size, made at frame
    ``index``, pasted ``(vx, vy)`` px per frame further on in frames that do not re-run the crop."""

    box: Box
    probs: torch.Tensor  # C' x box.height x box.width
    index: int
    vx: float = 0.0
    vy: float = 0.0

    def at(self, index: int, frame: tuple[int, int]) -> tuple[Box, torch.Tensor] | None:
        """Where the patch lands in frame ``index`` (cut at the frame edges), or None if outside."""
        h, w = frame
        dx = int(round(self.vx * (index - self.index)))
        dy = int(round(self.vy * (index - self.index)))
        b = self.box
        x0, y0, x1, y1 = max(0, b.x0 + dx), max(0, b.y0 + dy), min(w, b.x1 + dx), min(h, b.y1 + dy)
        if x1 <= x0 or y1 <= y0:
            return None
        probs = self.probs[:, y0 - b.y0 - dy:y1 - b.y0 - dy, x0 - b.x0 - dx:x1 - b.x0 - dx]
        return Box(x0, y0, x1, y1), probs


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
    # The crop result this region's mask came from; a region with one may skip its crop in a
    # frame over the compute budget (the patch is pasted where the motion puts it instead).
    patch: Patch | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RoiState:
    """What one stream remembers between frames; ``plan_rois``/``update_state`` return new ones."""

    regions: tuple[Region, ...] = ()
    last_index: int | None = None
    last_full_index: int | None = None
    pending: str | None = None  # why the next frame must have a full pass
    thumb: np.ndarray | None = None
    last_boxes: tuple[Box, ...] = ()  # last frame's crop boxes, kept while their regions still fit
    credit: float = 0.0  # model inputs the budget still allows (spent ahead when negative)
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
    # Crops over the budget this frame: their boxes, and the patches pasted for them instead.
    deferred: tuple[Box, ...] = ()
    held: tuple[Patch, ...] = ()
    credit: float = 0.0  # the budget's credit after this frame

    @property
    def inputs(self) -> int:
        return int(self.full) + len(self.boxes)


def _thumb(image: np.ndarray) -> np.ndarray:
    # Every 4th pixel of every 4th row still puts dozens of samples in each cell of the tiny
    # thumbnail, at a sixteenth of the reading; then shrink, then average the channels (both
    # averages, so the order does not matter; numpy's mean over 3 values is slow on a frame).
    sparse = image[::4, ::4] if min(image.shape[:2]) >= 4 * _THUMB[1] else image
    small = cv2.resize(np.ascontiguousarray(sparse), _THUMB, interpolation=cv2.INTER_AREA).astype(np.float32)
    grey = small.mean(axis=2) if small.ndim == 3 else small
    return grey / 255.0


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
    regions: tuple[Region, ...], frame: tuple[int, int], cfg: RoiConfig, gap: int = 1,
    held: tuple[Box, ...] = (),
) -> list[tuple[Box, tuple[Region, ...]]]:
    """Square crop boxes for ``regions`` ``gap`` frames later: margin, prediction, merge, cap,
    and last frame's boxes (``held``) kept where they still fit."""
    short = min(frame)
    boxes: list[tuple[Box, tuple[Region, ...]]] = []
    for r in (part for region in regions for part in _split(region, cfg, gap, short)):
        cx, cy = r.box.center
        boxes.append((square_box(cx + r.vx * gap, cy + r.vy * gap, _side(r, cfg, gap, short), frame), (r,)))
    merged = True
    while merged:  # merging can make a box overlap a third one, so repeat until stable
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                # Boxes that mostly overlap become one crop; a slight overlap stays two crops
                # (blended where they meet) so two people side by side keep their resolution.
                # A merge that would cover most of the frame is not made: the two crops keep more
                # resolution than one frame-sized crop (or the full pass it would turn into).
                # Nor one wider than the frame is tall: it would no longer be square.
                a, b = boxes[i][0], boxes[j][0]
                if a.intersection_area(b) > cfg.merge_overlap * min(a.area, b.area) and (
                    _fits_square(_merged(boxes[i], boxes[j], frame)[0], frame, cfg)
                ):
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
    if held and cfg.hold > 0:
        boxes = _hold(boxes, held, frame, cfg, gap)
    return boxes


def _fits_square(b: Box, frame: tuple[int, int], cfg: RoiConfig) -> bool:
    return b.area < cfg.full_area * frame[0] * frame[1] and _side_of(b) <= min(frame)


def _split(r: Region, cfg: RoiConfig, gap: int, short: int) -> tuple[Region, ...]:
    """A region too wide for one square crop (people side by side, touching, in one component)
    as side-by-side slices, one crop each, so each keeps a crop's resolution; others as they are.

    Any such region wider than tall is sliced, into ``ceil(w / h)`` slices no wider than tall,
    whose margins are relative to the slices, not to the region's width. Unsliced, two people
    touching (one walking in front of the other) got one crop padded by a quarter of their joint
    width on each side, wider than the frame is tall; squeezed into the model's square input, the
    network kept the front person and dropped the one behind. The slices' crops merge back into
    one square crop where it fits (:func:`region_boxes`): a tighter one."""
    w, h = r.box.width, r.box.height
    if _side(r, cfg, gap, short) <= short or w <= h:
        return (r,)
    k = max(2, math.ceil(w / max(h, 1)))
    edges = [r.box.x0 + round(i * w / k) for i in range(k + 1)]
    parts = []
    for x0, x1 in zip(edges[:-1], edges[1:], strict=True):
        box = Box(x0, r.box.y0, x1, r.box.y1)
        parts.append(replace(r, box=box, area=max(1, r.area // k), cx=(x0 + x1) / 2.0))
    return tuple(parts)


def _side_of(b: Box) -> int:
    return max(b.width, b.height)


def _hold(
    boxes: list[tuple[Box, tuple[Region, ...]]], held: tuple[Box, ...], frame: tuple[int, int],
    cfg: RoiConfig, gap: int,
) -> list[tuple[Box, tuple[Region, ...]]]:
    """Keep last frame's crop box where it still fits: the same crop gives the same pixels.

    A box is kept while its side is within ``hold`` of the wanted side and it still holds the
    regions' predicted tight boxes with at least half the margin on every side (less where the
    frame ends), so a slowly moving person does not make the crop jitter by a pixel per frame.
    """
    h, w = frame
    used: set[int] = set()
    out = []
    for want, members in boxes:
        ext = max(max(r.box.width, r.box.height) for r in members)
        pad = 0.5 * cfg.margin * ext
        x0 = min(r.box.x0 + r.vx * gap for r in members) - pad
        y0 = min(r.box.y0 + r.vy * gap for r in members) - pad
        x1 = max(r.box.x1 + r.vx * gap for r in members) + pad
        y1 = max(r.box.y1 + r.vy * gap for r in members) + pad
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        best, best_k = want, -1
        for k, b in enumerate(held):
            if k in used or abs(_side_of(b) - _side_of(want)) > cfg.hold * _side_of(want):
                continue
            fits = b.x0 <= x0 and b.y0 <= y0 and b.x1 >= x1 and b.y1 >= y1
            if fits and (best_k < 0 or b.intersection_area(want) > best.intersection_area(want)):
                best, best_k = b, k
        if best_k >= 0:
            used.add(best_k)
        out.append((best, members))
    return out


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
        credit = _earned(state, cfg) - 1.0 if cfg.budget > 0 else 0.0
        return RoiPlan(index, (h, w), True, (), reset, reset=True, thumb=thumb, credit=credit)
    assert state.last_index is not None
    gap = index - state.last_index
    made = region_boxes(state.regions, (h, w), cfg, gap, state.last_boxes)
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
    full = full_reason is not None
    credit, run = _schedule(state, cfg, boxes, members, full)
    deferred = tuple(boxes[k] for k in range(len(boxes)) if k not in run)
    held = tuple({id(r.patch): r.patch for k in range(len(boxes)) if k not in run
                  for r in members[k] if r.patch is not None}.values())
    boxes = tuple(boxes[k] for k in run)
    members = tuple(members[k] for k in run)
    reason = full_reason or ("track" if boxes or held else "idle")
    return RoiPlan(index, (h, w), full, boxes, reason, members, gap, thumb=thumb,
                   deferred=deferred, held=held, credit=credit)


def _earned(state: RoiState, cfg: RoiConfig) -> float:
    """This frame's credit before spending: ``budget`` more, at most one frame's worth saved up."""
    return min(state.credit + cfg.budget, cfg.budget + 1.0)


def _schedule(
    state: RoiState, cfg: RoiConfig, boxes: tuple[Box, ...], members: tuple[tuple[Region, ...], ...],
    full: bool,
) -> tuple[float, list[int]]:
    """Which crops run under the budget, and the credit left: (credit, box indexes).

    Every frame adds ``budget`` model inputs of credit (:func:`_earned`); a full pass and each
    crop spend one. Crops whose regions all have a patch from
    an earlier crop may wait, oldest patch first, while the credit is short; the rest always
    run (a region nobody has cropped yet has nothing to paste), spending ahead when they must.
    """
    n = len(boxes)
    if cfg.budget <= 0:
        return 0.0, list(range(n))
    credit = _earned(state, cfg) - float(full)
    can_wait = [all(r.patch is not None for r in members[k]) for k in range(n)]
    run = [k for k in range(n) if not can_wait[k]]
    credit -= len(run)

    def age(k: int) -> int:
        return -min(r.patch.index for r in members[k] if r.patch is not None)

    for k in sorted((k for k in range(n) if can_wait[k]), key=lambda k: (-age(k), -boxes[k].area)):
        if credit < 1.0:
            break
        run.append(k)
        credit -= 1.0
    return credit, sorted(run)


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
        if p.device.type == "cpu" and p.shape[1] == 1:
            # One channel on a CPU: OpenCV's half-pixel bilinear (as F.interpolate's without
            # align_corners, to ~1e-5) is 3-4x faster, as in Segmenter.postprocess.
            h, w = int(size[0]), int(size[1])
            fg = cv2.resize(p[0, 0].contiguous().numpy(), (w, h), interpolation=cv2.INTER_LINEAR)
            return torch.from_numpy(fg.reshape(1, h, w))
        p = F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=False)
    return p[0]


def crop_window(box: Box, frame: tuple[int, int], feather: float, device: Any = "cpu") -> torch.Tensor:
    """1 x h x w blend weights: 1 inside, ramping toward inner edges; no ramp on frame edges.

    Read-only: windows are shared (a crop box is usually kept for many frames)."""
    h, w = frame
    edges = (box.y0 > 0, box.y1 < h, box.x0 > 0, box.x1 < w)
    return _window(box.height, box.width, edges, float(feather), str(torch.device(device)))


@functools.lru_cache(maxsize=64)
def _window(
    height: int, width: int, edges: tuple[bool, bool, bool, bool], feather: float, device: str
) -> torch.Tensor:
    def ramp(n: int, lo_inner: bool, hi_inner: bool) -> torch.Tensor:
        f = max(1.0, feather * n)
        pos = torch.arange(n, dtype=torch.float32, device=device) + 0.5
        r = torch.ones(n, dtype=torch.float32, device=device)
        if lo_inner:
            r = torch.minimum(r, pos / f)
        if hi_inner:
            r = torch.minimum(r, (n - pos) / f)
        return r

    with torch.inference_mode():
        wy = ramp(height, edges[0], edges[1])
        wx = ramp(width, edges[2], edges[3])
        return (wy[:, None] * wx[None, :]).unsqueeze(0)


def compose(
    plan: RoiPlan, spec: Any, full: torch.Tensor | None, crops: list[torch.Tensor], feather: float,
    held: list[tuple[Box, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Paste crop probabilities (already fitted to their boxes) over the base: C' x H x W.

    ``held``: earlier crops' results where they land this frame, pasted first (under this
    frame's crops)."""
    h, w = plan.size
    owned = full is None  # a canvas made here may be written in place; the full pass's may not
    if full is not None:
        base = full
    else:
        ref = crops[0] if crops else held[0][1] if held else None
        channels = 1 if spec.binary else len(spec.classes)
        if ref is None or ref.device.type == "cpu":
            # numpy's zeros come from calloc: pages no crop is pasted on are never written,
            # which makes a frame-sized canvas about half as costly as torch.zeros.
            base = torch.from_numpy(np.zeros((channels, h, w), np.float32))
        else:
            base = torch.zeros((channels, h, w), dtype=torch.float32, device=ref.device)
        if not spec.binary:
            base[0] = 1.0  # background is class 0
    if held:
        base = _paste(base, [b for b, _ in held], [p for _, p in held], feather, owned)
        owned = True  # _paste's result is a tensor of its own
    return _paste(base, list(plan.boxes), crops, feather, owned)


def _paste(
    base: torch.Tensor, boxes: list[Box], crops: list[torch.Tensor], feather: float, owned: bool = False
) -> torch.Tensor:
    """``crops`` blended over ``base`` in their boxes (a new tensor unless ``owned``).

    Everything is computed inside the boxes' common bounding box only: outside it the
    base is unchanged, and people rarely fill the frame."""
    if not crops:
        return base
    h, w = base.shape[-2:]
    out = base if owned else base.clone()
    if not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]):
        # Disjoint crops (the usual case): each blends over its own box, nothing else is read.
        for box, p in zip(boxes, crops, strict=True):
            win = crop_window(box, (h, w), feather, base.device)
            region = out[:, box.y0 : box.y1, box.x0 : box.x1]
            region.lerp_(p, win)
        return out
    y0, y1 = min(b.y0 for b in boxes), max(b.y1 for b in boxes)
    x0, x1 = min(b.x0 for b in boxes), max(b.x1 for b in boxes)
    region = out[:, y0:y1, x0:x1]
    acc = torch.zeros_like(region)
    wsum = torch.zeros((1, y1 - y0, x1 - x0), dtype=base.dtype, device=base.device)
    alpha = torch.zeros_like(wsum)
    # In place throughout: the boxes' common box can be most of the frame, and each temporary
    # of its size costs as much as the arithmetic.
    for box, p in zip(boxes, crops, strict=True):
        win = crop_window(box, (h, w), feather, base.device)
        sl = (slice(None), slice(box.y0 - y0, box.y1 - y0), slice(box.x0 - x0, box.x1 - x0))
        acc[sl].addcmul_(win, p)
        wsum[sl].add_(win)
        torch.maximum(alpha[sl], win, out=alpha[sl])
    blended = acc.div_(wsum.clamp_min_(1e-6))
    region.lerp_(blended, alpha)  # region (1 - alpha) + blended alpha
    return out


# -- state update -----------------------------------------------------------------------------


def components(mask: np.ndarray, min_pixels: float, within: Box | None = None) -> list[Region]:
    """Connected components (8-connected) of a boolean mask with at least ``min_pixels`` pixels,
    in frame coordinates; ``within``: the part of the mask that can hold any (nothing outside)."""
    x0, y0 = (within.x0, within.y0) if within is not None else (0, 0)
    part = mask[within.y0:within.y1, within.x0:within.x1] if within is not None else mask
    part = part.view(np.uint8) if part.dtype == np.bool_ else part.astype(np.uint8)
    # Labelling costs per pixel scanned: scan only the box around the foreground (a tenth of
    # the labelling's cost to find).
    bx, by, bw, bh = cv2.boundingRect(part)
    if bw == 0 or bh == 0:
        return []
    part, x0, y0 = part[by:by + bh, bx:bx + bw], x0 + bx, y0 + by
    # Grana's algorithm: the same components, 2.5x faster than OpenCV's default choice on one thread.
    n, _, stats, cents = cv2.connectedComponentsWithStatsWithAlgorithm(part, 8, cv2.CV_32S, cv2.CCL_GRANA)
    # Specks are common (hundreds per frame): pick the large components before any Python loop.
    keep = np.flatnonzero(stats[1:n, cv2.CC_STAT_AREA] >= max(1.0, min_pixels)) + 1
    out = []
    for i in keep.tolist():
        x, y, bw, bh, area = (int(v) for v in stats[i])
        box = Box(x0 + x, y0 + y, x0 + x + bw, y0 + y + bh)
        out.append(Region(box, area, x0 + float(cents[i][0]), y0 + float(cents[i][1])))
    return out


def _health(
    plan: RoiPlan, k: int, fg: np.ndarray, cfg: RoiConfig
) -> tuple[str | None, tuple[float, float] | None]:
    """Check crop ``k``'s own mask against the regions it was made for: (problem, velocity)."""
    box, members = plan.boxes[k], plan.members[k]
    h, w = plan.size
    m = cv2.moments(np.ascontiguousarray(fg, dtype=np.uint8), binaryImage=True)  # count and centroid
    count = m["m00"]
    prev_area = sum(r.area for r in members)
    checked = all(r.cropped for r in members)
    if count == 0 or count < cfg.collapse * prev_area:
        # An unconfirmed seed that comes out empty is a false alarm: it just drops out.
        return ("collapse" if checked else None), None
    pcx = sum(r.cx * r.area for r in members) / prev_area
    pcy = sum(r.cy * r.area for r in members) / prev_area
    cx, cy = box.x0 + m["m10"] / count, box.y0 + m["m01"] / count
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


def _apart(boxes: list[Box]) -> bool:
    """No two boxes overlap or touch (a pixel of one 8-connected to a pixel of another)."""
    return not any(
        a.x0 <= b.x1 and b.x0 <= a.x1 and a.y0 <= b.y1 and b.y0 <= a.y1
        for i, a in enumerate(boxes) for b in boxes[i + 1:]
    )


def update_state(
    state: RoiState, plan: RoiPlan, mask: np.ndarray, crop_fg: list[np.ndarray], cfg: RoiConfig,
    crop_probs: list[torch.Tensor] | None = None,
) -> tuple[RoiState, str | None]:
    """The state after ``plan``'s frame produced ``mask`` (bool H x W); also the problem found.

    ``crop_probs``: the crops' fitted probabilities, kept as patches for frames over the budget."""
    h, w = plan.size
    if plan.reset:
        state = RoiState(frames=state.frames, full_passes=state.full_passes, crops=state.crops,
                         resets=state.resets + (plan.reason != "first"), credit=state.credit)
    problem = None
    sources: list[tuple[Box, Patch]] = []  # where each region may inherit motion and a patch from
    for k, fg in enumerate(crop_fg):
        issue, v = _health(plan, k, fg, cfg)
        problem = problem or issue
        if v is not None:
            old = plan.members[k]
            a = sum(r.area for r in old)
            ovx, ovy = sum(r.vx * r.area for r in old) / a, sum(r.vy * r.area for r in old) / a
            vx, vy = 0.5 * (ovx + v[0]), 0.5 * (ovy + v[1])
            probs = crop_probs[k] if crop_probs is not None else torch.empty(0)
            sources.append((plan.boxes[k], Patch(plan.boxes[k], probs, plan.index, vx, vy)))
    pasted = list(plan.boxes)  # where this frame's mask can hold foreground without a full pass
    for patch in plan.held:
        landed = patch.at(plan.index, plan.size)
        if landed is not None:
            sources.append((landed[0], patch))
            pasted.append(landed[0])
    regions = []
    # Without a full pass, only the crops (and results held over from earlier ones) put any
    # foreground in the mask: look for components inside their boxes only.
    found: list[Region] = []
    if plan.full:
        found = components(mask, cfg.min_area * h * w)
    elif pasted and _apart(pasted):
        # Boxes that do not even touch cannot share a component: each is searched alone, which
        # skips the space between people.
        found = [r for b in pasted for r in components(mask, cfg.min_area * h * w, b)]
    elif pasted:
        within = Box(min(b.x0 for b in pasted), min(b.y0 for b in pasted),
                     max(b.x1 for b in pasted), max(b.y1 for b in pasted))
        found = components(mask, cfg.min_area * h * w, within)
    for r in sorted(found, key=lambda r: -r.area):
        cx, cy = r.box.center
        for box, patch in sources:  # a component inherits the motion of the crop it sits in
            if box.x0 <= cx < box.x1 and box.y0 <= cy < box.y1:
                keep = patch if crop_probs is not None and patch.probs.numel() else None
                r = replace(r, vx=patch.vx, vy=patch.vy, cropped=True, patch=keep)
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
        last_boxes=plan.boxes + plan.deferred,
        credit=plan.credit,
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
            held = [x for x in (p.at(plan.index, plan.size) for p in plan.held) if x is not None]
            canvas = compose(plan, self.spec, full, crops, self.cfg.feather, held)
            if self.spec.binary:
                fg_np = canvas[0].cpu().numpy()
                fg: np.ndarray | None = fg_np
                seeds = fg_np > 0.5
                labels = seeds.view(np.uint8) if self.fg_class == 1 else seeds * np.uint8(self.fg_class)
                crop_fg = [(c[0] > 0.5).cpu().numpy() for c in crops]
                # A person small in the full frame often scores below 0.5 there: outside the crops
                # a lower seed threshold still starts a crop on them (inside, 0.5 keeps boxes tight).
                if plan.full:
                    low = np.asarray(fg_np > min(0.5, self.cfg.seed_threshold))
                    for box in plan.boxes:
                        low[box.y0:box.y1, box.x0:box.x1] = False
                    seeds = seeds | low  # a new array: labels share the old one's memory
            else:
                labels = canvas.argmax(dim=0).to(torch.uint8).cpu().numpy()
                fg = None
                crop_fg = [(c.argmax(dim=0) == self.fg_class).cpu().numpy() for c in crops]
                seeds = labels == self.fg_class
        self.state, problem = update_state(self.state, plan, seeds, crop_fg, self.cfg, crops)
        info: dict[str, Any] = {
            "crops": len(plan.boxes), "full": plan.full, "reason": plan.reason, "inputs": plan.inputs
        }
        if plan.held:
            info["held"] = len(plan.held)
        if problem is not None:
            info["problem"] = problem
        return RoiOutput(labels, fg, info)
