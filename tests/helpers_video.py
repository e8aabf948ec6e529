"""Tiny generated videos for tests: a bright square moving over a gradient."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np


def pattern_frame(i: int, *, width: int, height: int) -> np.ndarray:
    """Frame ``i`` of the pattern: RGB uint8, every frame differs from the previous one."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[..., 0] = (0.6 * x + 0.4 * y).astype(np.uint8)
    img[..., 1] = ((x + 3 * i) % 256 * 0.5).astype(np.uint8)
    img[..., 2] = (255 - 0.7 * y).astype(np.uint8)
    side = max(4, min(width, height) // 4)
    span_x, span_y = max(1, width - side), max(1, height - side)
    cx, cy = (i * 7) % span_x, (i * 3) % span_y
    img[cy : cy + side, cx : cx + side] = 255
    return img


def mux_frames(
    container: Any, stream: Any, images: Iterable[np.ndarray], *, times: Sequence[float] | None = None
) -> None:
    """Encode RGB ``images`` into ``stream``, mux the packets into ``container`` and flush the
    encoder. ``times`` (seconds), when given, become the frames' pts in the stream's codec
    time base (a variable frame rate, pauses)."""
    tb = stream.codec_context.time_base
    for i, image in enumerate(images):
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        if times is not None:
            frame.pts, frame.time_base = round(times[i] / tb), tb
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def make_test_video(
    path: str | Path,
    *,
    frames: int = 60,
    width: int = 160,
    height: int = 120,
    fps: int = 30,
    codec: str = "libx264",
) -> Path:
    """Encode ``frames`` pattern frames to ``path`` (container from the suffix) and return it."""
    if frames < 1 or width < 16 or height < 16 or fps < 1:
        raise ValueError(f"bad test video parameters: frames={frames} size={width}x{height} fps={fps}")
    path = Path(path)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": str(fps)}
        mux_frames(out, stream, (pattern_frame(i, width=width, height=height) for i in range(frames)))
    return path
