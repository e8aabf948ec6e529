"""ROI mode against full-frame mode, same model: accuracy, flicker, compute. Prints markdown.

    python -m bench.roi                       # real clips (when present) + a composed scene
    python -m bench.roi --media ../shared/media --model selfie --frames 40
    python -m bench.roi --oracle              # upper bound: crops around the true person box

Real clips: ``MEDIA/<clip>/video.mp4`` + ``masks/`` (DAVIS layout, see ``segstream eval``);
missing clips are skipped. Their masks include paraglider lines and kite gear the person
model does not segment, so each clip is also scored against a "body" mask (the ground
truth after a 9x9 morphological opening, which removes structures thinner than ~9 px).

The composed scene: the astronaut photo (public domain, shipped in ``pipeline/assets``) pasted
at 250-280 px on a generated 854x480 background; two people walk across, a third
enters from the right edge at frame ``ENTER``. Ground truth is the model's own mask on the
unscaled photo, scaled with it, so the scene measures what input resolution costs the
model and nothing else. Reported per person: the worst IoU over the frames they are fully
in view ("everyone keeps a mask"), and how many frames ROI mode needs to pick up the newcomer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.temporal import TemporalParams
from pipeline.config import RoiConfig
from pipeline.evaluate import EvalInputError, evaluate, load_sequence
from pipeline.roi import RoiTracker, fit_probs, square_box

ASTRONAUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "astronaut.jpg"
CLIPS = ("paragliding-launch", "kite-surf")
ENTER = 12


def body_mask(mask: np.ndarray) -> np.ndarray:
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (9, 9))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, k) > 0


def _row(name: str, mode: str, r: dict[str, Any], extra: str = "") -> str:
    return (
        f"| {name} | {mode} | {r['miou']:.3f} | {extra} | {r['flicker']:.4f} | "
        f"{r.get('inputs_per_frame', 1.0):.2f} | {r.get('crops_per_frame', 0.0):.2f} | {r['ms']:.1f} |"
    )


def _timed_eval(frames, masks, seg, roi):
    t = time.perf_counter()
    r = evaluate(frames, masks, seg, TemporalParams(), roi=roi)
    r["ms"] = 1000.0 * (time.perf_counter() - t) / max(1, r["frames"])
    return r


def real_clips(media: Path, limit: int | None) -> Iterator[tuple[str, list[np.ndarray], list[np.ndarray]]]:
    """(name, frames, masks) of each real clip present under ``media``; missing ones are skipped."""
    for clip in CLIPS:
        d = media / clip
        try:
            seq = load_sequence(d / "video.mp4", d / "masks")
        except EvalInputError as e:
            print(f"(skipping {clip}: {e})")
            continue
        frames = list(seq.frames())[:limit]
        yield clip, frames, list(seq.masks())[: len(frames)]


def bench_clips(seg: Any, media: Path, cfg: RoiConfig, limit: int | None) -> list[str]:
    rows = []
    for clip, frames, masks in real_clips(media, limit):
        bodies = [body_mask(m) for m in masks]
        for mode, roi in (("full frame", None), ("ROI", cfg)):
            r = _timed_eval(frames, masks, seg, roi)
            b = evaluate(frames, bodies, seg, TemporalParams(), roi=roi)
            rows.append(_row(clip, mode, r, f"{b['miou']:.3f}"))
    return rows


def oracle_clips(seg: Any, media: Path, scales: tuple[float, ...], limit: int | None) -> list[str]:
    """Upper bound for ROI mode on the real clips: each frame segmented through one square crop
    around the true person (the body mask's box) grown ``scale`` times, nothing outside it."""
    rows = []
    for clip, frames, raw in real_clips(media, limit):
        masks = [np.asarray(m) != 0 for m in raw]
        scores: dict[str, list[tuple[float, float]]] = {}
        for img, gt in zip(frames, masks, strict=True):
            body = body_mask(gt)
            full = seg([img])[0][0] == seg.spec.foreground_class
            scores.setdefault("full frame", []).append((_iou(full, gt), _iou(full, body)))
            ys, xs = np.nonzero(body)
            if xs.size == 0:
                continue
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            for scale in scales:
                b = square_box((x0 + x1) / 2, (y0 + y1) / 2, scale * max(x1 - x0, y1 - y0), gt.shape)
                crop = np.ascontiguousarray(img[b.y0:b.y1, b.x0:b.x1])
                p = fit_probs(seg.infer(seg.preprocess([crop]))[0], (b.height, b.width), seg.spec)
                pred = np.zeros_like(gt)
                if seg.spec.binary:
                    pred[b.y0:b.y1, b.x0:b.x1] = p[0].numpy() > 0.5
                else:
                    pred[b.y0:b.y1, b.x0:b.x1] = (p.argmax(0) == seg.spec.foreground_class).numpy()
                key = f"oracle crop {scale:g}x box"
                scores.setdefault(key, []).append((_iou(pred, gt), _iou(pred, body)))
        for mode, v in scores.items():
            a = np.asarray(v).mean(axis=0)
            rows.append(f"| {clip} | {mode} | {a[0]:.3f} | {a[1]:.3f} |")
    return rows


# -- real footage with small people: the two clips as a 2 x 2 mosaic -----------------------------

MOSAIC_SCALE = 0.5


def davis_mosaic(media: Path, n: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]] | None:
    """Real footage where people are small: the two DAVIS clips at half size, four at a time in a
    2 x 2 mosaic the size of one clip (854x480). Top: paragliding-launch and kite-surf from their
    first frame; bottom: paragliding-launch 32 frames later and kite-surf played backwards from
    its last frame, so four different people, 50-130 px tall, move at once.

    Returns the frames and, per frame, one ground-truth mask per quarter (the clip's mask scaled
    into it); None when a clip is missing or too short for ``n`` frames."""
    clips = {}
    for clip in CLIPS:
        d = media / clip
        try:
            seq = load_sequence(d / "video.mp4", d / "masks")
        except EvalInputError:
            return None
        clips[clip] = (list(seq.frames()), [np.asarray(m) != 0 for m in seq.masks()])
    (pf, pm), (kf, km) = clips["paragliding-launch"], clips["kite-surf"]
    if n > min(len(kf), len(pf) - 32):
        return None
    h, w = pf[0].shape[:2]
    th, tw = round(h * MOSAIC_SCALE), round(w * MOSAIC_SCALE)
    frames, masks = [], []
    for t in range(n):
        back = len(kf) - 1 - t
        quarters = [(pf[t], pm[t]), (kf[t], km[t]), (pf[t + 32], pm[t + 32]), (kf[back], km[back])]
        img = np.zeros((2 * th, 2 * tw, 3), np.uint8)
        per = []
        for q, (f, g) in enumerate(quarters):
            y, x = (q // 2) * th, (q % 2) * tw
            img[y:y + th, x:x + tw] = cv2.resize(f, (tw, th), interpolation=cv2.INTER_AREA)
            m = np.zeros(img.shape[:2], bool)
            small = cv2.resize(g.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST)
            m[y:y + th, x:x + tw] = small > 0
            per.append(m)
        frames.append(img)
        masks.append(per)
    return frames, masks


def _predict(seg: Any, frames: list[np.ndarray], cfg: RoiConfig | None) -> list[np.ndarray]:
    """Foreground masks of ``frames`` in full-frame mode (``cfg`` None) or ROI mode."""
    preds = []
    tracker = RoiTracker(cfg, seg.spec) if cfg is not None else None
    with torch.inference_mode():
        for i, img in enumerate(frames):
            if tracker is None:
                preds.append(seg([img])[0][0] == seg.spec.foreground_class)
            else:
                plan, images = tracker.begin(img, index=i)
                probs = seg.infer(seg.preprocess(images)) if images else None
                preds.append(tracker.finish(plan, probs).labels == tracker.fg_class)
    return preds


def bench_mosaic(seg: Any, cfg: RoiConfig, media: Path, n: int) -> tuple[list[str], list[str]]:
    """Full frame and ROI mode on :func:`davis_mosaic`: mIoU raw and body, flicker, compute, and
    per person (quarter) the worst and median IoU and the first frame their mask is found."""
    made = davis_mosaic(media, n)
    if made is None:
        return [], [f"- mosaic of real clips: skipped (clips not under {media}, or shorter than {n} frames)"]
    frames, per = made
    quarter = (frames[0].shape[0] // 2, frames[0].shape[1] // 2)
    union = [np.logical_or.reduce(p) for p in per]
    bodies = [np.logical_or.reduce([body_mask(m) for m in p]) for p in per]
    rows, notes = [], []
    for mode, roi in (("full frame", None), ("ROI", cfg)):
        r = _timed_eval(frames, union, seg, roi)
        b = evaluate(frames, bodies, seg, TemporalParams(), roi=roi)
        rows.append(_row("real clips, 2x2 mosaic (4 small people)", mode, r, f"{b['miou']:.3f}"))
        preds = _predict(seg, frames, roi)
        stats = []
        for q in range(4):
            y, x = (q // 2) * quarter[0], (q % 2) * quarter[1]
            ious = []
            for t in range(n):
                gt = body_mask(per[t][q])[y:y + quarter[0], x:x + quarter[1]]
                ious.append(_iou(preds[t][y:y + quarter[0], x:x + quarter[1]], gt))
            found = next((t for t, v in enumerate(ious) if v >= 0.3), None)
            stats.append(f"{min(ious):.2f}/{float(np.median(ious)):.2f} (found at frame {found})")
        notes.append(f"- mosaic, {mode}: per person body IoU worst/median, first frame with IoU ≥ 0.3: "
                     + "; ".join(stats))
    return rows, notes


# -- the composed multi-person scene ---------------------------------------------------------


def _people(seg: Any) -> tuple[np.ndarray, np.ndarray]:
    raw = cv2.imread(str(ASTRONAUT))
    if raw is None:
        raise FileNotFoundError(ASTRONAUT)
    photo = np.asarray(cv2.cvtColor(raw, cv2.COLOR_BGR2RGB))
    with torch.inference_mode():
        ref = seg([photo])[0][0] == seg.spec.foreground_class
    return photo, ref


def compose_scene(seg: Any, n: int, frame: tuple[int, int] = (480, 854)):
    """Frames and per-person ground-truth masks (list per frame of one mask per person: the
    pixels that person shows; a photo drawn later hides what it covers)."""
    photo, ref = _people(seg)
    h, w = frame
    rng = np.random.default_rng(3)
    noise = rng.integers(80, 170, (h // 24, w // 24, 3)).astype(np.uint8)
    bg = cv2.GaussianBlur(cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR), (0, 0), 12)
    # (size px, x at frame 0, y, vx px/frame, first frame)
    people = [(280, 10, h - 280, 4.0, 0), (250, 590, h - 250, -3.0, 0), (270, w - 90, h - 270, -8.0, ENTER)]
    frames, gts = [], []
    for t in range(n):
        img = bg.copy()
        per = []
        for size, x0, y, vx, first in people:
            m = np.zeros(frame, bool)
            if t >= first:
                x = int(round(x0 + vx * (t - first)))
                pic = cv2.resize(photo, (size, size), interpolation=cv2.INTER_AREA)
                pm = cv2.resize(ref.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
                xa, xb = max(0, x), min(w, x + size)
                if xb > xa:
                    img[y:y + size, xa:xb] = pic[:, xa - x:xb - x]
                    for earlier in per:  # the photo hides whoever it is drawn over
                        earlier[y:y + size, xa:xb] = False
                    m[y:y + size, xa:xb] = pm[:, xa - x:xb - x]
            per.append(m)
        frames.append(img)
        gts.append(per)
    return frames, gts, people


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = int((a | b).sum())
    return 1.0 if u == 0 else int((a & b).sum()) / u


def bench_scene(seg: Any, cfg: RoiConfig, n: int) -> tuple[list[str], list[str]]:
    frames, gts, people = compose_scene(seg, n)
    union = [np.logical_or.reduce(per) for per in gts]
    rows, notes = [], []
    for mode, roi in (("full frame", None), ("ROI", cfg)):
        r = _timed_eval(frames, union, seg, roi)
        preds = _predict(seg, frames, roi)
        worst = []
        for p, (_size, _, _, _, first) in enumerate(people):
            # Score a person on the pixels near them (their own box, grown by a margin); what
            # another person shows there is left out. Masks hold what each person shows.
            scores = []
            for t in range(first + 2, n):  # from the second frame a person was tracked on
                gt = gts[t][p]
                ys, xs = np.nonzero(gt)
                if xs.size == 0 or xs.min() == 0 or xs.max() == gt.shape[1] - 1:
                    continue  # partly out of view
                others = np.logical_or.reduce([m for q, m in enumerate(gts[t]) if q != p])
                y0, y1 = max(0, ys.min() - 20), ys.max() + 21
                x0, x1 = max(0, xs.min() - 20), xs.max() + 21
                care = ~others[y0:y1, x0:x1]
                scores.append(_iou(preds[t][y0:y1, x0:x1] & care, gt[y0:y1, x0:x1]))
            worst.append((min(scores), float(np.median(scores))) if scores else (float("nan"),) * 2)
        picked = next(
            (t - ENTER for t in range(ENTER, n) if (preds[t] & gts[t][2]).sum() > 0.5 * gts[t][2].sum()), None
        )
        rows.append(_row("composed (3 people)", mode, r, "n/a"))
        notes.append(
            f"- {mode}: per-person IoU of the pixels each shows, while in view (worst/median) "
            f"{', '.join(f'{a:.2f}/{b:.2f}' for a, b in worst)}; "
            f"newcomer covered (recall > 0.5) {picked} frames after entering"
        )
    return rows, notes


def bench_cost(seg: Any, cfg: RoiConfig, n: int, reps: int = 3) -> list[str]:
    """Wall time per frame on the composed scene, scoring left out: ROI (tracker, crops' input,
    network, pasting) against full-frame mode (input, network, masks at frame size)."""
    frames, _, _ = compose_scene(seg, n)
    stages: dict[str, list[float]] = {k: [] for k in ("begin", "input", "network", "finish", "full")}
    with torch.inference_mode():
        for _ in range(reps):
            tracker = RoiTracker(cfg, seg.spec)
            for i, img in enumerate(frames):
                t0 = time.perf_counter()
                plan, images = tracker.begin(img, index=i)
                t1 = time.perf_counter()
                x = seg.preprocess(images) if images else None
                t2 = time.perf_counter()
                probs = seg.infer(x) if x is not None else None
                t3 = time.perf_counter()
                tracker.finish(plan, probs)
                t4 = time.perf_counter()
                seg([img])
                t5 = time.perf_counter()
                for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    stages[k].append(1000.0 * v)
    ms = {k: float(np.mean(v)) for k, v in stages.items()}
    roi = ms["begin"] + ms["input"] + ms["network"] + ms["finish"]
    return [
        "| ROI: plan | crops' input | network | paste + track | ROI total | full frame | ROI ÷ full |",
        "|---|---|---|---|---|---|---|",
        f"| {ms['begin']:.2f} | {ms['input']:.2f} | {ms['network']:.2f} | {ms['finish']:.2f} | {roi:.2f} "
        f"| {ms['full']:.2f} | {roi / ms['full']:.2f} |",
    ]


def bench_filled(seg: Any, cfg: RoiConfig, n: int) -> list[str]:
    """A person filling the frame (the astronaut photo, 448 px crops of it panning 1 px a frame):
    ROI mode must not lose accuracy where there is nothing to zoom into."""
    from bench.temporal import astronaut_clip

    clip = astronaut_clip(seg, "pan", n)
    if clip is None:
        return []
    frames, masks = clip
    return [_row("fills the frame (pan)", mode, _timed_eval(frames, masks, seg, roi), "n/a")
            for mode, roi in (("full frame", None), ("ROI", cfg))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.roi", description=__doc__.split("\n\n")[0])
    ap.add_argument("--media", default=str(Path(__file__).resolve().parents[2] / "shared" / "media"))
    ap.add_argument("--model", default="selfie")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--frames", type=int, default=None, help="use at most this many frames per clip")
    ap.add_argument("--scene-frames", type=int, default=40)
    ap.add_argument("--mosaic-frames", type=int, default=48,
                    help="frames of the mosaic of real clips (at most 48)")
    ap.add_argument("--full-every", type=int, default=RoiConfig().full_every)
    ap.add_argument("--no-clips", action="store_true")
    ap.add_argument("--oracle", action="store_true", help="only the upper bound: crops around the true box")
    ap.add_argument("--quick", action="store_true", help="at most 30 frames per clip, one timing round")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames = min(args.frames or 30, 30)
    from models.segmenter import Segmenter

    cv2.setNumThreads(1)  # as in the service (pipeline.manager)
    seg = Segmenter.from_name(args.model, device=args.device)
    if args.oracle:
        print(f"model {args.model}: one square crop around the true person box, scaled; IoU raw / body\n")
        print("| clip | mode | mIoU | mIoU body |\n|---|---|---|---|")
        with torch.inference_mode():
            rows = oracle_clips(seg, Path(args.media), (1.0, 1.2, 1.5, 1.8, 2.0, 2.5, 3.0), args.frames)
        print("\n".join(rows))
        return 0
    cfg = RoiConfig(enabled=True, full_every=args.full_every)
    print(f"model {args.model}, device {args.device}, ROI full_every={cfg.full_every}, "
          f"max_regions={cfg.max_regions}, budget={cfg.budget}, margin={cfg.margin}, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| scene | mode | mIoU | mIoU body | flicker | model inputs/frame | crops/frame | ms/frame |")
    print("|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        rows = [] if args.no_clips else bench_clips(seg, Path(args.media), cfg, args.frames)
        for row in rows:
            print(row)
        rows, notes = bench_mosaic(seg, cfg, Path(args.media), args.mosaic_frames)
        for row in rows:
            print(row)
        rows, scene_notes = bench_scene(seg, cfg, args.scene_frames)
        notes += scene_notes
        rows += bench_filled(seg, cfg, args.scene_frames)
    for row in rows:
        print(row)
    print()
    print("\n".join(notes))
    print("\nmodel inputs/frame = compute relative to full-frame mode (1.00); ms/frame includes scoring.")
    print(f"\nWall ms per frame on the composed scene ({args.scene_frames} frames, means, no scoring):\n")
    print("\n".join(bench_cost(seg, cfg, args.scene_frames, reps=1 if args.quick else 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
