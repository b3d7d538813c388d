"""Colour correction of the decoded frames against the upsampled LQ frames (per frame, per channel).

``adain`` is what the official code runs; ``wavelet`` keeps the decoded high frequencies and takes
the low frequencies from the LQ frame (the official code ships it unused; users asked for it against
colour shifts). Both are computed in float32 by default: in bf16 the wavelet sums band (docs/model.md §11).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5


def adain(hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """hq, lq: (T, 3, H, W). Match each channel's mean and biased std to the LQ frame's."""
    hq_mean, hq_std = _mean_std(hq)
    lq_mean, lq_std = _mean_std(lq)
    return (hq - hq_mean) / hq_std * lq_std + lq_mean


def _mean_std(x: torch.Tensor):
    flat = x.flatten(2)
    var = flat.var(dim=2, unbiased=False) + ADAIN_EPS
    return flat.mean(dim=2)[..., None, None], var.sqrt()[..., None, None]


def _blur(x: torch.Tensor, radius: int) -> torch.Tensor:
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    weight = k.view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (radius,) * 4, mode="replicate"), weight, dilation=radius, groups=x.shape[1])


def _split(x: torch.Tensor):
    high = torch.zeros_like(x)
    low = x
    for i in range(WAVELET_LEVELS):
        blurred = _blur(low, 2 ** i)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet(hq: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    return _split(hq)[0] + _split(lq)[1]


def color_fix(hq: torch.Tensor, lq: torch.Tensor, method: str, float32: bool = True) -> torch.Tensor:
    """Returns frames clamped to [-1, 1] (except ``none``, which returns hq unchanged)."""
    if method == "none":
        return hq
    dtype = hq.dtype
    if float32:
        hq, lq = hq.float(), lq.float()
    else:
        lq = lq.to(dtype)
    fn = {"adain": adain, "wavelet": wavelet}.get(method)
    if fn is None:
        raise ValueError(f"unknown colour fix {method!r}: use adain, wavelet or none")
    return fn(hq, lq).clamp(-1, 1).to(dtype if not float32 else hq.dtype)
