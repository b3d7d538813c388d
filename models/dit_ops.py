"""The DiT block's work between attention calls, as pure tensor functions.

Weights are passed in as tensors (not modules) so that one ``torch.compile``d graph serves all 30
blocks: compiled on CUDA these functions fuse the layer norms, modulation, RMS norms, float64 RoPE,
window (un)partitioning and residual gates into a few kernels; eager they are the reference. The
arithmetic (dtypes, order) is the official one, so eager and compiled agree within rounding.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .compiled import compile_with_fallback, triton_usable
from .lcsa import BLOCK_TOKENS, WINDOW


EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
         dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rotate interleaved pairs of each head in float64 (the official complex multiply, written out),
    or in ``dtype`` with the angles' cosines and sines rounded to it."""
    b, length, c = x.shape
    if dtype != torch.float64:
        cos, sin = cos.to(dtype), sin.to(dtype)
    xf = x.to(dtype).view(b, length, heads, c // heads // 2, 2)
    re, im = xf[..., 0], xf[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)
    return out.view(b, length, c).to(x.dtype)


def to_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """(B, f*h*w, C) in (t, y, x) order -> (B*n_windows, 128, C), windows ordered (group, row, col)."""
    b, _, c = x.shape
    wf, wh, ww = WINDOW
    x = x.view(b, f // wf, wf, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, wf * wh * ww, c)


def from_windows(x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    wf, wh, ww = WINDOW
    c = x.shape[-1]
    x = x.view(-1, f // wf, h // wh, w // ww, wf, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, f * h * w, c)


def heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B*nw, 128, C) or (B, L, C) -> (1, heads, L, C/heads) (a view, no copy)."""
    c = x.shape[-1]
    return x.reshape(1, -1, heads, c // heads).transpose(1, 2)


def window_order(f: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): ``x[:, order]`` puts (t, y, x)-ordered tokens in window order, ``[:, inverse]``
    undoes it. The DiT keeps its tokens in window order for the whole chunk: every op but attention
    and RoPE is per token, so the result is the same, and no layer has to regroup q, k, v and the
    attention output (3-4 ms of copies per chunk at 768x1408)."""
    idx = torch.arange(f * h * w, device=device).view(1, -1, 1)
    return to_windows(idx, f, h, w).reshape(-1), from_windows(idx.view(-1, BLOCK_TOKENS, 1), f, h, w).reshape(-1)


def pre_attention(x, modulation, t_mod, qw, qb, kw, kb, vw, vb, nqw, nkw, cos, sin, heads: int,
                  rope_dtype: torch.dtype = torch.float64):
    """Modulated norm1, q/k/v, RMS norms and RoPE of window-ordered tokens, as (windows, 128, C);
    also the window means."""
    mods = (modulation + t_mod).chunk(6, dim=1)
    shift, scale = mods[0], mods[1]
    y = F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift
    q = rope(rms_norm(F.linear(y, qw, qb), nqw), cos, sin, heads, rope_dtype)
    k = rope(rms_norm(F.linear(y, kw, kb), nkw), cos, sin, heads, rope_dtype)
    v = F.linear(y, vw, vb)
    c = x.shape[-1]
    q_w, k_w, v_w = (t.view(-1, BLOCK_TOKENS, c) for t in (q, k, v))
    return q_w, k_w, v_w, q_w.mean(dim=1), k_w.mean(dim=1), mods


def post_self_attention(x, o, ow, ob, gate, n3w, n3b, cqw, cqb, cnqw):
    """Self-attention output projection and gated residual; then the cross-attention query."""
    x = x + gate * F.linear(o, ow, ob)
    q = rms_norm(F.linear(F.layer_norm(x, (x.shape[-1],), n3w, n3b, eps=EPS), cqw, cqb), cnqw)
    return x, q


def _ffn_input(x, o, cow, cob, shift, scale):
    """Cross-attention output projection and residual; then the FFN's modulated norm."""
    x = x + F.linear(o, cow, cob)
    return x, F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift


def post_cross_attention(x, o, cow, cob, shift, scale, gate, f0w, f0b, f2w, f2b):
    x, y = _ffn_input(x, o, cow, cob, shift, scale)
    return x + gate * F.linear(F.gelu(F.linear(y, f0w, f0b), approximate="tanh"), f2w, f2b)


def post_cross_attention_gelu_epilogue(x, o, cow, cob, shift, scale, gate, f0w, f0b, f2w, f2b):
    """:func:`post_cross_attention` with the FFN's bias and tanh GELU applied by the GEMM itself
    (cuBLASLt epilogue) instead of a separate pass over the (L, 8960) activations: 0.364 against
    0.431 ms per layer on an H100 at 768x1408. The GELU is taken of the float32 accumulator before
    the one rounding to bf16 (eager rounds, then applies GELU), a difference within bf16 rounding."""
    if not x.is_cuda:       # the CPU kernel of _addmm_activation applies the erf GELU, not tanh
        return post_cross_attention(x, o, cow, cob, shift, scale, gate, f0w, f0b, f2w, f2b)
    x, y = _ffn_input(x, o, cow, cob, shift, scale)
    hidden = torch._addmm_activation(f0b, y.reshape(-1, y.shape[-1]), f0w.t(), use_gelu=True)
    return x + gate * F.linear(hidden.view(*y.shape[:-1], -1), f2w, f2b)


def pre_attention_fp32_rope(x, modulation, t_mod, qw, qb, kw, kb, vw, vb, nqw, nkw, cos, sin, heads: int):
    """:func:`pre_attention` with RoPE in float32: the rotated bf16 values differ from float64's only
    where a float32 rounding crosses a bf16 rounding boundary (one step, rarely)."""
    return pre_attention(x, modulation, t_mod, qw, qb, kw, kb, vw, vb, nqw, nkw, cos, sin, heads, torch.float32)


EAGER = {"pre": pre_attention, "post_self": post_self_attention, "post_cross": post_cross_attention}
# What the CUDA fast path compiles: the eager functions, with the FFN's GELU moved into its GEMM and
# RoPE in float32.
FAST = dict(EAGER, pre=pre_attention_fp32_rope, post_cross=post_cross_attention_gelu_epilogue)


@functools.lru_cache(maxsize=1)
def compiled_ops() -> dict | None:
    """The fast-path functions through torch.compile (static shapes: two per resolution), or None."""
    if not triton_usable():
        return None
    return {name: compile_with_fallback(fn, f"DiT step {name!r}", fullgraph=True) for name, fn in FAST.items()}
