"""Temporal refinement benchmark: accuracy, flicker and work per mode, against per-frame and EMA.

    python -m bench.temporal [--model selfie] [--media ../shared/media] [--quick]

Clips:
- the DAVIS clips in ``--media`` (``<clip>/video.mp4`` + ``<clip>/masks/*.png``), when present
  (they are not part of the repository; missing clips are skipped). DAVIS masks include lines,
  kite and board, so absolute IoU is low for a person model: read the changes against ``off``.
- generated from scikit-image's astronaut photo (public domain): ``astronaut-jitter`` (a still
  camera shaking by up to 1 px, with sensor noise) and ``astronaut-pan`` (a slow 1 px/frame
  pan). Ground truth there is the model's own mask on the clean, unshifted photo, cropped like
  the frame, so these rows measure stability and skipped work, not absolute accuracy.

Rows per clip: ``off`` (per frame), ``ema`` (the baseline p' = 0.5 p + 0.5 p_prev), ``smooth``,
``smooth+comp`` (with global camera-motion compensation, for moving cameras), ``smooth+search``
(with block-matching motion compensation, ``motion_search=3``) and
``keyframe``, all with default thresholds. ``refine/model`` is the refinement's own time per
frame over one model pass, measured in the same run with the engine's torch thread count
(goal <= 0.10).

A note per DAVIS clip gives the flicker of a reference mask that follows the ground truth's
motion exactly but is 3 px wider (the person only, lines and kite removed by an opening):
flicker that comes from an outline moving with the person, which no filter removes without
lagging behind it. A second note splits ``off``'s flicker by how soon each label change is
undone (1, 2, 4 frames): only the quickly undone part is noise a filter can remove at once.
A third note bounds what any filter of labels can do: an oracle that sees the future erases
every label blip of at most 1 or 2 frames from ``off``'s masks (a pixel that changes and
changes back keeps its label), and gives the flicker and IoU left.

A second table, ``temporal-overhead``, measures the refinement's cost (goal: at most
10%): its own time per frame (``plan`` + ``refine``) as a share of one segmenter call
(preprocess + network + mask at frame size), in the engine's order (preprocess, plan,
network, refine, postprocess), with the compiled kernels (``models/kernels_numba.py``) and with the
OpenCV calls, in alternating rounds of the same run. On a CPU the refinement runs right
after the network has pushed its code out of the caches, so it costs several times what it
does in a tight loop; the table measures it there, where the engine runs it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.tables import Table, ratio, verdict
from models import kernels
from models.temporal import TemporalParams, TemporalRefiner
from pipeline.evaluate import _sync, evaluate, load_sequence

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"
DAVIS_CLIPS = ("paragliding-launch", "kite-surf")
# row name -> refinement settings; "ema" runs the baseline with refinement off
ROWS: dict[str, dict[str, Any]] = {
    "off": {"mode": "off"},
    "ema": {"mode": "off"},
    "smooth": {"mode": "smooth"},
    "smooth+comp": {"mode": "smooth", "compensate": True},
    "smooth+search": {"mode": "smooth", "motion_search": 3},
    "keyframe": {"mode": "keyframe"},
}


class EmaSegmenter:
    """The baseline: a plain exponential average of the model's probabilities."""

    def __init__(self, inner: Any, alpha: float = 0.5) -> None:
        self.inner, self.spec, self.alpha = inner, inner.spec, alpha
        self.prev: torch.Tensor | None = None

    def preprocess(self, images):  # type: ignore[no-untyped-def]
        return self.inner.preprocess(images)

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        p = self.inner.infer(x)
        if self.prev is not None and self.prev.shape == p.shape:
            p = self.alpha * p + (1 - self.alpha) * self.prev
        self.prev = p
        return p

    def postprocess(self, probs, sizes):  # type: ignore[no-untyped-def]
        return self.inner.postprocess(probs, sizes)


def astronaut_clip(segmenter: Any, kind: str, n: int, seed: int = 0) -> tuple[list, list] | None:
    try:
        from skimage import data
    except ImportError:
        return None
    photo = data.astronaut()  # 512 x 512 RGB
    labels, _ = segmenter([photo])[0]
    fg_class = segmenter.spec.foreground_class
    mask = labels == fg_class if fg_class is not None else labels != 0
    rng = np.random.default_rng(seed)
    size, margin = 448, 32
    frames, masks = [], []
    for t in range(n):
        if kind == "jitter":
            oy, ox = margin + int(rng.integers(-1, 2)), margin + int(rng.integers(-1, 2))
        else:  # pan: 1 px per frame, back and forth within the margin
            step = t % (4 * margin)
            ox = step if step < 2 * margin else 4 * margin - step
            oy = margin
        crop = photo[oy : oy + size, ox : ox + size].astype(np.float32)
        crop += rng.normal(0.0, 2.0, crop.shape)
        frames.append(np.clip(crop, 0, 255).astype(np.uint8))
        masks.append(mask[oy : oy + size, ox : ox + size])
    return frames, masks


