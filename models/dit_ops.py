"""The DiT block's work between its attention calls, as pure tensor functions.

A block (``dit.DiTBlock.forward``) runs three steps around its two attention calls:

    pre_attention         norm1 + modulation, q/k/v, RMS norms, RoPE, window means
    (sparse self-attention over the KV cache)
    post_self_attention   output projection + gated residual, norm3, cross-attention query
    (cross-attention to the prompt)
    post_cross_attention  output projection + residual, norm2 + modulation, FFN + gated residual

The weights come in as tensors (grouped in the named tuples below), not as modules, so that one
``torch.compile``d graph per step and chunk shape serves all 30 blocks: compiled on CUDA the steps
fuse the layer norms, modulation, RMS norms, RoPE, window (un)partitioning and residual gates into a
few kernels; eager they are the reference. The arithmetic (dtypes, order) is the official one, so
eager and compiled agree within rounding.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .compiled import compile_with_fallback, triton_usable
from .lcsa import BLOCK_TOKENS, WINDOW


EPS = 1e-6


class Affine(NamedTuple):
    """The tensors of an ``nn.Linear`` or of an affine ``nn.LayerNorm``."""
    weight: torch.Tensor
    bias: torch.Tensor


def affine(module: nn.Linear | nn.LayerNorm) -> Affine:
    return Affine(module.weight, module.bias)


class QKV(NamedTuple):
    """What :func:`pre_attention` needs of a self-attention module."""
    q: Affine
    k: Affine
    v: Affine
    norm_q: torch.Tensor     # RMSNorm weights
    norm_k: torch.Tensor


class Rope(NamedTuple):
    """Cosines and sines of the rotation angles, (L, 1, head_dim/2) float64, tokens in window order."""
    cos: torch.Tensor
    sin: torch.Tensor


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


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads*d): an attention output back to tokens."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def window_order(f: int, h: int, w: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse): ``x[:, order]`` puts (t, y, x)-ordered tokens in window order, ``[:, inverse]``
    undoes it. The DiT keeps its tokens in window order for the whole chunk: every op but attention
    and RoPE is per token, so the result is the same, and no layer has to regroup q, k, v and the
    attention output (docs/performance.md, "Window-ordered tokens")."""
    idx = torch.arange(f * h * w, device=device).view(1, -1, 1)
    return to_windows(idx, f, h, w).reshape(-1), from_windows(idx.view(-1, BLOCK_TOKENS, 1), f, h, w).reshape(-1)


def pre_attention(x, modulation, t_mod, qkv: QKV, rot: Rope, heads: int,
                  rope_dtype: torch.dtype = torch.float64):
    """Modulated norm1, q/k/v, RMS norms and RoPE of window-ordered tokens, as (windows, 128, C);
    also the window means of q and k, and the block's six modulation vectors (shift, scale and gate
    of self-attention, then of the FFN)."""
    mods = (modulation + t_mod).chunk(6, dim=1)
    shift, scale = mods[0], mods[1]
    y = F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift
    q = rope(rms_norm(F.linear(y, *qkv.q), qkv.norm_q), rot.cos, rot.sin, heads, rope_dtype)
    k = rope(rms_norm(F.linear(y, *qkv.k), qkv.norm_k), rot.cos, rot.sin, heads, rope_dtype)
    v = F.linear(y, *qkv.v)
    c = x.shape[-1]
    q_w, k_w, v_w = (t.view(-1, BLOCK_TOKENS, c) for t in (q, k, v))
    return q_w, k_w, v_w, q_w.mean(dim=1), k_w.mean(dim=1), mods


def post_self_attention(x, o, out: Affine, gate, norm3: Affine, cross_q: Affine, cross_norm_q):
    """Self-attention output projection and gated residual; then the cross-attention query."""
    x = x + gate * F.linear(o, *out)
    q = rms_norm(F.linear(F.layer_norm(x, (x.shape[-1],), *norm3, eps=EPS), *cross_q), cross_norm_q)
    return x, q


def _ffn_input(x, o, out: Affine, shift, scale):
    """Cross-attention output projection and residual; then the FFN's modulated norm."""
    x = x + F.linear(o, *out)
    return x, F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale) + shift


def post_cross_attention(x, o, out: Affine, ffn_mod, ffn_in: Affine, ffn_out: Affine):
    """``ffn_mod``: the FFN's (shift, scale, gate)."""
    shift, scale, gate = ffn_mod
    x, y = _ffn_input(x, o, out, shift, scale)
    return x + gate * F.linear(F.gelu(F.linear(y, *ffn_in), approximate="tanh"), *ffn_out)


def post_cross_attention_gelu_epilogue(x, o, out: Affine, ffn_mod, ffn_in: Affine, ffn_out: Affine):
    """:func:`post_cross_attention` with the FFN's bias and tanh GELU applied by the GEMM itself
    (cuBLASLt epilogue) instead of a separate pass over the (L, 8960) activations (docs/performance.md,
    "GELU in the GEMM epilogue"). The GELU is taken of the float32 accumulator before the one
    rounding to bf16 (eager rounds, then applies GELU), a difference within bf16 rounding."""
    if not x.is_cuda:       # the CPU kernel of _addmm_activation applies the erf GELU, not tanh
        return post_cross_attention(x, o, out, ffn_mod, ffn_in, ffn_out)
    shift, scale, gate = ffn_mod
    x, y = _ffn_input(x, o, out, shift, scale)
    hidden = torch._addmm_activation(ffn_in.bias, y.reshape(-1, y.shape[-1]), ffn_in.weight.t(), use_gelu=True)
    return x + gate * F.linear(hidden.view(*y.shape[:-1], -1), *ffn_out)


def pre_attention_fp32_rope(x, modulation, t_mod, qkv: QKV, rot: Rope, heads: int):
    """:func:`pre_attention` with RoPE in float32: the rotated bf16 values differ from float64's only
    where a float32 rounding crosses a bf16 rounding boundary (one step, rarely)."""
    return pre_attention(x, modulation, t_mod, qkv, rot, heads, torch.float32)


@dataclass(frozen=True)
class BlockSteps:
    """One implementation of the three steps a block runs around its attention calls."""
    pre_attention: Callable
    post_self_attention: Callable
    post_cross_attention: Callable


EAGER = BlockSteps(pre_attention, post_self_attention, post_cross_attention)
# What the CUDA fast path compiles: the eager steps, with the FFN's GELU moved into its GEMM and
# RoPE in float32.
FAST = BlockSteps(pre_attention_fp32_rope, post_self_attention, post_cross_attention_gelu_epilogue)


@functools.lru_cache(maxsize=1)
def compiled_steps() -> BlockSteps | None:
    """The fast-path steps through torch.compile (static shapes: two per resolution), or None."""
    if not triton_usable():
        return None
    return BlockSteps(**{f.name: compile_with_fallback(getattr(FAST, f.name), f"DiT step {f.name!r}", fullgraph=True)
                         for f in fields(BlockSteps)})
