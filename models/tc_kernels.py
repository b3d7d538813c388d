"""Triton kernel for the TCDecoder's last step at full resolution: ReLU, then the 3x3 convolution to
RGB (128 -> 3 channels).

Why a kernel of our own: cuDNN has no Hopper kernel for 3 output channels (it runs an sm80 one at
about a quarter of the memory bandwidth: 0.35 ms per 768x1408 frame on the H100), and the ReLU
before it is a separate pass over the 277 MB frame. This kernel reads the channels-last frame
once (the nine shifted loads of a tile mostly hit L1), applies the ReLU on the way in and does the
nine taps as small tensor-core products with float32 accumulation, like cuDNN; only the order of
the float32 sums differs (bf16 noise after the final rounding).

Self-contained (torch and triton only) so that the CPU tests can load it under Triton's
interpreter, as they do for the attention kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

OUT_PAD = 16          # the smallest N of a tensor-core product; channels 3..15 are zero weights
TILE_H, TILE_W, WARPS = 4, 32, 4


@triton.jit
def _relu_conv3x3_rgb(X, WP, BIAS, Y, H, W, sxt, sxh, sxw, syt, syh, syw,
                      C: tl.constexpr, COUT: tl.constexpr, NPAD: tl.constexpr,
                      TH: tl.constexpr, TW: tl.constexpr):
    t = tl.program_id(2).to(tl.int64)
    pix = tl.arange(0, TH * TW)
    ph = tl.program_id(1) * TH + pix // TW
    pw = tl.program_id(0) * TW + pix % TW
    ch = tl.arange(0, C)
    oc = tl.arange(0, NPAD)
    x_base = X + t * sxt
    acc = tl.zeros([TH * TW, NPAD], tl.float32)
    for tap in tl.static_range(9):
        hh = ph + (tap // 3 - 1)
        ww = pw + (tap % 3 - 1)
        inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)        # zero padding
        x = tl.load(x_base + hh[:, None] * sxh + ww[:, None] * sxw + ch[None, :], mask=inside[:, None], other=0.0)
        x = tl.maximum(x, 0.0).to(WP.dtype.element_ty)      # Triton 3.6 promotes to float32 here
        w = tl.load(WP + tap * C * NPAD + ch[:, None] * NPAD + oc[None, :])
        acc = tl.dot(x, w, acc)
    acc += tl.load(BIAS + oc)[None, :]
    keep = ((ph < H) & (pw < W))[:, None] & (oc < COUT)[None, :]
    tl.store(Y + t * syt + ph[:, None] * syh + pw[:, None] * syw + oc[None, :], acc.to(Y.dtype.element_ty), mask=keep)


def supports(in_channels: int, out_channels: int) -> bool:
    """Triton's tiles need a power-of-two channel count (>= 16 for a tensor-core product)."""
    return in_channels >= 16 and in_channels & (in_channels - 1) == 0 and out_channels <= OUT_PAD


def pack_rgb_head(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(COUT, C, 3, 3) weight and (COUT,) bias -> (9, C, OUT_PAD) tap-major weight and float32
    (OUT_PAD,) bias, zero beyond COUT, in the weight's dtype and device."""
    cout, cin, kh, kw = weight.shape
    if (kh, kw) != (3, 3) or not supports(cin, cout):
        raise ValueError(f"expected a 3x3 convolution from a power-of-two number (>= 16) of channels to at most "
                         f"{OUT_PAD}, got weight {tuple(weight.shape)}")
    packed = torch.zeros((9, cin, OUT_PAD), dtype=weight.dtype, device=weight.device)
    packed[:, :, :cout] = weight.permute(2, 3, 1, 0).reshape(9, cin, cout)
    b = torch.zeros(OUT_PAD, dtype=torch.float32, device=weight.device)
    if bias is not None:
        b[:cout] = bias.float()
    return packed, b


def relu_conv3x3_rgb(x: torch.Tensor, packed: tuple[torch.Tensor, torch.Tensor], cout: int) -> torch.Tensor:
    """``conv2d(relu(x), weight, bias, padding=1)`` for x (T, C, H, W) in channels-last memory;
    ``packed`` from :func:`pack_rgb_head`. Returns (T, cout, H, W) in channels-last memory."""
    t, c, h, w = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"expected channels-last input (channel stride 1), got strides {x.stride()}")
    wp, bias = packed
    if wp.shape[1] != c:
        raise ValueError(f"the packed weight takes {wp.shape[1]} channels, the input has {c}")
    y = torch.empty((t, cout, h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    grid = (triton.cdiv(w, TILE_W), triton.cdiv(h, TILE_H), t)
    _relu_conv3x3_rgb[grid](x, wp, bias, y, h, w, x.stride(0), x.stride(2), x.stride(3),
                            y.stride(0), y.stride(2), y.stride(3),
                            C=c, COUT=cout, NPAD=OUT_PAD, TH=TILE_H, TW=TILE_W, num_warps=WARPS)
    return y