def motion_floor(masks: list, widen: int = 3) -> float:
    """Flicker of the ground truth's body (9 x 9 opening), widened by ``widen`` px, against it."""
    import cv2

    k = np.ones((2 * widen + 1, 2 * widen + 1), np.uint8)
    changed = steady = 0
    prev = None
    for m in masks:
        gt = np.asarray(m) != 0
        body = cv2.morphologyEx(gt.astype(np.uint8), cv2.MORPH_OPEN, np.ones((9, 9), np.uint8))
        ref = cv2.dilate(body, k) != 0
        if prev is not None:
            s = prev[1] == gt
            steady += int(np.count_nonzero(s))
            changed += int(np.count_nonzero((prev[0] != ref) & s))
        prev = (ref, gt)
    return changed / steady if steady else 0.0


def undone_shares(preds: list, masks: list, within: tuple[int, ...] = (1, 2, 4)) -> dict[int, float]:
    """Of the flicker of ``preds`` (label changes where the ground truth is steady), the share
    that is undone within k frames (the pixel returns to its old label), for each k.

    Changes undone within a frame or two are noise a filter can remove without lag; one
    that holds for longer is how the outline moves, which a filter can only hold back.
    """
    preds = [np.asarray(p, bool) for p in preds]
    masks = [np.asarray(m) != 0 for m in masks]
    total, undone = 0, dict.fromkeys(within, 0)
    for t in range(1, len(preds)):
        flips = (preds[t] != preds[t - 1]) & (masks[t] == masks[t - 1])
        total += int(np.count_nonzero(flips))
        back = np.zeros_like(flips)  # changed back by frame t + d
        for d in range(1, max(within) + 1):
            if t + d < len(preds):
                back |= preds[t + d] == preds[t - 1]
            if d in undone:
                undone[d] += int(np.count_nonzero(flips & back))
    return {k: undone[k] / total if total else 0.0 for k in within}


def erase_blips(preds: list, k: int) -> list:
    """``preds`` with every label blip of at most ``k`` frames erased: where a pixel changes
    at frame t and is back to its old label at t + d (d <= k, the same new label throughout),
    it keeps the old label. Needs the future, so no live filter can do more without lag."""
    out = [np.array(p, bool) for p in preds]
    n = len(out)
    for t in range(1, n - 1):
        for d in range(1, k + 1):
            if t + d >= n:
                break
            run = out[t] != out[t - 1]
            for j in range(1, d):
                run &= out[t + j] == out[t]
            run &= out[t + d] == out[t - 1]
            for j in range(d):
                out[t + j][run] = out[t - 1][run]
    return out


def _scores(preds: list, masks: list) -> tuple[float, float]:
    """(mean IoU, flicker) of boolean predictions, as ``segstream eval`` scores them."""
    from pipeline.evaluate import _Scores

    scores = _Scores()
    for p, m in zip(preds, masks, strict=True):
        scores.add(np.asarray(p, bool), np.asarray(m) != 0)
    return scores.miou, scores.flicker


def _predictions(segmenter: Any, frames: list) -> list:
    fg = segmenter.spec.foreground_class
    out = []
    for f in frames:
        labels, _ = segmenter([f])[0]
        out.append(labels == fg if fg is not None else labels != 0)
    return out


def _clips(segmenter: Any, media: Path, n_generated: int) -> Iterator[tuple[str, Any, Any]]:
    for name in DAVIS_CLIPS:
        video, masks = media / name / "video.mp4", media / name / "masks"
        if video.is_file() and masks.is_dir():
            seq = load_sequence(video, masks)
            frames = list(seq.frames())
            yield name, frames, list(seq.masks())
    for kind in ("jitter", "pan"):
        clip = astronaut_clip(segmenter, kind, n_generated)
        if clip is not None:
            yield f"astronaut-{kind}", clip[0], clip[1]


