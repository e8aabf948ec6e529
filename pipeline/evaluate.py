"""``segstream eval``: accuracy, flicker and work done on a sequence with ground-truth masks.

Input follows the DAVIS layout, so sequences users download themselves work as they are::

    segstream eval DAVIS/JPEGImages/480p/kite-surf DAVIS/Annotations/480p/kite-surf
    segstream eval clip.mp4 masks/ --temporal smooth --json

FRAMES is a directory of JPEG/PNG frames (sorted by name) or a video file (decoded with
PyAV); MASKS is a directory of PNG masks, one per frame (same file stems as the frames
when FRAMES is a directory; the n-th mask in name order for the n-th video frame).
Any non-zero mask pixel is foreground (this also covers DAVIS 2017 palette masks, where
every object counts as foreground). In a mask with an alpha channel the colour decides; the
alpha is the mask only where the colour is black everywhere.

Reported:
- ``miou``: mean over frames of the foreground IoU (a frame where both masks are empty scores 1);
- ``flicker``: among pixels whose ground truth does not change between consecutive frames,
  the share whose predicted label does change (lower is steadier);
- ``full_frac``: share of frames the model segmented fully (below 1 only with ``keyframe``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch

from models import kernels
from models.temporal import MODES, TemporalParams, TemporalRefiner

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# TemporalParams fields exposed as --flags (mode has its own --temporal).
_PARAM_FLAGS = tuple(f.name for f in fields(TemporalParams) if f.name != "mode")


class EvalInputError(ValueError):
    """The frames or masks given to ``segstream eval`` cannot be used; the message says why."""


class SegmenterLike(Protocol):
    spec: Any

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor: ...
    def infer(self, x: torch.Tensor) -> torch.Tensor: ...
    def postprocess(
        self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]: ...


@dataclass(frozen=True, slots=True)
class EvalSequence:
    """A validated evaluation input: frames are decoded lazily, masks read on demand."""

    frames: Callable[[], Iterator[np.ndarray]]
    mask_paths: tuple[Path, ...]

    def masks(self) -> Iterator[np.ndarray]:
        for p in self.mask_paths:
            yield read_mask(p)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise EvalInputError(f"cannot read mask {path}")
    return mask_foreground(m)


def mask_foreground(m: np.ndarray) -> np.ndarray:
    """Foreground of a mask as read by OpenCV: grey (or palette index) non-zero, or any colour
    channel non-zero. An alpha channel (grey+alpha, BGRA) is not colour: it counts only when the
    colour is zero everywhere and the alpha varies, i.e. when the alpha is the mask."""
    if m.ndim == 2:
        return m != 0
    if m.shape[2] not in (2, 4):
        return (m != 0).any(axis=2)
    colour, alpha = m[..., :-1], m[..., -1]
    fg = (colour != 0).any(axis=2)
    if not fg.any() and alpha.min() != alpha.max():
        return alpha != 0
    return fg


def read_frame(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise EvalInputError(f"cannot read frame {path}")
    return np.ascontiguousarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))


def _video_frames(path: Path) -> Iterator[np.ndarray]:
    """The video's pictures as the server's file source gives them: turned by the rotation
    in its metadata and stretched to square pixels, as a player (and the ground truth drawn
    on what it shows) has them."""
    from pipeline.sources import SourceError, parse_source

    try:
        source = parse_source(str(path.resolve())).create()
    except ValueError as e:
        raise EvalInputError(f"cannot read video {path}: {e}") from None
    try:
        source.open()
        for raw in source.frames():
            if raw is not None:
                yield raw.image
    except SourceError as e:
        raise EvalInputError(f"cannot decode video {path}: {e}") from None
    finally:
        source.close()


def _video_frame_count(path: Path) -> int:
    """Pictures in the video stream :func:`_video_frames` decodes (the one the file source picks)."""
    import av

    from pipeline.sources.av_source import video_stream

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EvalInputError(f"{path} has no video stream")
            return sum(1 for pkt in container.demux(video_stream(container)) if pkt.size)
    except av.FFmpegError as e:
        raise EvalInputError(f"cannot open video {path}: {e}") from None


def load_sequence(frames: str | Path, masks: str | Path) -> EvalSequence:
    """Check a FRAMES / MASKS pair before any work: existence, counts, matching names."""
    fpath, mpath = Path(frames), Path(masks)
    if not mpath.is_dir():
        raise EvalInputError(f"masks directory not found: {mpath}")
    mask_files = sorted(p for p in mpath.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    if not mask_files:
        raise EvalInputError(f"no PNG masks in {mpath}")
    if fpath.is_dir():
        frame_files = _images_in(fpath)
        if not frame_files:
            raise EvalInputError(f"no JPEG/PNG frames in {fpath}")
        if len(frame_files) != len(mask_files):
            raise EvalInputError(
                f"{len(frame_files)} frames in {fpath} but {len(mask_files)} masks in {mpath}"
            )
        by_stem = {p.stem: p for p in mask_files}
        missing = [p.name for p in frame_files if p.stem not in by_stem]
        if missing:
            raise EvalInputError(f"no mask in {mpath} for frame {missing[0]} ({len(missing)} missing)")
        ordered = tuple(by_stem[p.stem] for p in frame_files)
        return EvalSequence(lambda: (read_frame(p) for p in frame_files), ordered)
    if fpath.is_file():
        n = _video_frame_count(fpath)
        if n != len(mask_files):
            raise EvalInputError(f"{n} frames in video {fpath} but {len(mask_files)} masks in {mpath}")
        return EvalSequence(lambda: _video_frames(fpath), tuple(mask_files))
    raise EvalInputError(f"frames not found: {fpath} (expected a directory of images or a video file)")


class _Scores:
    """Running IoU and flicker so sequences of any length stream through in constant memory."""

    def __init__(self) -> None:
        self.ious: list[float] = []
        self.changed = 0
        self.steady = 0
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        union = int(np.count_nonzero(pred | gt))
        self.ious.append(1.0 if union == 0 else int(np.count_nonzero(pred & gt)) / union)
        if self._prev is not None and self._prev[0].shape == pred.shape:
            steady = self._prev[1] == gt
            self.steady += int(np.count_nonzero(steady))
            self.changed += int(np.count_nonzero((self._prev[0] != pred) & steady))
        self._prev = (pred, gt)

    @property
    def miou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def flicker(self) -> float:
        return self.changed / self.steady if self.steady else 0.0


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def evaluate(
    frames: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    segmenter: SegmenterLike,
    params: TemporalParams,
    roi: Any = None,
) -> dict[str, Any]:
    """Run ``segmenter`` with temporal ``params`` over frames and score against masks.

    ``frames``: RGB uint8 HxWx3; ``masks``: boolean (or non-zero = foreground) HxW, any
    size (predictions are resized to each mask). Returns ``miou``, ``flicker``,
    ``full_frac`` plus ``frames``, ``full_frames``, ``temporal``, ``model_ms`` (mean per
    full pass) and ``refine_ms`` (mean per frame).
    """
    if roi is not None:
        if params.mode != "off":
            raise EvalInputError("ROI mode and temporal refinement cannot be combined; pick one")
        return _evaluate_roi(frames, masks, segmenter, roi)
    spec = segmenter.spec
    if params.mode != "off":
        kernels.load()  # offline: wait for the compiled kernels rather than start without them
    refiner = TemporalRefiner(params, mean=spec.mean, std=spec.std)
    fg_class = getattr(spec, "foreground_class", None)
    state = refiner.initial_state()
    scores = _Scores()
    model_s = refine_s = 0.0
    frame_iter, mask_iter = iter(frames), iter(masks)
    for index, image in enumerate(frame_iter):
        try:
            gt = np.asarray(next(mask_iter)) != 0
        except StopIteration:
            raise EvalInputError(f"more frames than masks: no mask for frame {index}") from None
        x = segmenter.preprocess([image])
        t0 = time.perf_counter()
        plan = refiner.plan(x, state, index=index)
        t1 = time.perf_counter()
        probs = None
        if plan.run_model:
            probs = segmenter.infer(x)[0]
            _sync(probs)
        t2 = time.perf_counter()
        out, state = refiner.refine(plan, probs, state, overwrite=True)  # probs: this loop's own
        _sync(out)
        t3 = time.perf_counter()
        model_s += t2 - t1
        refine_s += (t1 - t0) + (t3 - t2)
        labels, _ = segmenter.postprocess(out.unsqueeze(0), [gt.shape[:2]])[0]
        pred = labels == fg_class if fg_class is not None else labels != 0
        scores.add(pred, gt)
    n = _frames_scored(scores, mask_iter)
    return {
        "miou": scores.miou,
        "flicker": scores.flicker,
        "full_frac": state.full_fraction,
        "frames": n,
        "full_frames": state.full_frames,
        "temporal": params.mode,
        "model_ms": 1000.0 * model_s / max(1, state.full_frames),
        "refine_ms": 1000.0 * refine_s / n,
    }


def _frames_scored(scores: _Scores, mask_iter: Iterator[Any]) -> int:
    """Frames scored; raises when masks were left over or there was no frame at all."""
    if next(mask_iter, None) is not None:
        raise EvalInputError(f"more masks than frames: the sequence ended after {len(scores.ious)} frames")
    if not scores.ious:
        raise EvalInputError("the sequence has no frames")
    return len(scores.ious)


def _evaluate_roi(
    frames: Iterable[np.ndarray], masks: Iterable[np.ndarray], segmenter: SegmenterLike, cfg: Any
) -> dict[str, Any]:
    """``evaluate`` in ROI mode: the same ``RoiTracker`` loop the engine runs, one frame at a time."""
    from pipeline.roi import RoiTracker

    tracker = RoiTracker(cfg, segmenter.spec)
    scores = _Scores()
    model_s = roi_s = 0.0
    mask_iter = iter(masks)
    for index, image in enumerate(frames):
        try:
            gt = np.asarray(next(mask_iter)) != 0
        except StopIteration:
            raise EvalInputError(f"more frames than masks: no mask for frame {index}") from None
        t0 = time.perf_counter()
        plan, images = tracker.begin(image, index=index)
        t1 = time.perf_counter()
        probs = segmenter.infer(segmenter.preprocess(images)) if images else None
        if probs is not None:
            _sync(probs)
        t2 = time.perf_counter()
        out = tracker.finish(plan, probs)
        t3 = time.perf_counter()
        model_s += t2 - t1
        roi_s += (t1 - t0) + (t3 - t2)
        pred = out.labels == tracker.fg_class
        if pred.shape != gt.shape:
            pred = cv2.resize(pred.astype(np.uint8), gt.shape[::-1], interpolation=cv2.INTER_NEAREST) != 0
        scores.add(pred, gt)
    n = _frames_scored(scores, mask_iter)
    st = tracker.state
    inputs = st.full_passes + st.crops
    return {
        "miou": scores.miou,
        "flicker": scores.flicker,
        "full_frac": st.full_passes / n,
        "frames": n,
        "full_frames": st.full_passes,
        "temporal": "off",
        "roi": True,
        "crops_per_frame": st.crops / n,
        "inputs_per_frame": inputs / n,  # compute relative to full-frame mode (1.0)
        "model_ms": 1000.0 * model_s / max(1, inputs),
        "refine_ms": 1000.0 * roi_s / n,
    }


# -- command line ----------------------------------------------------------------------


def add_eval_parser(subparsers: Any) -> None:
    """Register ``eval`` on an argparse subparsers object (its handler in ``func`` and ``handler``)."""
    p = subparsers.add_parser(
        "eval",
        help="score a model (and temporal refinement) on frames with ground-truth masks",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("frames", metavar="FRAMES", help="directory of JPEG/PNG frames, or a video file")
    p.add_argument("masks", metavar="MASKS", help="directory of PNG masks (non-zero = foreground)")
    p.add_argument("--model", default="selfie", help="registered model name (default: selfie)")
    p.add_argument("--weights", default=None, help="weights file to load instead of the registered ones")
    p.add_argument("--temporal", choices=MODES, default="off", help="temporal refinement mode")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--roi", action="store_true", help="segment crops around the people found (ROI mode)")
    p.add_argument("--roi-full-every", type=int, default=None, help="ROI: full-frame pass every K frames")
    p.add_argument("--roi-max-regions", type=int, default=None, help="ROI: most crops per frame")
    defaults = TemporalParams()
    for name in _PARAM_FLAGS:
        default = getattr(defaults, name)
        flag, text = "--" + name.replace("_", "-"), f"temporal {name} (default: {default})"
        if isinstance(default, bool):  # --compensate / --no-compensate (type=bool reads any word as True)
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, help=text)
    p.set_defaults(func=run_eval, handler=run_eval)


def _load_segmenter(args: argparse.Namespace) -> SegmenterLike:
    from models.segmenter import Segmenter

    # One frame at a time: on a GPU, CUDA graphs (as the server's default) make that a single launch.
    seg = Segmenter.from_name(args.model, weights=args.weights, device=args.device, cuda_graphs=True)
    # What a first call does (tracing and fusing on a CPU; kernel choice and graph capture on
    # a GPU) before the first frame, so that ``model_ms`` is the model's time alone; in ROI
    # mode a batch holds a frame's crops (and the frame itself).
    from pipeline.config import RoiConfig

    regions = (args.roi_max_regions or RoiConfig().max_regions) if getattr(args, "roi", False) else 0
    seg.warmup(range(1, regions + 2))
    return seg


def _roi_config(args: argparse.Namespace) -> Any:
    flags = {"full_every": "--roi-full-every", "max_regions": "--roi-max-regions"}
    given = {"full_every": args.roi_full_every, "max_regions": args.roi_max_regions}
    if not getattr(args, "roi", False):
        stray = [flags[k] for k, v in given.items() if v is not None]
        if stray:  # a setting for a mode that is off would be ignored without a word
            raise EvalInputError(f"{', '.join(stray)} applies to ROI mode only: add --roi")
        return None
    from pydantic import ValidationError

    from pipeline.config import RoiConfig

    try:
        return RoiConfig(enabled=True, **{k: v for k, v in given.items() if v is not None})
    except ValidationError as e:  # one line per bad flag, as for config files
        bad = [
            f"{flags.get(str(err['loc'][0]), err['loc'][0])} {given.get(str(err['loc'][0]))}: {err['msg']}"
            for err in e.errors()
        ]
        raise EvalInputError("bad ROI setting " + "; ".join(bad)) from None


def run_eval(
    args: argparse.Namespace,
    *,
    load_segmenter: Callable[[argparse.Namespace], SegmenterLike] = _load_segmenter,
) -> int:
    """Run ``segstream eval``; returns the exit code (2 with one line on stderr for bad input)."""
    try:
        params = TemporalParams(
            mode=args.temporal, **{name: getattr(args, name) for name in _PARAM_FLAGS}
        )
        roi = _roi_config(args)
        seq = load_sequence(args.frames, args.masks)
        segmenter = load_segmenter(args)
        with torch.inference_mode():
            result = evaluate(seq.frames(), seq.masks(), segmenter, params, roi=roi)
    except (ValueError, FileNotFoundError, KeyError) as e:  # EvalInputError is a ValueError
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"segstream eval: error: {msg}", file=sys.stderr)
        return 2
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"model       {args.model}   temporal {params.mode}   frames {result['frames']}")
        print(f"mean IoU    {result['miou']:.4f}")
        print(f"flicker     {result['flicker']:.5f}")
        print(f"full_frac   {result['full_frac']:.3f}  ({result['full_frames']} full passes)")
        print(f"model ms    {result['model_ms']:.2f} per pass")
        if result.get("roi"):
            print(f"roi         {result['crops_per_frame']:.2f} crops/frame, "
                  f"{result['inputs_per_frame']:.2f}x full-frame compute")
        print(f"refine ms   {result['refine_ms']:.3f} per frame")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segstream")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
