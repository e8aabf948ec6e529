"""The temporal refiner's CPU kernels, compiled by numba (see ``models.kernels``).

Module-level functions, so numba's on-disk cache can key them by this file alone; imported
only by ``models.kernels.load``, never at package import (numba takes a while to import).
Each does what the OpenCV path in ``models.temporal`` does, to float rounding.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import njit

f32, i64 = numba.float32, numba.int64
opts: dict[str, Any] = {"cache": True, "nogil": True, "error_model": "numpy"}


@njit(**opts)
def rect(m: Any, x0: int, y0: int, w: int, h: int, sure: float) -> Any:  # pragma: no cover
    # bounding (x, y, w, h) of the pixels of m[y0:y0+h, x0:x0+w] within [sure, 1 - sure].
    # Each row is first tested as a whole (a branch-free loop over a slice, which the compiler
    # vectorises); only rows with such a pixel are searched from both ends. Columns are
    # counted from x0 inside the loops.
    hi = np.float32(1.0) - sure
    ya, yb, xa, xb = y0 + h, -1, w, -1
    for y in range(y0, y0 + h):
        row = m[y, x0 : x0 + w]
        hit = False
        for x in range(w):
            hit |= (row[x] >= sure) & (row[x] <= hi)
        if not hit:
            continue
        if y < ya:
            ya = y
        yb = y
        for x in range(min(xa, w)):
            if row[x] >= sure and row[x] <= hi:
                xa = x
                break
        for x in range(w - 1, xb, -1):
            if row[x] >= sure and row[x] <= hi:
                xb = x
                break
    if yb < 0:
        return 0, 0, 0, 0
    return x0 + xa, ya, xb - xa + 1, yb - ya + 1


@njit(**opts)
def source(o: int, ratio: float, n: int) -> Any:  # pragma: no cover
    # the two source cells output ``o`` reads when n cells are resized by 1 / ratio (half-pixel
    # bilinear, as OpenCV and torch), and the second one's weight
    s = (o + 0.5) * ratio - 0.5
    if s < 0.0:
        s = 0.0
    i = min(int(s), n - 1)
    return i, min(i + 1, n - 1), np.float32(s - i)


@njit(numba.float64(f32[:, :, ::1], f32[:, :, ::1], f32[:, ::1]), **opts)
def residual(a: Any, b: Any, out: Any) -> float:  # pragma: no cover
    # largest per-channel absolute difference, and its mean
    total = 0.0
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            m = abs(a[i, j, 0] - b[i, j, 0])
            d = abs(a[i, j, 1] - b[i, j, 1])
            if d > m:
                m = d
            d = abs(a[i, j, 2] - b[i, j, 2])
            if d > m:
                m = d
            out[i, j] = m
            total += m
    return total / (out.shape[0] * out.shape[1])


@njit(
    numba.float64(
        f32[:, :, ::1], i64, f32[::1], f32[::1], f32[:, :, ::1], f32[:, :, ::1], f32[:, :, ::1],
        f32[:, ::1],
    ),
    **opts,
)
def thumbnail(
    x: Any, k: int, mean: Any, std: Any, ref: Any, tmp: Any, out: Any, res: Any
) -> float:  # pragma: no cover
    # x: h x w x 3 normalised input. Each cell is the mean of the middle 2 x 2 pixels of
    # its k x k block (what bilinear resizing by an even k reads), back to RGB, clipped to
    # [0, 1], then blurred 3 x 3 with replicated borders. With a ``ref`` of the same
    # shape, also the residual against it (into ``res``); returns its mean (0 without).
    hs, ws = out.shape[0], out.shape[1]
    o = k // 2 - 1
    half = np.float32(0.5)
    for i in range(hs):
        r0, r1 = x[i * k + o], x[i * k + o + 1]
        for j in range(ws):
            c0 = j * k + o
            for c in range(3):
                v = ((r0[c0, c] + r0[c0 + 1, c]) * half + (r1[c0, c] + r1[c0 + 1, c]) * half) * half
                v = v * std[c] + mean[c]
                if v > 1.0:
                    v = np.float32(1.0)
                if v < 0.0:
                    v = np.float32(0.0)
                tmp[i, j, c] = v
    ninth = np.float32(1.0 / 9.0)
    for i in range(hs):
        i0, i1 = max(i - 1, 0), min(i + 1, hs - 1)
        for j in range(ws):
            j0, j1 = max(j - 1, 0), min(j + 1, ws - 1)
            for c in range(3):
                s = tmp[i0, j0, c] + tmp[i0, j, c] + tmp[i0, j1, c]
                s += tmp[i, j0, c] + tmp[i, j, c] + tmp[i, j1, c]
                s += tmp[i1, j0, c] + tmp[i1, j, c] + tmp[i1, j1, c]
                out[i, j, c] = s * ninth
    if ref.shape[0] != hs or ref.shape[1] != ws:
        return 0.0
    return residual(out, ref, res)


@njit(
    numba.types.UniTuple(i64, 4)(
        f32[:, ::1], f32, f32, f32, f32[:, ::1], f32[:, ::1], i64, i64, i64, i64, f32
    ),
    **opts,
)
def gate(
    r: Any, lo: float, hi: float, scale: float, out: Any, prev: Any, x0: int, y0: int, w: int,
    h: int, sure: float,
) -> Any:  # pragma: no cover
    # out = scale * (1 - clip((moving - lo) / (hi - lo), 0, 1)), moving the 3 x 3 maximum
    # of the residual (inside the picture); returns the box around the unsure pixels of
    # prev[y0:y0+h, x0:x0+w]
    rh, rw = r.shape
    inv = np.float32(1.0) / (hi - lo)
    for i in range(rh):
        i0, i1 = max(i - 1, 0), min(i + 1, rh - 1)
        for j in range(rw):
            j0, j1 = max(j - 1, 0), min(j + 1, rw - 1)
            m = r[i0, j0]
            for ii in range(i0, i1 + 1):
                for jj in range(j0, j1 + 1):
                    if r[ii, jj] > m:
                        m = r[ii, jj]
            t = (m - lo) * inv
            if t < 0.0:
                t = np.float32(0.0)
            if t > 1.0:
                t = np.float32(1.0)
            out[i, j] = scale - scale * t
    return rect(prev, x0, y0, w, h, sure)


@njit(
    numba.types.UniTuple(i64, 4)(
        f32[:, ::1], f32[:, ::1], f32[:, ::1], i64[::1], f32[:, ::1], f32, f32, f32, f32
    ),
    **opts,
)
def fuse(
    bg: Any, fg: Any, prev: Any, prev_rect: Any, still: Any, scale: float, sure: float,
    inv_agreement2: float, bias_per_weight: float,
) -> Any:  # pragma: no cover
    # In place on (bg, fg), inside the box holding every pixel either map is unsure of:
    # weight = still (bilinear, half-pixel) * scale * (1 - min(1, (prev - fg)^2 / agreement^2)),
    # zero where both are sure; fg' = fg + (prev - fg) * weight, then with hysteresis
    # fg' = (fg' + bias * [prev >= 0.5]) / (1 + bias), bias = weight * bias_per_weight;
    # bg' = 1 - fg' there (elsewhere bg is left as the model made it, 1 - fg to rounding).
    # Returns the box (x, y, w, h).
    h, w = fg.shape
    hs, ws = still.shape
    hi = np.float32(1.0) - sure
    nx, ny, nw, nh = rect(fg, 0, 0, w, h, sure)
    px, py, pw, ph = prev_rect[0], prev_rect[1], prev_rect[2], prev_rect[3]
    if nw == 0 and pw == 0:
        return 0, 0, 0, 0
    if nw == 0:
        nx, ny, nw, nh = px, py, pw, ph
    elif pw > 0:
        x1, y1 = max(nx + nw, px + pw), max(ny + nh, py + ph)
        nx, ny = min(nx, px), min(ny, py)
        nw, nh = x1 - nx, y1 - ny
    xa, ya, xb, yb = nx, ny, nx + nw - 1, ny + nh - 1
    ry, rx = hs / h, ws / w
    one = np.float32(1.0)
    # the gate's source columns for each column of the box, and one row of it per output row
    cols0 = np.empty(xb - xa + 1, np.int64)
    cols1 = np.empty(xb - xa + 1, np.int64)
    colw = np.empty(xb - xa + 1, np.float32)
    for x in range(xa, xb + 1):
        cols0[x - xa], cols1[x - xa], colw[x - xa] = source(x, rx, ws)
    row = np.empty(ws, np.float32)
    for y in range(ya, yb + 1):
        iy, iy1, wy = source(y, ry, hs)
        for j in range(ws):
            row[j] = still[iy, j] + (still[iy1, j] - still[iy, j]) * wy
        for x in range(xa, xb + 1):
            a = fg[y, x]
            b = prev[y, x]
            if (a >= sure and a <= hi) or (b >= sure and b <= hi):
                c0, c1, wx = cols0[x - xa], cols1[x - xa], colw[x - xa]
                s = (row[c0] + (row[c1] - row[c0]) * wx) * scale
                d = b - a
                q = d * d * inv_agreement2
                if q > one:
                    q = one
                weight = s - s * q
                a = a + d * weight
                if bias_per_weight > 0.0:
                    bias = weight * bias_per_weight
                    a = (a + bias) / (one + bias) if b >= 0.5 else a / (one + bias)
                fg[y, x] = a
                bg[y, x] = one - a
    return xa, ya, xb - xa + 1, yb - ya + 1
