"""Temporal residual refinement: stable masks across frames, less work on static scenes.

The refiner keeps explicit per-stream state (in the spirit of recurrent video models:
``refine(frame, probs, state) -> (probs, state)``), split in two calls because the
``keyframe`` mode must decide *before* the model runs:

    plan = refiner.plan(x, state, index=frame.index, discontinuity=frame.discontinuity)
    probs = model(x) if plan.run_model else None        # the engine batches these
    out, state = refiner.refine(plan, probs, state)

Everything works on the model's input (normalised N x 3 x h x w) and its class
probabilities (C x h x w), at model resolution or below. Torch ops run on whichever device
holds the tensors; float32 CPU tensors take a path through compiled kernels
(``models.kernels``, when numba is installed) or OpenCV with the same arithmetic, because a
dozen small torch calls cost more than the refinement itself there.

Modes:
- ``off``: the model's probabilities pass through unchanged.
- ``smooth``: a confidence-weighted fusion of the new probabilities with the previous
  output. The previous output counts (up to ``blend``) where two things hold: the picture
  did not change there (a motion gate from a downscaled, blurred colour residual, open from
  ``motion_low``, fully open at ``motion_high``) and the model roughly agrees with it (the
  weight falls with the squared difference of the probabilities, to zero at
  ``agreement``). Small disagreements are the model's frame-to-frame noise and are averaged
  away; a large one is a real change (something appeared, moved in, was wrong before) and
  is taken at once, so edges do not lag and errors do not persist. Where the previous
  output counts, ``hysteresis`` keeps its label unless the model disagrees by a margin.
  Pixels both maps are sure of (within 0.02 of 0 or 1) keep the new value: no label can
  change there, so on the CPU the fusion runs only inside the box around the unsure ones.
  With ``compensate`` (for moving cameras; off by default) the dominant translation
  between frames is estimated by phase correlation on the thumbnails, and both the
  residual and the previous output are taken after moving the previous frame by it; the
  shift is kept only when it clearly lowers the residual.
- ``keyframe``: the model runs only when the residual energy accumulated since the last
  full segmentation exceeds ``keyframe_energy`` (residual below ``noise_floor`` does not
  count), or after ``keyframe_max_gap`` frames; in between the last mask is carried
  forward. Full passes are blended as in ``smooth``.

State resets on an explicit discontinuity (reconnect, seek, loop), on a scene cut (mean
residual above ``scene_cut_energy``) and after a gap of more than ``max_gap_reset``
dropped frames. Shorter gaps widen the motion gate and trust the previous mask less.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models import kernels

MODES = ("off", "smooth", "keyframe")
# Rec. 601 luma weights.
_LUMA = (0.299, 0.587, 0.114)
# Low-resolution residual grid: about this many cells on the short side.
_RESIDUAL_CELLS = 64
# Energy is measured per cell of this grid and the worst cell counts.
_ENERGY_GRID = 4
# Matching cost added per cell of displacement (RGB in [0, 1]): ties go to "no motion".
_MOTION_PENALTY = 0.004
# Motion is estimated per block of this many thumbnail cells.
_BLOCK = 4
# Phase correlation: spectrum weighting (cycles per cell) and the peak a translation needs.
_LOWPASS_SIGMA = 0.15
_PEAK_MIN = 0.0
# Smaller camera motion (in thumbnail cells) is left uncompensated: within the gate's blur.
_MIN_SHIFT = 0.1
# Compensate only where that lowers the mean residual below this share of the uncompensated one.
_GAIN = 0.9


@dataclass(frozen=True, slots=True)
class TemporalParams:
    """Per-stream refinement settings. Field names match ``pipeline.config.TemporalConfig``."""

    mode: str = "off"
    motion_low: float = 0.06  # residual below this: nothing moved here, the previous output counts
    motion_high: float = 0.24  # residual above this: something moved, take the new probabilities
    blend: float = 0.85  # weight of the previous output where nothing moved and the model agrees
    keyframe_energy: float = 0.02  # accumulated residual energy that forces a full pass
    keyframe_max_gap: int = 8  # a full pass at least every this many frames
    scene_cut_energy: float = 0.25  # mean residual above this = a new scene, state resets
    hysteresis: float = 0.05  # bias toward the previous label where the previous output counts
    max_gap_reset: int = 30  # more dropped frames than this in a row = a discontinuity
    motion_search: int = 0  # smooth: follow motion up to this many residual cells per frame (0: off)
    compensate: bool = False  # smooth: follow the dominant (camera) translation between frames
    agreement: float = 0.6  # new vs previous probability gap at which the previous stops counting
    noise_floor: float = 0.02  # keyframe: residual below this is sensor noise, not motion

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"temporal mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("motion_low", "motion_high", "blend", "scene_cut_energy", "noise_floor"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if self.motion_high <= self.motion_low:
            raise ValueError(
                f"motion_high must be above motion_low, got {self.motion_high!r} <= {self.motion_low!r}"
            )
        if self.keyframe_energy < 0:
            raise ValueError(f"keyframe_energy must be >= 0, got {self.keyframe_energy!r}")
        if self.keyframe_max_gap < 1:
            raise ValueError(f"keyframe_max_gap must be >= 1, got {self.keyframe_max_gap!r}")
        if not 0.0 <= self.hysteresis < 1.0:
            raise ValueError(f"hysteresis must be in [0, 1), got {self.hysteresis!r}")
        if not 0 <= self.motion_search <= 8:
            raise ValueError(f"motion_search must be in [0, 8], got {self.motion_search!r}")
        if not 0.0 < self.agreement <= 1.0:
            raise ValueError(f"agreement must be in (0, 1], got {self.agreement!r}")
        if self.max_gap_reset < 0:
            raise ValueError(f"max_gap_reset must be >= 0, got {self.max_gap_reset!r}")


@dataclass(frozen=True, slots=True)
class TemporalState:
    """What one stream remembers between frames. Immutable: ``refine`` returns a new one.

    Tensors live on the model's device. ``thumb`` is the low-resolution picture (RGB in
    [0, 1]) of the last frame seen, ``key_thumb`` that of the last frame the model saw,
    ``probs`` the last output (C x h x w).
    """

    thumb: torch.Tensor | None = None
    key_thumb: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    last_index: int | None = None
    key_index: int | None = None
    frames: int = 0  # frames refined since the stream started
    full_frames: int = 0  # of which the model segmented fully
    dropped: int = 0  # frames missing from the index sequence (dropped upstream)
    gap: int = 0  # frames missing right before the last update
    resets: int = 0
    # (x, y, w, h) holding every pixel of ``probs`` not within _SURE of 0 or 1, where the CPU
    # blend made ``probs`` and knows it; None: anywhere.
    unsure_box: tuple[int, int, int, int] | None = None

    @property
    def empty(self) -> bool:
        return self.probs is None

    @property
    def full_fraction(self) -> float:
        return self.full_frames / self.frames if self.frames else 1.0


@dataclass(frozen=True, slots=True)
class Plan:
    """The decision for one frame, made before the model runs."""

    index: int
    run_model: bool
    reason: str  # off | first | discontinuity | scene_cut | gap | energy | max_gap | motion | carry
    thumb: torch.Tensor | None  # 1 x 3 x h' x w' low-resolution RGB (None in mode off)
    residual: torch.Tensor | None  # blurred |thumb - reference|, same grid; None after a reset
    energy: float  # keyframe: residual above the noise floor since the last frame the model saw (smooth: 0)
    gap: int  # frames missing between the previous update and this one
    reset: bool  # the previous state is dropped before this frame
    flow: torch.Tensor | None = None  # 1 x 2 x h'' x w'': where each block was in the previous frame
    gate: _CpuGate | None = None  # CPU binary path: what of the blend needs no new probabilities


def rgb_from_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB in [0, 1] (N x 3 x h x w) from normalised model input (N x 3 x h x w or 3 x h x w)."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected N x 3 x h x w model input, got shape {tuple(x.shape)}")
    x = x.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp_(0.0, 1.0)


def luma_from_input(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Luma in [0, 1] (N x 1 x h x w) from normalised model input (N x 3 x h x w or 3 x h x w)."""
    rgb = rgb_from_input(x, mean, std)
    w = torch.tensor(_LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * w).sum(dim=1, keepdim=True)


