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


class Upsampler:
    """Turns one input frame (H, W, 3) into a model frame (3, model_h, model_w) in [-1, 1]."""

    def __init__(self, geom: Geometry, device, dtype):
        self.geom, self.device, self.dtype = geom, torch.device(device), dtype
        if not geom.official:
            self._rows = bicubic_matrix(geom.in_h, geom.out_h, self.device)
            self._cols = bicubic_matrix(geom.in_w, geom.out_w, self.device)

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        if self.geom.official:
            return self._official(frame)
        x = upload(_to_unit_float(frame), self.device).permute(2, 0, 1)   # (3, H, W) in [0, 1]
        x = torch.matmul(torch.matmul(self._rows, x), self._cols.T) * 2 - 1
        g = self.geom
        pad_h, pad_w = g.model_h - g.out_h, g.model_w - g.out_w
        if pad_h or pad_w:
            x = torch.nn.functional.pad(x[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
        return x.to(self.dtype)

    def _official(self, frame: torch.Tensor) -> torch.Tensor:
        from PIL import Image    # only the parity mode needs Pillow
        g = self.geom
        u8 = to_uint8(frame).numpy()
        img = Image.fromarray(u8, "RGB").resize((g.scaled_w, g.scaled_h), Image.BICUBIC)
        img = img.crop((g.crop_left, g.crop_top, g.crop_left + g.model_w, g.crop_top + g.model_h))
        x = torch.from_numpy(np.asarray(img).copy()).to(torch.float32).permute(2, 0, 1)
        return upload(x / 255.0 * 2.0 - 1.0, self.device, self.dtype)


def _to_unit_float(frame: torch.Tensor) -> torch.Tensor:
    if frame.dtype == torch.uint8:
        return frame.to(torch.float32) / 255.0
    return frame.to(torch.float32)


def to_uint8(frame: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] or uint8 (H, W, 3) -> uint8, rounding to nearest like image writers do."""
    if frame.dtype == torch.uint8:
        return frame.cpu()
    return (frame.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8)