def run(quick: bool = False, *, model: str = "selfie", media: Path = MEDIA, device: str = "cpu") -> dict:
    from models.segmenter import Segmenter
    from pipeline.manager import default_torch_threads

    torch.set_num_threads(default_torch_threads())  # as the engine runs
    segmenter = Segmenter.from_name(model, device=device)
    segmenter.warmup()
    table = Table(
        name="temporal",
        title=f"Temporal refinement ({model}, {segmenter.device})",
        columns=["clip", "mode", "mIoU", "ΔmIoU (pt)", "flicker", "flicker vs off", "full_frac",
                 "refine ms", "model ms", "refine/model"],
    )
    missing = [c for c in DAVIS_CLIPS if not (media / c / "video.mp4").is_file()]
    if missing:
        table.notes.append(f"skipped (not found under {media}): {', '.join(missing)}")
    with torch.inference_mode():
        clips = list(_clips(segmenter, media, 24 if quick else 48))
        for name, frames, masks in clips:
            base: dict[str, Any] | None = None
            if name in DAVIS_CLIPS:
                table.notes.append(
                    f"{name}: a mask following the ground truth exactly, 3 px wider, flickers "
                    f"{1000 * motion_floor(masks):.2f}"
                )
                preds = _predictions(segmenter, frames)
                shares = undone_shares(preds, masks)
                table.notes.append(
                    f"{name}: of `off`'s flicker, label changes undone within "
                    + " / ".join(f"{k}" for k in shares) + " frames: "
                    + " / ".join(f"{100 * v:.0f}%" for v in shares.values())
                )
                miou0, flicker0 = _scores(preds, masks)
                bounds = []
                for k in (1, 2):
                    miou, flicker = _scores(erase_blips(preds, k), masks)
                    bounds.append(
                        f"blips of <= {k} frame{'s' if k > 1 else ''} erased: flicker "
                        f"{100 * (flicker / flicker0 - 1):+.0f}%, mIoU {100 * (miou - miou0):+.2f} pt"
                    )
                table.notes.append(f"{name}: an oracle that sees the future, on `off`: " + "; ".join(bounds))
            for mode, settings in ROWS.items():
                seg = EmaSegmenter(segmenter) if mode == "ema" else segmenter
                r = evaluate(frames, masks, seg, TemporalParams(**settings))
                base = base or r
                fl = ratio(r["flicker"], base["flicker"])
                table.add(
                    name, mode, r["miou"], 100 * (r["miou"] - base["miou"]), r["flicker"] * 1000,
                    None if fl is None else f"{100 * (fl - 1):+.0f}%", r["full_frac"],
                    r["refine_ms"], r["model_ms"], ratio(r["refine_ms"], r["model_ms"]),
                )
                table.data.setdefault(name, {})[mode] = r
    table.notes.append("flicker is per mille of steady pixels whose predicted label changed")
    print(table.markdown(), flush=True)
    over = overhead(segmenter, [(name, frames) for name, frames, _ in clips], rounds=2 if quick else 4)
    print(over.markdown(), flush=True)
    return {"temporal": table.to_json(), "overhead": over.to_json()}


def _overhead_round(segmenter: Any, frames: list, params: TemporalParams) -> tuple[float, float]:
    """(refinement seconds, segmenter-call seconds) over ``frames``, in the engine's order."""
    refiner = TemporalRefiner(params, mean=segmenter.spec.mean, std=segmenter.spec.std)
    state = refiner.initial_state()
    own = call = 0.0

    def pc(t: torch.Tensor | None = None) -> float:  # on a GPU, wait for the work queued so far
        if t is not None:
            _sync(t)
        return time.perf_counter()

    for i, frame in enumerate(frames):
        t0 = pc()
        x = segmenter.preprocess([frame])
        t1 = pc(x)
        plan = refiner.plan(x, state, index=i)
        t2 = pc(x)
        probs = segmenter.infer(x)
        t3 = pc(probs)
        out, state = refiner.refine(plan, probs, state, overwrite=True)
        t4 = pc(out)
        segmenter.postprocess(out, [frame.shape[:2]])
        t5 = pc()
        own += (t2 - t1) + (t4 - t3)
        call += (t1 - t0) + (t3 - t2) + (t5 - t4)
    return own, call


def overhead(segmenter: Any, clips: list[tuple[str, list]], rounds: int = 4) -> Table:
    """The ``smooth`` refinement's share of a segmenter call, compiled kernels vs OpenCV,
    on ``clips`` (name, frames)."""
    table = Table(
        name="temporal-overhead",
        title=f"Temporal refinement overhead per segmenter call (smooth, {segmenter.device})",
        columns=["clip", "CPU path", "refine ms/frame", "call ms/frame", "refine/call", "goal <= 10%"],
    )
    if segmenter.device.type != "cpu":
        table.notes.append("the compiled kernels are a CPU path: on this device both rows are the torch path")
    paths = {"kernels": "1", "OpenCV": "0"}
    saved = os.environ.get("SEGSTREAM_JIT")
    if kernels.load() is None:
        paths.pop("kernels")
    table.notes.append(f"kernels: {kernels.status()}")
    params = TemporalParams(mode="smooth")
    try:
        with torch.inference_mode():
            for name, frames in clips:
                sums = {path: [0.0, 0.0] for path in paths}
                for _ in range(rounds):  # alternating, so both paths see the same machine
                    for path, env in paths.items():
                        os.environ["SEGSTREAM_JIT"] = env
                        own, call = _overhead_round(segmenter, frames, params)
                        sums[path][0] += own
                        sums[path][1] += call
                n = rounds * len(frames)
                for path, (own, call) in sums.items():
                    share = ratio(own, call)
                    shown = None if share is None else f"{100 * share:.1f}%"
                    met = verdict(share, 0.10, at_most=True)
                    table.add(name, path, 1000 * own / n, 1000 * call / n, shown, met)
                    table.data.setdefault(name, {})[path] = {"refine_s": own, "call_s": call, "frames": n}
    finally:
        if saved is None:
            os.environ.pop("SEGSTREAM_JIT", None)
        else:
            os.environ["SEGSTREAM_JIT"] = saved
    table.notes.append(
        f"{rounds} alternating rounds per clip; a call is preprocess + network + mask at frame size"
    )
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.temporal", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter generated clips")
    ap.add_argument("--model", default="selfie")
    ap.add_argument("--media", type=Path, default=MEDIA, help="folder holding the DAVIS clips")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    run(args.quick, model=args.model, media=args.media, device=args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