class TemporalRefiner:
    """Stateless logic; all memory is in the :class:`TemporalState` passed in and out."""

    def __init__(
        self,
        params: TemporalParams,
        *,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean!r} and {std!r}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {std!r}")
        self.params = params
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self._mean_vec = np.asarray(self.mean, np.float32)
        self._std_vec = np.asarray(self.std, np.float32)
        self._mean_hwc = self._mean_vec.reshape(1, 1, 3)
        self._std_hwc = self._std_vec.reshape(1, 1, 3)
        self._identity = self.mean == (0.0, 0.0, 0.0) and self.std == (1.0, 1.0, 1.0)
        if params.mode != "off":
            kernels.current()  # start loading the compiled kernels, if there are any

    @staticmethod
    def initial_state() -> TemporalState:
        return TemporalState()

    # -- before the model --------------------------------------------------------------

    def plan(
        self, x: torch.Tensor, state: TemporalState, *, index: int, discontinuity: bool = False
    ) -> Plan:
        """Decide whether the model must run on frame ``index`` (x: its normalised input)."""
        p = self.params
        gap = 0 if state.last_index is None else max(0, index - state.last_index - 1)
        if p.mode == "off":
            return Plan(index, True, "off", None, None, 0.0, gap, False)
        thumb, pre_step, pre_mean = self._thumbnail(x, state.thumb)
        reason = ""
        if state.empty or state.thumb is None or state.thumb.shape != thumb.shape:
            reason = "first"
        elif discontinuity:
            reason = "discontinuity"
        elif index <= (state.last_index if state.last_index is not None else -1):
            reason = "discontinuity"  # the index went backwards: a new numbering, e.g. a restart
        elif gap > p.max_gap_reset:
            reason = "gap"
        if reason:
            return Plan(index, True, reason, thumb, None, 0.0, gap, reason != "first")

        flow = None
        # the residual against the previous thumbnail, when the thumbnail's kernel made it
        step, step_mean = pre_step, pre_mean
        ref = state.thumb
        assert ref is not None  # checked above: an empty state plans a "first" frame
        if p.mode == "smooth" and p.motion_search > 0:
            step = None
            # Follow what moved (camera pans, walking people) so the previous mask can be
            # moved along with it and blended there too, instead of only where nothing moved.
            flow = _match(thumb, ref, p.motion_search)
            ref = _warp(ref, flow)
        elif p.mode == "smooth" and p.compensate:
            # Follow the camera: estimate the dominant translation and compare (and later
            # blend) against the previous frame moved by it, so only what moves on its own
            # opens the motion gate.
            shift = _global_shift(thumb, ref)
            if shift is not None and _cells(shift, thumb) >= _MIN_SHIFT:
                if step is None:
                    step, step_mean = _residual_mean(thumb, ref)
                step_moved, moved_mean = _residual_mean(thumb, _warp(ref, shift))
                if moved_mean < _GAIN * step_mean:
                    flow, step, step_mean = shift, step_moved, moved_mean
        if step is None:
            step, step_mean = _residual_mean(thumb, ref)
        if step_mean > p.scene_cut_energy:
            return Plan(index, True, "scene_cut", thumb, None, 0.0, gap, True)
        if p.mode == "smooth":
            return Plan(index, True, "motion", thumb, step, 0.0, gap, False, flow,
                        self._cpu_gate(state, step, gap, flow))

        # keyframe: compare with the frame the current mask came from, so slow drift adds up
        # while sensor noise (removed by the floor) does not.
        assert state.key_thumb is not None and state.key_index is not None
        since_key = _residual(thumb, state.key_thumb)
        energy = _energy(since_key, p.noise_floor)
        if energy > p.keyframe_energy:
            return Plan(index, True, "energy", thumb, since_key, energy, gap, False,
                        gate=self._cpu_gate(state, since_key, gap, None))
        if index - state.key_index >= p.keyframe_max_gap:
            return Plan(index, True, "max_gap", thumb, since_key, energy, gap, False,
                        gate=self._cpu_gate(state, since_key, gap, None))
        return Plan(index, False, "carry", thumb, since_key, energy, gap, False)

    # -- after the model ---------------------------------------------------------------

    def refine(
        self, plan: Plan, probs: torch.Tensor | None, state: TemporalState, *, overwrite: bool = False
    ) -> tuple[torch.Tensor, TemporalState]:
        """Refined probabilities (same shape as ``probs``) and the stream's next state.

        With ``overwrite`` the result may be written into ``probs`` itself instead of a copy:
        for a caller that hands over the model's output and does not read it again.
        """
        if plan.run_model and probs is None:
            raise ValueError(f"frame {plan.index}: the plan ran the model but no probabilities were given")
        batched = probs is not None and probs.dim() == 4
        if probs is not None:
            if batched:
                if probs.shape[0] != 1:
                    raise ValueError(
                        f"refine takes one frame's probabilities, got shape {tuple(probs.shape)}"
                    )
                probs = probs[0]
            if probs.dim() != 3:
                raise ValueError(f"expected C x h x w probabilities, got shape {tuple(probs.shape)}")
        if plan.reset:
            state = replace(
                state, thumb=None, key_thumb=None, probs=None, key_index=None, resets=state.resets + 1,
                unsure_box=None,
            )
        dropped = state.dropped + plan.gap
        common: dict[str, int] = {
            "frames": state.frames + 1, "dropped": dropped, "gap": plan.gap, "last_index": plan.index
        }

        if not plan.run_model:
            assert state.probs is not None
            out = state.probs
            new_state = replace(state, thumb=plan.thumb, **common)  # type: ignore[arg-type]
        else:
            assert probs is not None
            out = probs
            unsure_box = None
            prev = state.probs
            if plan.residual is not None and prev is not None and prev.shape == probs.shape:
                if plan.flow is not None:
                    if prev.shape[0] == 2:  # binary: background is 1 - foreground
                        fg = _warp(prev[None, 1:], plan.flow)[0]
                        prev = torch.cat((1.0 - fg, fg))
                    else:
                        prev = _warp(prev.unsqueeze(0), plan.flow)[0]
                gate = plan.gate
                if gate is not None and gate.fits(probs, prev):
                    out, unsure_box = _fuse_binary_cpu(probs, gate, self.params, overwrite)
                else:
                    out = self._blend(probs, prev, plan.residual, plan.gap, overwrite=overwrite)
            new_state = replace(
                state,
                thumb=plan.thumb,
                key_thumb=plan.thumb,
                probs=out if self.params.mode != "off" else None,
                key_index=plan.index,
                full_frames=state.full_frames + 1,
                unsure_box=unsure_box,
                **common,
            )
        return (out.unsqueeze(0) if batched else out), new_state

    def step(
        self,
        x: torch.Tensor,
        state: TemporalState,
        model: Callable[[torch.Tensor], torch.Tensor],
        *,
        index: int,
        discontinuity: bool = False,
    ) -> tuple[torch.Tensor, TemporalState, Plan]:
        """plan → model (when needed) → refine, for one frame. For offline use and tests."""
        plan = self.plan(x, state, index=index, discontinuity=discontinuity)
        probs = None
        if plan.run_model:
            probs = model(x if x.dim() == 4 else x.unsqueeze(0))[0]
        out, state = self.refine(plan, probs, state)  # the model's output may be the caller's too
        return out, state, plan

    # -- internals ---------------------------------------------------------------------

    def _thumbnail(
        self, x: torch.Tensor, ref: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """The residual's low-resolution picture of a frame: RGB in [0, 1], blurred 3 x 3.

        Blurring each thumbnail once is the same as blurring the signed difference of two
        (the blur is linear), and it leaves the residual a single absolute difference.
        Returns the thumbnail, and where the compiled kernel made it, the residual against
        ``ref`` (a previous thumbnail of the same shape) and its mean; else None and 0.
        """
        if x.dim() == 4 and x.shape[0] != 1:
            raise ValueError(f"plan takes one frame's input, got shape {tuple(x.shape)}")
        x = x if x.dim() == 4 else x.unsqueeze(0)
        h, w = x.shape[-2:]
        k = max(1, min(h, w) // _RESIDUAL_CELLS)
        # Averaging k x k blocks divides pixel noise by about k, well below the motion floor.
        # Pooling first is exact (normalisation is affine per channel) and 1/k^2 the work.
        if x.device.type == "cpu":
            # OpenCV, several times cheaper than torch's pooling on a CPU. Bilinear resizing by
            # k averages the middle 2 x 2 of each k x k block: pixel noise halves, and the blur
            # takes it well below the motion floor. The thumbnail is kept as height x width x
            # colour in memory (a channels-last tensor), so each OpenCV call takes all three
            # colours at once.
            hs, ws = -(-h // k), -(-w // k)
            hwc = x[0].detach().float().permute(1, 2, 0)
            jit = kernels.current()
            if jit is not None and hwc.is_contiguous() and k % 2 == 0 and h % k == 0 and w % k == 0:
                cells = np.empty((hs, ws, 3), np.float32)
                if ref is not None and ref.shape == (1, 3, hs, ws) and ref.dtype == torch.float32:
                    res = np.empty((hs, ws), np.float32)
                    r = _hwc(ref)
                else:
                    res, r = _NO_RESIDUAL, _NO_THUMB
                tmp = np.empty_like(cells)
                m = jit.thumbnail(hwc.numpy(), k, self._mean_vec, self._std_vec, r, tmp, cells, res)
                thumb = torch.from_numpy(cells).permute(2, 0, 1)[None]
                return thumb, (torch.from_numpy(res)[None, None] if res.size else None), float(m)
            if hwc.is_contiguous():
                # Channels-last input (the CPU segmenter's layout): resize the picture as it is
                # in memory, with no planar copy of the whole input first.
                small = cv2.resize(hwc.numpy(), (ws, hs), interpolation=cv2.INTER_LINEAR)
            else:
                planes = x[0].detach().float().numpy()
                if h % k == 0 and k > 1:
                    # Only the two middle rows of each block are read: a quarter of the memory
                    # traffic when k is 4, and that traffic is most of the cost.
                    rows = planes.reshape(3 * hs, k, w)[:, k // 2 - 1 : k // 2 + 1].reshape(6 * hs, w)
                    small = cv2.resize(rows, (ws, 3 * hs), interpolation=cv2.INTER_LINEAR)
                else:
                    small = cv2.resize(planes.reshape(3 * h, w), (ws, 3 * hs), interpolation=cv2.INTER_LINEAR)
                small = cv2.merge(list(np.asarray(small, np.float32).reshape(3, hs, ws)))
            small = np.asarray(small, np.float32).reshape(hs, ws, 3)
            if not self._identity:
                np.multiply(small, self._std_hwc, out=small)
                np.add(small, self._mean_hwc, out=small)
            # Colour, not just luma: an object can differ from what it covers only in hue.
            # Clipped to [0, 1] with two thresholds: a third of np.clip's cost at this size.
            cv2.threshold(small, 1.0, 1.0, cv2.THRESH_TRUNC, dst=small)
            cv2.threshold(small, 0.0, 0.0, cv2.THRESH_TOZERO, dst=small)
            small = cv2.blur(small, (3, 3), borderType=cv2.BORDER_REPLICATE)
            return torch.from_numpy(small).permute(2, 0, 1)[None], None, 0.0
        if k > 1:
            x = F.avg_pool2d(x.float(), k, stride=k, ceil_mode=True)
        rgb = rgb_from_input(x, self.mean, self.std)
        return F.avg_pool2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, stride=1), None, 0.0

    def _gates(self, gap: int) -> tuple[float, float, float]:
        """The motion gate's thresholds after ``gap`` missing frames, and the trust left."""
        p = self.params
        # Missing frames hide motion we did not see: lower both thresholds and trust less.
        trust = 1.0 / (1 + gap)
        return p.motion_low * trust, p.motion_high * trust, trust

    def _cpu_gate(
        self, state: TemporalState, residual: torch.Tensor, gap: int, flow: torch.Tensor | None
    ) -> _CpuGate | None:
        """The CPU binary blend's work that needs no new probabilities, done before the
        model runs: the motion gate and the previous output's foreground and unsure pixels.
        (Right after the network the same OpenCV calls cost two to three times as much: its
        working set has pushed theirs out of the caches.) None where that path does not apply."""
        prev = state.probs
        if (
            flow is not None
            or self.params.blend <= 0
            or prev is None
            or prev.dim() != 3
            or prev.shape[0] != 2
            or not (prev.device.type == residual.device.type == "cpu")
            or not (prev.dtype == residual.dtype == torch.float32)
        ):
            return None
        lo, hi, trust = self._gates(gap)
        return _gate_binary_cpu(prev, residual, lo, hi, trust, self.params, state.unsure_box)

    def _blend(
        self,
        new: torch.Tensor,
        prev: torch.Tensor,
        residual: torch.Tensor,
        gap: int,
        *,
        overwrite: bool = False,
    ) -> torch.Tensor:
        """Fuse the model's new probabilities with the previous output, pixel by pixel.

        The previous output counts (up to ``blend``) only where two things hold: the picture
        did not change there (residual below the motion gate) and the model roughly agrees
        with it (probabilities within ``agreement``). Small disagreements are the model's
        frame-to-frame noise and are averaged away; a large one is a real change (something
        appeared, moved in, or was wrongly segmented before) and is taken at once, so the
        output neither lags nor drifts. Where the previous output counts, ``hysteresis``
        keeps its label unless the model disagrees by a margin.
        """
        p = self.params
        lo, hi, trust = self._gates(gap)
        if (
            new.shape[0] == 2
            and p.blend > 0
            and new.device.type == prev.device.type == residual.device.type == "cpu"
            and new.dtype == prev.dtype == residual.dtype == torch.float32
        ):
            return _fuse_binary_cpu(new, _gate_binary_cpu(prev, residual, lo, hi, trust, p), p, overwrite)[0]
        # Dilate so the whole neighbourhood of a moving edge counts as moving (no lag there).
        moving = F.max_pool2d(residual, 3, stride=1, padding=1)
        still = (1.0 - ((moving - lo) / (hi - lo)).clamp(0.0, 1.0)) * trust
        still = F.interpolate(still, size=new.shape[-2:], mode="bilinear", align_corners=False)[0]
        binary = new.shape[0] == 2  # the background channel is 1 - foreground: half the work
        a, b = (new[1:], prev[1:]) if binary else (new, prev)
        diff = (a - b).square()
        if binary:
            unsure = ((a >= _SURE) & (a <= 1.0 - _SURE)) | ((b >= _SURE) & (b <= 1.0 - _SURE))
        else:
            diff = diff.amax(0, keepdim=True)
            unsure = (a.amax(0, keepdim=True) <= 1.0 - _SURE) | (b.amax(0, keepdim=True) <= 1.0 - _SURE)
        # 1 for identical probabilities, falling to 0 at a difference of ``agreement``; 0 where
        # both maps are sure of the pixel (they agree, and no label can change, or they are
        # far apart and the new one counts anyway).
        weight = still * (1.0 - diff / p.agreement**2).clamp(min=0.0) * unsure
        out = torch.lerp(a, b, p.blend * weight)
        if p.hysteresis > 0:
            # Favour the previous label: a pixel near the decision boundary must be won by a
            # margin before it flips. (amax, not argmax: argmax over classes is slow on CPU)
            label = (b >= 0.5) if binary else (b >= b.amax(0, keepdim=True))
            bias = p.hysteresis * weight
            out = (out + bias * label.to(out.dtype)) / (1.0 + bias)
        return torch.cat((1.0 - out, out)) if binary else out


_KERNEL3 = np.ones((3, 3), np.uint8)
# Placeholders for the thumbnail kernel when there is no previous thumbnail to compare with.
_NO_THUMB = np.zeros((0, 0, 3), np.float32)
_NO_RESIDUAL = np.zeros((0, 0), np.float32)
# A probability within this of 0 or 1 is sure: where both maps are sure of a pixel, the new
# value is taken as it is (they agree on its label, or they are far apart and it counts anyway).
_SURE = 0.02
_BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))


@dataclass(frozen=True, slots=True)
class _CpuGate:
    """The part of a two-class CPU blend that depends only on the previous output and the
    residual: the weight the previous output may get (motion gate times ``blend``, over 255
    for the unsure mask's scale) at residual resolution, the previous foreground and its
    unsure pixels."""

    prev: torch.Tensor  # the previous output it was made from
    still: np.ndarray  # h' x w' float32, residual resolution
    prev_fg: np.ndarray  # h x w float32, contiguous
    # h x w uint8, 255 where the previous output is unsure; None when the compiled kernels
    # made the gate (the fusion kernel tests the previous output pixel by pixel)
    prev_unsure: np.ndarray | None
    prev_rect: tuple[int, int, int, int]  # (x, y, w, h) bounding ``prev_unsure``; w = 0: none

    def fits(self, new: torch.Tensor, prev: torch.Tensor) -> bool:
        return (
            prev is self.prev
            and new.device.type == "cpu"
            and new.dtype == torch.float32
            and new.dim() == 3
            and new.shape[0] == 2
            and tuple(new.shape[-2:]) == self.prev_fg.shape
        )


def _gate_binary_cpu(
    prev: torch.Tensor,
    residual: torch.Tensor,
    lo: float,
    hi: float,
    trust: float,
    p: TemporalParams,
    prev_box: tuple[int, int, int, int] | None = None,
) -> _CpuGate:
    """The first half of ``TemporalRefiner._blend`` for two-class float32 CPU tensors.
    ``prev_box``, when known, holds every unsure pixel of ``prev``: only it is scanned."""
    b = np.ascontiguousarray(prev.numpy()[1])
    r = np.ascontiguousarray(residual.reshape(residual.shape[-2:]).numpy())
    # still = (1 - clip((moving - lo) / (hi - lo), 0, 1)) * trust, here times blend as well,
    # and over 255 for the unsure mask's scale; moving: the residual's 3 x 3 maximum
    scale = trust * p.blend / 255.0
    jit = kernels.current()
    if jit is not None:
        # The same gate in one pass; the fusion kernel tests each pixel of ``prev`` itself,
        # so only the box around its unsure pixels is needed.
        still = np.empty_like(r)
        x0, y0, bw, bh = prev_box if prev_box is not None else (0, 0, b.shape[1], b.shape[0])
        rect = jit.gate(r, lo, hi, scale, still, b, x0, y0, bw, bh, _SURE)
        return _CpuGate(prev, still, b, None, rect)
    moving = cv2.dilate(r, _KERNEL3)
    still = cv2.addWeighted(moving, -scale / (hi - lo), moving, 0.0, scale * (1.0 + lo / (hi - lo)))
    cv2.threshold(still, scale, scale, cv2.THRESH_TRUNC, dst=still)  # clip to [0, scale],
    cv2.threshold(still, 0.0, 0.0, cv2.THRESH_TOZERO, dst=still)  # cheaper than np.clip here
    if prev_box is None:
        unsure = cv2.inRange(b, _SURE, 1.0 - _SURE)
        x, y, w, h = cv2.boundingRect(unsure)
        rect = (x, y, w, h)
    else:
        unsure = np.zeros(b.shape, np.uint8)
        x0, y0, bw, bh = prev_box
        rect = (0, 0, 0, 0)
        if bw and bh:
            box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
            unsure[box] = cv2.inRange(b[box], _SURE, 1.0 - _SURE)
            x, y, w, h = cv2.boundingRect(unsure[box])
            rect = (x + x0, y + y0, w, h)
    return _CpuGate(prev, still, b, unsure, rect)


def _union(r: tuple[int, int, int, int], q: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The smallest (x, y, w, h) rectangle holding both (an empty one, w or h 0, holds nothing)."""
    if not (r[2] and r[3]):
        return q if q[2] and q[3] else (0, 0, 0, 0)
    if not (q[2] and q[3]):
        return r
    x0, y0 = min(r[0], q[0]), min(r[1], q[1])
    x1, y1 = max(r[0] + r[2], q[0] + q[2]), max(r[1] + r[3], q[1] + q[3])
    return x0, y0, x1 - x0, y1 - y0


def _upsampled(small: np.ndarray, size: tuple[int, int], box: tuple[slice, slice]) -> np.ndarray:
    """``cv2.resize(small, (w, h), INTER_LINEAR)[box]`` (half-pixel bilinear, as torch's
    interpolation), computed for the box only when the scale is a whole number."""
    (h, w), (hs, ws) = size, small.shape
    if h % hs or w % ws:
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)[box]
    crops = []
    for sl, n, s in ((box[0], hs, h // hs), (box[1], ws, w // ws)):
        # source cells the box's samples fall between (output o samples (o + 0.5) / s - 0.5)
        c0 = max(0, (2 * sl.start + 1 - s) // (2 * s))
        c1 = min(n, (2 * sl.stop - 1 - s) // (2 * s) + 2)
        crops.append((c0, c1, s))
    (y0, y1, sy), (x0, x1, sx) = crops
    # The same sample positions as the whole picture's resize: a crop starting at cell c
    # maps to output c * s, and it holds every neighbour the box's samples read.
    part = cv2.resize(small[y0:y1, x0:x1], ((x1 - x0) * sx, (y1 - y0) * sy), interpolation=cv2.INTER_LINEAR)
    rows = slice(box[0].start - y0 * sy, box[0].stop - y0 * sy)
    return part[rows, box[1].start - x0 * sx : box[1].stop - x0 * sx]


def _fuse_binary_cpu(
    new: torch.Tensor, gate: _CpuGate, p: TemporalParams, overwrite: bool = False
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The second half: fuse the model's new probabilities with the previous output.

    The same arithmetic as the torch path on the foreground channel. The fusion only runs
    inside the bounding box of the pixels that either map is unsure of (a person's outline,
    typically a few percent of the picture); everywhere else the new probabilities are
    taken as they are, which is what the torch path computes there too. With ``overwrite``
    the result is written into ``new``. Also returns that box: the output is sure outside it.
    """
    out = new.numpy() if overwrite else np.array(new.numpy())
    a, b = out[1], gate.prev_fg
    prev_unsure = gate.prev_unsure
    if prev_unsure is None:
        jit = kernels.current()  # loaded: it made the gate
        if jit is not None and out[0].flags.c_contiguous and out[1].flags.c_contiguous:
            per_weight = p.hysteresis / p.blend if p.hysteresis > 0 else 0.0
            box = jit.fuse(
                out[0], out[1], b, np.asarray(gate.prev_rect, np.int64), gate.still, 255.0, _SURE,
                1.0 / p.agreement**2, per_weight,
            )
            return (new if overwrite else torch.from_numpy(out)), tuple(box)
        prev_unsure = cv2.inRange(b, _SURE, 1.0 - _SURE)
    new_unsure = cv2.inRange(a, _SURE, 1.0 - _SURE)
    x, y, w, h = cv2.boundingRect(new_unsure)
    x0, y0, bw, bh = _union((x, y, w, h), gate.prev_rect)
    if bw and bh:
        box = (slice(y0, y0 + bh), slice(x0, x0 + bw))
        ab, bb = a[box], b[box]
        unsure = cv2.bitwise_or(new_unsure[box], prev_unsure[box])
        diff = cv2.subtract(bb, ab)
        # weight *= 1 - min(1, (diff / agreement)^2), as weight - weight * min(...)
        sq = cv2.multiply(diff, diff, scale=1.0 / p.agreement**2)
        cv2.threshold(sq, 1.0, 1.0, cv2.THRESH_TRUNC, dst=sq)
        weight = _upsampled(gate.still, a.shape, box)
        weight = cv2.subtract(weight, cv2.multiply(weight, sq, dst=sq))
        np.multiply(weight, unsure, out=weight)  # the mask is 0 or 255
        fb = np.array(ab)
        cv2.accumulateProduct(diff, weight, fb)  # fg = a + (b - a) * weight
        if p.hysteresis > 0:
            # fg = (fg + bias * label) / (1 + bias), bias = hysteresis * weight (without blend)
            label = cv2.threshold(bb, _BELOW_HALF, 1.0, cv2.THRESH_BINARY)[1]  # b >= 0.5
            bias = weight * np.float32(p.hysteresis / p.blend)
            cv2.accumulateProduct(bias, label, fb)
            bias += np.float32(1.0)
            cv2.divide(fb, bias, dst=fb)
        out[1][box] = fb
        np.subtract(np.float32(1.0), fb, out=out[0][box])
    return (new if overwrite else torch.from_numpy(out)), (x0, y0, bw, bh)


def _mean(t: torch.Tensor) -> float:
    if t.device.type == "cpu" and t.dtype == torch.float32:
        return float(cv2.mean(t.reshape(t.shape[-2:]).numpy())[0])  # one call, not torch's several
    return float(t.mean())


def _match(cur: torch.Tensor, ref: torch.Tensor, radius: int) -> torch.Tensor:
    """Block matching on thumbnails: where each block of ``cur`` was in ``ref``.

    Every integer offset within ``radius`` cells is tried on brightness; costs are summed
    over blocks of 4 x 4 cells and a small penalty per cell of displacement keeps flat
    areas at zero motion. Returns the offsets as a 1 x 2 x h/4 x w/4 field in grid_sample's
    normalised coordinates (x, y).
    """
    n, _, h, w = cur.shape
    r, side = radius, 2 * radius + 1
    cur_y, ref_y = cur.mean(dim=1, keepdim=True), ref.mean(dim=1, keepdim=True)
    padded = F.pad(ref_y, (r, r, r, r), mode="replicate")
    # every shifted copy of ref at once, as a view: n x 1 x side x side x h x w
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    costs = (cur_y[:, :, None, None] - windows).abs().reshape(n, side * side, h, w)
    cost = F.avg_pool2d(costs, _BLOCK, stride=_BLOCK, ceil_mode=True)
    d = torch.arange(-r, r + 1, device=cur.device, dtype=cur.dtype)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    cost = cost + _MOTION_PENALTY * torch.maximum(dx.abs(), dy.abs()).reshape(1, -1, 1, 1)
    # argmin over a contiguous last dimension: much faster on CPU than over dim 1
    best = cost.permute(0, 2, 3, 1).contiguous().argmin(dim=-1)
    table = torch.stack((dx.flatten() * (2.0 / w), dy.flatten() * (2.0 / h)), dim=1)
    return table[best].permute(0, 3, 1, 2)


def _global_shift(cur: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """Dominant translation between two thumbnails by phase correlation.

    Returns a 1 x 2 x 1 x 1 flow (grid_sample's normalised x, y) such that ``cur`` at p
    looks like ``ref`` at p + flow, or None when no translation stands out.
    """
    _, _, h, w = cur.shape
    a = cur.mean(dim=1)[0]
    b = ref.mean(dim=1)[0]
    win = _hann(h, w, cur.device, cur.dtype)
    # Small DFTs as matrix products: torch.fft's thread pool costs far more than the
    # transform itself at this size on a busy CPU.
    (ch, sh), (cw, sw) = _dft(h, cur.device, cur.dtype), _dft(w, cur.device, cur.dtype)
    both = torch.stack(((a - a.mean()) * win, (b - b.mean()) * win))
    cx, sx = both @ cw, both @ sw
    re = ch @ cx - sh @ sx  # real part of the 2-D DFT
    im = ch @ sx + sh @ cx  # minus its imaginary part
    # cross-power spectrum B * conj(A), then its inverse DFT (real part)
    cr = re[1] * re[0] + im[1] * im[0]
    ci = re[1] * im[0] - im[1] * re[0]
    scale = _lowpass(h, w, cur.device, cur.dtype) / (torch.sqrt(cr * cr + ci * ci) + 1e-6)
    cr, ci = cr * scale, ci * scale
    corr = (ch @ cr - sh @ ci) @ cw - (ch @ ci + sh @ cr) @ sw
    peak = int(corr.argmax())
    py, px = divmod(peak, w)
    top = corr[py, px]
    if float(top) < _PEAK_MIN * float(corr.abs().sum()) / (h * w) ** 0.5:
        return None

    def sub(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> float:
        den = float(c0 - 2 * c1 + c2)
        return 0.0 if den >= 0 else max(-0.5, min(0.5, 0.5 * float(c0 - c2) / den))

    dy = py + sub(corr[(py - 1) % h, px], top, corr[(py + 1) % h, px])
    dx = px + sub(corr[py, (px - 1) % w], top, corr[py, (px + 1) % w])
    dy = dy - h if dy > h / 2 else dy
    dx = dx - w if dx > w / 2 else dx
    return torch.tensor([dx * 2.0 / w, dy * 2.0 / h], device=cur.device, dtype=cur.dtype).view(1, 2, 1, 1)


def _cells(flow: torch.Tensor, thumb: torch.Tensor) -> float:
    """Length of a global flow in thumbnail cells (largest of x and y)."""
    h, w = thumb.shape[-2:]
    return max(abs(float(flow[0, 0])) * w / 2, abs(float(flow[0, 1])) * h / 2)


_WINDOWS: dict[tuple, torch.Tensor] = {}


def _hann(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = ("hann", h, w, device, dtype)
    if key not in _WINDOWS:
        wy = torch.hann_window(h, periodic=False, device=device, dtype=dtype)
        wx = torch.hann_window(w, periodic=False, device=device, dtype=dtype)
        _WINDOWS[key] = wy[:, None] * wx[None, :]
    return _WINDOWS[key]


def _dft(n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    key = ("dft", n, device, dtype)
    if key not in _WINDOWS:
        k = torch.arange(n, dtype=torch.float64)
        angle = (2 * torch.pi / n) * torch.outer(k, k)
        _WINDOWS[key] = torch.stack((angle.cos(), angle.sin())).to(device=device, dtype=dtype)
    c, s = _WINDOWS[key]
    return c, s


def _lowpass(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = ("low", h, w, device, dtype)
    if key not in _WINDOWS:
        fy = torch.fft.fftfreq(h, device=device, dtype=dtype)[:, None]
        fx = torch.fft.fftfreq(w, device=device, dtype=dtype)[None, :]
        _WINDOWS[key] = torch.exp(-(fy**2 + fx**2) / (2 * _LOWPASS_SIGMA**2))
    return _WINDOWS[key]


def _warp(t: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``t`` (N x C x H x W) at each position plus ``flow`` (normalised, upsampled)."""
    _, _, hh, ww = t.shape
    if flow.shape[-2:] != (hh, ww) and flow.shape[-2:] != (1, 1):
        flow = F.interpolate(flow, size=(hh, ww), mode="bilinear", align_corners=False)
    ys = torch.linspace(-1 + 1 / hh, 1 - 1 / hh, hh, device=t.device, dtype=t.dtype)
    xs = torch.linspace(-1 + 1 / ww, 1 - 1 / ww, ww, device=t.device, dtype=t.dtype)
    gx = (xs.view(1, 1, ww) + flow[:, 0]).expand(-1, hh, ww)
    gy = (ys.view(1, hh, 1) + flow[:, 1]).expand(-1, hh, ww)
    grid = torch.stack((gx, gy), dim=-1)
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _cpu_thumbs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device.type == b.device.type == "cpu" and a.dtype == b.dtype == torch.float32 and a.shape[0] == 1


def _residual_mean(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``_residual(a, b)`` and its mean."""
    jit = kernels.current()
    if jit is not None and _cpu_thumbs(a, b):
        ha, hb = _hwc(a), _hwc(b)
        out = np.empty(ha.shape[:2], np.float32)
        m = jit.residual(ha, hb, out)
        return torch.from_numpy(out)[None, None], float(m)
    r = _residual(a, b)
    return r, _mean(r)


def _residual(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest per-channel difference of two (blurred) thumbnails, 1 x 1 x h x w.

    The thumbnails are blurred before the difference is taken (see ``_thumbnail``): that
    averages pixel noise away while a real change, coherent over neighbouring cells, keeps
    its size.
    """
    if _cpu_thumbs(a, b):
        jit = kernels.current()
        if jit is not None:
            return _residual_mean(a, b)[0]
        d = cv2.absdiff(_hwc(a), _hwc(b))
        # The largest of the three colours, pairwise: a third of cv2.reduce's time on rows of 3.
        m = np.maximum(d[..., 0], d[..., 1])
        np.maximum(m, d[..., 2], out=m)
        return torch.from_numpy(m)[None, None]
    return (a - b).abs().amax(dim=1, keepdim=True)


def _hwc(t: torch.Tensor) -> np.ndarray:
    """A 1 x 3 x h x w CPU thumbnail as an h x w x 3 array (no copy for ``_thumbnail``'s own)."""
    return np.ascontiguousarray(t[0].permute(1, 2, 0).numpy())


def _energy(residual: torch.Tensor, floor: float) -> float:
    """Residual above the noise floor, averaged over the most-changed sixteenth of the frame.

    Noise contributes nothing; a small object moving fast counts as much as it would if it
    filled the frame, so its mask is never carried forward stale.
    """
    if residual.device.type == "cpu" and residual.dtype == torch.float32:
        r = residual.reshape(residual.shape[-2:]).numpy()
        above = cv2.threshold(r, floor, 0.0, cv2.THRESH_TOZERO)[1]
        return float(cv2.resize(above, (_ENERGY_GRID, _ENERGY_GRID), interpolation=cv2.INTER_AREA).max())
    moved = residual * (residual > floor)
    return float(F.adaptive_avg_pool2d(moved, _ENERGY_GRID).amax())
