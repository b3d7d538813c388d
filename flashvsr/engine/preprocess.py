"""From user frames to the model's LQ video: bicubic upscale to output size, fit to 128 multiples.

FlashVSR sees the low-quality video already upsampled to output resolution. The official drivers
do this with Pillow's bicubic filter (a = -0.5) on 8-bit frames and centre-crop to multiples of 128,
which drops borders. Two modes:

* ``exact`` (default): the same Pillow bicubic kernel applied in float on the compute device (no 8-bit
  rounding), the frame *padded* (replicate) at the bottom/right to the next multiple of 128 and the
  output cropped back, so the user gets exactly ``round(scale*H) x round(scale*W)``.
* ``official``: Pillow itself on uint8 frames plus the drivers' centre crop, for end-to-end parity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .host_copy import upload

MULTIPLE = 128   # the (2, 8, 8) windows of 16-pixel tokens need H and W divisible by 128


@dataclass(frozen=True)
class Geometry:
    in_h: int
    in_w: int
    out_h: int        # what the user gets
    out_w: int
    model_h: int      # what the model runs at (multiple of 128)
    model_w: int
    official: bool
    crop_top: int = 0     # official mode: where the model frame sits in the scaled frame
    crop_left: int = 0
    scaled_h: int = 0
    scaled_w: int = 0


def plan_geometry(in_h: int, in_w: int, scale: float, official: bool) -> Geometry:
    if in_h < 1 or in_w < 1:
        raise ValueError(f"frames must be at least 1x1 pixels, got {in_h}x{in_w}")
    sh, sw = int(round(in_h * scale)), int(round(in_w * scale))
    if official:
        th, tw = (sh // MULTIPLE) * MULTIPLE, (sw // MULTIPLE) * MULTIPLE
        if th == 0 or tw == 0:
            raise ValueError(f"official preprocessing needs a scaled size of at least 128x128, got {sh}x{sw}; "
                             "use preprocess='exact' or a larger scale")
        return Geometry(in_h, in_w, th, tw, th, tw, True, (sh - th) // 2, (sw - tw) // 2, sh, sw)
    mh, mw = math.ceil(sh / MULTIPLE) * MULTIPLE, math.ceil(sw / MULTIPLE) * MULTIPLE
    return Geometry(in_h, in_w, sh, sw, mh, mw, False, 0, 0, sh, sw)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


@lru_cache(maxsize=32)
def _bicubic_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) resampling matrix of Pillow's bicubic filter (support 2, pixel-centre aligned)."""
    ratio = n_in / n_out
    filter_scale = max(ratio, 1.0)
    support = 2.0 * filter_scale
    m = np.zeros((n_out, n_in), dtype=np.float64)
    for x in range(n_out):
        centre = (x + 0.5) * ratio
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic((taps - centre + 0.5) / filter_scale)
        total = w.sum()
        m[x, lo:hi] = w / total if total != 0 else w
    return m


def bicubic_matrix(n_in: int, n_out: int, device, dtype=torch.float32) -> torch.Tensor:
    return upload(torch.from_numpy(_bicubic_weights(n_in, n_out)), torch.device(device), dtype)


@dataclass(frozen=True)
class Window:
    """A rectangle of the model frame, in model pixels (a spatial tile)."""
    top: int
    left: int
    height: int
    width: int


class Upsampler:
    """Turns one input frame (H, W, 3) into a model frame (3, model_h, model_w) in [-1, 1], or with
    ``window`` only that rectangle of it (3, window.height, window.width).

    A window costs only its own pixels: the bicubic resample is separable, out = R @ x @ C^T, so a
    window of the output is R[rows] @ x @ C[cols]^T, and each row of R touches only a band of about
    4 input rows (its support). The window's rows of R (the replicate padding below/right of the
    user's frame is the last row repeated), cut to the band of input rows they touch, and the same
    for C, give each output pixel from the same weights and input pixels as the whole frame does;
    only the terms with weight exactly 0 are left out of the sums (tests/test_tiles.py: equal to
    cropping the whole upsampled frame within float32 rounding).
    """

    def __init__(self, geom: Geometry, device, dtype, window: Window | None = None):
        self.geom, self.device, self.dtype = geom, torch.device(device), dtype
        self.window = window or Window(0, 0, geom.model_h, geom.model_w)
        if not geom.official:
            w = self.window
            self._rows, self._row_band = _band(geom.in_h, geom.out_h, w.top, w.height, self.device)
            self._cols, self._col_band = _band(geom.in_w, geom.out_w, w.left, w.width, self.device)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        if self.geom.official:
            return self._official(frame)
        (r0, r1), (c0, c1) = self._row_band, self._col_band
        x = upload(_to_unit_float(frame[r0:r1, c0:c1]), self.device).permute(2, 0, 1)   # (3, h, w) in [0, 1]
        x = torch.matmul(torch.matmul(self._rows, x), self._cols.T) * 2 - 1
        return x.to(self.dtype)

    def _official(self, frame: torch.Tensor) -> torch.Tensor:
        from PIL import Image    # only the parity mode needs Pillow
        g, w = self.geom, self.window
        u8 = to_uint8(frame).numpy()
        img = Image.fromarray(u8, "RGB").resize((g.scaled_w, g.scaled_h), Image.BICUBIC)
        top, left = g.crop_top + w.top, g.crop_left + w.left
        img = img.crop((left, top, left + w.width, top + w.height))
        x = torch.from_numpy(np.asarray(img).copy()).to(torch.float32).permute(2, 0, 1)
        return upload(x / 255.0 * 2.0 - 1.0, self.device, self.dtype)


def _band(n_in: int, n_out: int, start: int, length: int, device) -> tuple[torch.Tensor, tuple[int, int]]:
    """The resampling rows of output pixels [start, start + length) of a frame padded (replicate) past
    ``n_out``, cut to the input band [lo, hi) they touch: ((length, hi - lo) matrix, (lo, hi))."""
    full = _bicubic_weights(n_in, n_out)
    rows = full[np.minimum(np.arange(start, start + length), n_out - 1)]
    touched = np.flatnonzero(rows.any(axis=0))
    lo, hi = int(touched[0]), int(touched[-1]) + 1
    return upload(torch.from_numpy(np.ascontiguousarray(rows[:, lo:hi])), torch.device(device), torch.float32), (lo, hi)


def _to_unit_float(frame: torch.Tensor) -> torch.Tensor:
    if frame.dtype == torch.uint8:
        return frame.to(torch.float32) / 255.0
    return frame.to(torch.float32)


def to_uint8(frame: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] or uint8 (H, W, 3) -> uint8, rounding to nearest like image writers do."""
    if frame.dtype == torch.uint8:
        return frame.cpu()
    return (frame.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
