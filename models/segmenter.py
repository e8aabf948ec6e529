"""The engine's one entry point to a network: batched pre-processing, inference, post-processing.

Everything runs on the segmenter's device. Images of any sizes come in as RGB uint8 H×W×3 numpy
arrays; images of the same size are stacked and converted once. Resizing follows the model's spec:
``stretch`` to the input size, or ``letterbox`` (fit inside, pad with the mean colour, i.e. zero
after normalisation) with the padding cropped away again on the way out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.device import resolve_device
from models.registry import ModelSpec, build_model

PRECISIONS = ("fp32", "fp16", "bf16", "auto")
_MAX_FROZEN = 4  # image shapes with a frozen graph each; further shapes run eagerly
_MAX_CUDA_GRAPHS = 32  # input shapes (batch size included) with a captured CUDA graph each
_Graph = tuple[torch.Tensor, "torch.cuda.CUDAGraph", torch.Tensor]  # static input, graph, static output
_HOST_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}

log = logging.getLogger(__name__)


def letterbox_box(src: tuple[int, int], dst: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside a letterboxed ``dst`` canvas."""
    scale = min(dst[0] / src[0], dst[1] / src[1])
    h, w = max(1, round(src[0] * scale)), max(1, round(src[1] * scale))
    return (dst[0] - h) // 2, (dst[1] - w) // 2, h, w


def input_box(spec: ModelSpec, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of ``size`` inside the model's input."""
    th, tw = spec.input_size
    if spec.resize == "letterbox":
        return letterbox_box(size, (th, tw))
    return 0, 0, th, tw


def _shrink(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x 3 x H x W resized to ``size``: bilinear with antialiasing, which matters when shrinking
    camera frames 4-8x; the CPU kernel also takes uint8 directly."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _scaled(x: torch.Tensor, size: tuple[int, int], scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """uint8 N x 3 x H x W shrunk to ``size`` and normalised: the one definition of the model's
    input, shared by :meth:`Segmenter.preprocess` and :func:`prepare_input` (so they agree bit for
    bit). The CPU kernel shrinks uint8 directly; devices shrink float. The multiply reads the
    uint8 pixels as float (exactly) and the shift is added in place: the same two roundings as
    ``x.float() * scale + shift``, with one temporary instead of three."""
    x = _shrink(x, size) if x.device.type == "cpu" else _shrink(x.float(), size)
    return torch.mul(x, scale).add_(shift)


def _normalisation(spec: ModelSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), 1 x 3 x 1 x 1 float32: ``(x / 255 - mean) / std`` as one multiply-add."""
    if str(device) == "cpu":
        return _cpu_normalisation(tuple(spec.mean), tuple(spec.std))
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


@functools.lru_cache(maxsize=32)
def _cpu_normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return 1.0 / (255.0 * s), -m / s  # shared by every caller: never written to


def prepare_input(spec: ModelSpec, image: np.ndarray) -> np.ndarray:
    """The model's input for one frame (RGB uint8 HxWx3), made on the CPU by any thread.

    float32 th x tw x 3 (channels-last), shrunk, normalised and letterboxed exactly as
    :meth:`Segmenter.preprocess` does on a CPU, bit for bit: a capture thread makes it beside
    the engine, and :meth:`Segmenter.from_prepared` turns a batch of them into the network's
    input without another pass over the pixels.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 HxWx3, got {image.dtype} {image.shape}")
    th, tw = spec.input_size
    top, left, bh, bw = input_box(spec, (int(image.shape[0]), int(image.shape[1])))
    scale, shift = _normalisation(spec)
    x = torch.from_numpy(image if image.flags.writeable else image.copy()).permute(2, 0, 1)[None]
    # letterbox padding: the mean colour, zero after normalising
    out = np.empty((th, tw, 3), np.float32) if (bh, bw) == (th, tw) else np.zeros((th, tw, 3), np.float32)
    with torch.inference_mode():
        x = _scaled(x, (bh, bw), scale, shift)  # channels-first, as the shrink makes it
        # Into the channels-last array with torch's transposing copy (about twice as fast as
        # numpy's ascontiguousarray of the permuted view at 256x256).
        torch.from_numpy(out)[top : top + bh, left : left + bw].permute(2, 0, 1)[None].copy_(x)
    return out


def _resolve_device(device: str | torch.device) -> torch.device:
    return torch.device(resolve_device(str(device)))


class Segmenter:
    def __init__(
        self,
        module: nn.Module,
        spec: ModelSpec,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
        optimize: bool | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        """``optimize`` (default: on for CPU fp32 without ``compile``) runs the network as a frozen
        TorchScript graph in channels-last layout, traced once per input shape on first use; if
        tracing fails the segmenter logs why and stays eager.

        ``cuda_graphs`` (CUDA only; ignored elsewhere) captures the whole forward pass (layout,
        autocast, network, softmax) as one CUDA graph per input shape on first use, or at
        :meth:`warmup`, and replays it: one launch instead of hundreds, which is what a small
        model at a small batch is bound by. With ``compile`` it selects torch.compile's own
        CUDA-graph mode (``reduce-overhead``) instead."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.spec = spec
        self.device = _resolve_device(device)
        if precision == "auto":
            precision = "fp16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self._amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        if optimize is None:
            optimize = self.device.type == "cpu" and self._amp_dtype is None and not compile
        self.optimize = optimize
        # oneDNN's depthwise and 1×1 kernels are fastest on NHWC memory, so the optimised path uses it.
        channels_last = channels_last or optimize
        self.channels_last = channels_last
        self._frozen: dict[tuple[int, ...], Callable[[torch.Tensor], torch.Tensor] | None] = {}
        on_cuda = self.device.type == "cuda"
        self.cuda_graphs = cuda_graphs and on_cuda
        # Captured graphs share one memory pool and one capture stream; every replay's output is
        # copied out before the next replay (see _graphed), so one graph's buffers never hold
        # another's live result.
        self._graphs: dict[tuple[int, ...], _Graph | None] = {}
        self._graph_pool: Any = None  # torch.cuda.graph_pool_handle(), made at the first capture
        self._capture_stream: Any = None
        self._failed_graph: Any = None  # a capture that broke; see _capture
        self._warm_batch = 0  # the largest batch captured at warm-up; larger batches replay in parts
        if on_cuda:
            # Inputs have one image size per model: cuDNN picks its fastest kernels once per
            # batch size, at warm-up (every size the engine forms is warmed on a GPU).
            torch.backends.cudnn.benchmark = True
        module = module.eval().to(self.device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if compile:
            mode = "reduce-overhead" if self.cuda_graphs else None
            self.cuda_graphs = False  # torch.compile captures its own graphs in that mode
            module = torch.compile(module, mode=mode)  # type: ignore[assignment]
        self.module: nn.Module = module
        self._scale, self._shift = _normalisation(spec, self.device)

    @classmethod
    def from_name(
        cls,
        name: str,
        *,
        weights: str | None = None,
        device: str | torch.device = "auto",
        precision: str = "auto",
        channels_last: bool | None = None,
        compile: bool = False,
        optimize: bool | None = None,
        cuda_graphs: bool = False,
    ) -> Segmenter:
        dev = _resolve_device(device)  # an unusable device is refused before any weights are read
        module, spec = build_model(name, weights=weights)
        if channels_last is None:
            channels_last = dev.type == "cuda"
        return cls(
            module,
            spec,
            device=dev,
            precision=precision,
            channels_last=channels_last,
            compile=compile,
            optimize=optimize,
            cuda_graphs=cuda_graphs,
        )

    # -- pre-processing ------------------------------------------------------------------
    def _to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Same-shape H×W×3 arrays as one N×3×H×W tensor on the device (a view of NHWC memory,
        i.e. channels-last).

        On the CPU a single array is viewed, not copied, and several are stacked once. On CUDA
        they are written straight into a page-locked host buffer from torch's caching host
        allocator and copied to the device without blocking; the allocator hands that buffer
        out again only after the copy has finished, so no frame is overwritten in flight.
        """
        first = arrays[0]
        if self.device.type == "cuda":
            host = torch.empty((len(arrays), *first.shape), dtype=_HOST_DTYPES[first.dtype], pin_memory=True)
            staged = host.numpy()
            for i, a in enumerate(arrays):
                staged[i] = a
            t = host.to(self.device, non_blocking=True)
        else:
            batch = first[None] if len(arrays) == 1 else np.stack(arrays)
            if not batch.flags.writeable or not batch.flags.c_contiguous:
                batch = np.array(batch, order="C")  # torch wants writable memory; frames are never written to
            t = torch.from_numpy(batch)
            if self.device.type != "cpu":
                t = t.to(self.device)
        return t.permute(0, 3, 1, 2)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        if len(images) == 0:
            raise ValueError("preprocess needs at least one image")
        th, tw = self.spec.input_size
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(
            (len(images), 3, th, tw), dtype=torch.float32, device=self.device, memory_format=layout
        )
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image {i}: expected RGB uint8 HxWx3, got {img.dtype} {img.shape}")
            groups.setdefault((img.shape[0], img.shape[1]), []).append(i)
        for (h, w), idx in groups.items():
            x = self._to_device([images[i] for i in idx])
            top, left, bh, bw = input_box(self.spec, (h, w))
            x = _scaled(x, (bh, bw), self._scale, self._shift)
            if len(idx) == len(images):  # one image size (the usual case): rows in order
                if (bh, bw) != (th, tw):
                    out.zero_()  # the letterbox padding: the mean colour, zero after normalising
                out[:, :, top : top + bh, left : left + bw] = x
                continue
            canvas = x
            if (bh, bw) != (th, tw):
                canvas = torch.zeros((len(idx), 3, th, tw), dtype=torch.float32, device=self.device)
                canvas[:, :, top : top + bh, left : left + bw] = x
            if self.device.type == "cpu":
                # Row by row: index_copy_ into a channels-last batch is several times slower
                # than these copies (mixed sizes are ROI mode's usual case: frames and crops).
                for j, i in enumerate(idx):
                    out[i].copy_(canvas[j])
            else:
                out.index_copy_(0, self._rows(idx), canvas)
        return out

    def _rows(self, idx: list[int]) -> torch.Tensor:
        """Row indices on the device. On CUDA from pinned memory without blocking: a plain
        ``torch.tensor(idx, device=...)`` waits for all the work queued before it."""
        rows = torch.tensor(idx)
        if self.device.type == "cuda":
            return rows.pin_memory().to(self.device, non_blocking=True)
        return rows.to(self.device)

    def from_prepared(self, inputs: Sequence[np.ndarray]) -> torch.Tensor:
        """The network's input (N x 3 x th x tw, channels-last memory) from :func:`prepare_input`
        arrays: one stack (none for a single frame), then a view."""
        if len(inputs) == 0:
            raise ValueError("from_prepared needs at least one input")
        th, tw = self.spec.input_size
        for i, a in enumerate(inputs):
            if a.shape != (th, tw, 3) or a.dtype != np.float32:
                raise ValueError(f"input {i}: expected float32 {th}x{tw}x3, got {a.dtype} {a.shape}")
        return self._to_device(inputs)

    # -- inference -----------------------------------------------------------------------
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities N×C×h×w (float32) at the model's resolution."""
        if self.cuda_graphs:
            out = self._graphed(x)
            if out is not None:
                return out
        run = self._runner(x)  # tracing, if any, must happen outside inference mode
        with torch.inference_mode():
            return self._forward(x, run)

    def _forward(self, x: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Layout, network (under autocast for fp16/bf16) and probabilities: everything a CUDA
        graph captures."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._amp_dtype is not None:
            # No cast cache: cached weight casts would outlive a graph capture's memory pool.
            with torch.autocast(device_type=self.device.type, dtype=self._amp_dtype, cache_enabled=False):
                logits = run(x)
        else:
            logits = run(x)
        logits = logits.float()
        if self.spec.binary:
            p = torch.sigmoid(logits[:, :1])
            return torch.cat([1.0 - p, p], dim=1)
        return torch.softmax(logits, dim=1)

    @property
    def cuda_graph_shapes(self) -> list[tuple[int, ...]]:
        """The input shapes (N, 3, H, W) that replay a captured CUDA graph, in capture order."""
        return [k for k, v in self._graphs.items() if v is not None]

    def _graphed(self, x: torch.Tensor) -> torch.Tensor | None:
        """The forward pass replayed from the CUDA graph for ``x``'s shape (captured on first
        use), or None where there is none (too many shapes, or capture failed: eager then).

        A batch larger than every size captured at warm-up (ROI crops add rows to a batch)
        replays in parts of the largest warmed size, so no capture, and no stall of every
        stream behind it, happens while frames are live."""
        n, step = x.shape[0], self._warm_batch
        if step and n > step and tuple(x.shape) not in self._graphs:
            parts = [self._graphed(x[i : i + step]) for i in range(0, n, step)]
            return None if any(p is None for p in parts) else torch.cat(parts)  # type: ignore[arg-type]
        key = tuple(x.shape)
        if key not in self._graphs:
            if not self.cuda_graphs:  # a capture broke: no more attempts
                return None
            self._graphs[key] = self._capture(x) if len(self._graphs) < _MAX_CUDA_GRAPHS else None
        entry = self._graphs[key]
        if entry is None:
            return None
        static_in, graph, static_out = entry
        with torch.inference_mode(), torch.cuda.device(self.device):
            static_in.copy_(x)
            graph.replay()
            return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: torch.Tensor) -> _Graph | None:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        # On this segmenter's GPU (cuda:1 included): graphs capture the current device's streams.
        with torch.cuda.device(self.device):
            try:
                with torch.inference_mode():
                    static_in = torch.empty_like(x, memory_format=fmt)
                    static_in.copy_(x)
                    # Warm-up runs on a side stream (cuDNN picks its kernels, lazy state is
                    # built), as capturing requires; then one capture of the whole forward pass.
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        for _ in range(3):
                            self._forward(static_in, self.module)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    torch.cuda.synchronize(self.device)
            except Exception as e:  # noqa: BLE001 - the model fails eagerly too: let infer say so
                log.warning("%s: no CUDA graph for %s: %s", self.spec.name, tuple(x.shape), e)
                return None
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
                self._capture_stream = torch.cuda.Stream(self.device)
            graph = torch.cuda.CUDAGraph()
            # The stream context is left even when ending the capture fails, which
            # torch.cuda.graph() does not do. thread_local: only this thread's calls that a
            # capture forbids (a synchronisation inside the model) break it.
            with torch.inference_mode(), torch.cuda.stream(self._capture_stream):
                graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
                try:
                    try:
                        static_out = self._forward(static_in, self.module)
                    finally:
                        graph.capture_end()
                except Exception as e:  # noqa: BLE001 - eager always works
                    self._abandon(graph, e, tuple(x.shape))
                    return None
        log.debug("%s: CUDA graph for input %s", self.spec.name, tuple(x.shape))
        return static_in, graph, static_out

    def _abandon(self, graph: Any, error: Exception, shape: tuple[int, ...]) -> None:
        """After a capture that broke: hand the caching allocator's capture pool back if ending
        the capture could not, keep the graph object alive (the allocator may still refer to
        it), and run eagerly from now on; later shapes would break the same way."""
        end_pool = getattr(torch._C, "_cuda_endAllocateToPool", None)
        if end_pool is not None:
            with contextlib.suppress(Exception):  # already handed back when capture_end got that far
                end_pool(self.device.index if self.device.index is not None else torch.cuda.current_device(),
                         self._graph_pool)
        self._failed_graph = graph
        self.cuda_graphs = False
        log.warning("%s: running eagerly, could not capture a CUDA graph for %s: %s",
                    self.spec.name, shape, error)

    def _runner(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """The frozen graph for ``x``'s shape (traced on first use), or the eager module."""
        if not self.optimize:
            return self.module
        key = tuple(x.shape[1:])  # traced graphs take any batch size; one trace per image shape
        if key not in self._frozen:
            self._frozen[key] = self._freeze(key) if len(self._frozen) < _MAX_FROZEN else None
        return self._frozen[key] or self.module

    def _freeze(self, shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        example = torch.zeros((1, *shape), device=self.device)
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cpu":
            # oneDNN Graph fuses conv + bias + activation chains and the element-wise tails (residual
            # adds, gate multiplies) into single kernels when the frozen graph is specialised. The
            # switch is process-wide and only affects TorchScript graphs, i.e. these frozen ones.
            torch.jit.enable_onednn_fusion(True)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic baked in
                traced = torch.jit.trace(self.module.eval(), example, check_trace=False)
                frozen = torch.jit.freeze(traced)
                for _ in range(3):  # profiling, specialising and fusing runs; keep them out of live timing
                    frozen(example)
        except Exception as e:  # noqa: BLE001 - any failure leaves the model eager, which always works
            log.warning("%s: running eagerly, could not freeze a graph for %s: %s", self.spec.name, shape, e)
            return None
        log.debug("%s: frozen graph for input %s", self.spec.name, shape)
        return frozen

    # -- post-processing -----------------------------------------------------------------
    def postprocess(
        self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if probs.shape[0] != len(sizes):
            raise ValueError(f"{probs.shape[0]} probability maps for {len(sizes)} sizes")
        th, tw = self.spec.input_size
        results: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(sizes)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault((int(s[0]), int(s[1])), []).append(i)
        if probs.device.type == "cpu" and self.spec.binary:
            return self._postprocess_binary_cpu(probs, sizes)
        with torch.inference_mode():
            for (h, w), idx in groups.items():
                p = probs[idx] if len(idx) < probs.shape[0] else probs
                if self.spec.resize == "letterbox":
                    top, left, bh, bw = letterbox_box((h, w), (th, tw))
                    p = p[:, :, top : top + bh, left : left + bw]
                if self.spec.binary:
                    p = p[:, 1:2]  # only the foreground channel needs resizing
                if tuple(p.shape[-2:]) != (h, w):
                    p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
                if self.spec.binary:
                    fg = p[:, 0]
                    labels = (fg > 0.5).to(torch.uint8).cpu().numpy()
                    fg_np = fg.float().cpu().numpy()
                    for j, i in enumerate(idx):
                        results[i] = (labels[j], fg_np[j])
                else:
                    labels = p.argmax(dim=1).to(torch.uint8).cpu().numpy()
                    for j, i in enumerate(idx):
                        results[i] = (labels[j], None)
        return [r for r in results if r is not None]

    def _postprocess_binary_cpu(
        self, probs: torch.Tensor, sizes: Sequence[tuple[int, int]]
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One foreground channel resized per image with OpenCV (half-pixel bilinear, as
        ``F.interpolate(align_corners=False)``), several times cheaper on the CPU."""
        th, tw = self.spec.input_size
        fg_all = probs[:, 1].detach().float().contiguous().numpy()
        results: list[tuple[np.ndarray, np.ndarray | None]] = []
        for j, (h, w) in enumerate(sizes):
            fg = fg_all[j]
            if self.spec.resize == "letterbox":
                top, left, bh, bw = letterbox_box((int(h), int(w)), (th, tw))
                fg = fg[top : top + bh, left : left + bw]
            if fg.shape != (h, w):
                fg = cv2.resize(fg, (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
            results.append(((fg > 0.5).view(np.uint8), fg))
        return results

    def __call__(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return self.postprocess(self.infer(self.preprocess(images)), [im.shape[:2] for im in images])

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Run each batch size once, so that live frames never pay for what a first call does:
        tracing and fusing (CPU), cuDNN's kernel choice and CUDA-graph capture (GPU). Random
        input, not zeros: kernels chosen on zeros can be the wrong ones for real data."""
        th, tw = self.spec.input_size
        sizes = sorted(set(batch_sizes))
        for n in sizes:
            self.infer(torch.rand((n, 3, th, tw), device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            # Every batch size up to this one replays from a graph: larger batches replay in parts.
            captured = {k[0] for k in self.cuda_graph_shapes}
            whole = [n for n in sizes if all(m in captured for m in range(1, n + 1))]
            self._warm_batch = max(whole, default=0)
