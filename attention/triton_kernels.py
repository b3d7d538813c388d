"""Triton block-sparse attention over 128x128 blocks (LCSA), bf16/fp16 and INT8-QK variants.

Self-contained on purpose (absolute imports of torch and triton only): the dispatcher imports it
lazily, and the CPU tests load a second copy of this file with ``TRITON_INTERPRET=1`` set, because
``triton.jit`` decides between compiled and interpreted at decoration time.

One program per (query block of 128 rows, batch*head). The program walks only its selected key
blocks through a look-up table (selected block ids first, then a count), so the cost is
proportional to the selected blocks, not to the number of candidates. Softmax is online, in fp32,
in base 2; a query block with no selected key block writes exact zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MASK_BLOCK = 128          # FlashVSR's LCSA block, both axes (docs/model.md §8)
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    block_n: int          # key tile; 64 splits each 128-key block in two
    num_warps: int
    num_stages: int
    tma: bool = False     # Q/K/V/O through tensor descriptors (Hopper's bulk copy engine) where addressable
    longest_first: bool = True   # launch the query blocks with the most key blocks first (shorter tail)

    def __post_init__(self) -> None:
        if self.block_n not in (64, 128):
            raise ValueError(f"block_n must be 64 or 128, got {self.block_n}")

    def label(self) -> str:
        order = "" if self.longest_first else " grid-order"
        return f"{'tma' if self.tma else 'ptr'} N{self.block_n} w{self.num_warps} s{self.num_stages}{order}"


# Chosen by measurement on H100 (attention/bench.py sweep, docs/benchmarks.md): TMA loads, 64-key
# tiles and 4 warps use 252 registers and 96 KB of shared memory, so two programs share an SM and
# hide each other's softmax and load latency: 1.54-1.58 ms at 45 % density against 1.68-1.70 ms
# for 128-key tiles with 8 warps (one program per SM). Other 4-warp configs spill registers
# (ptxas, sm_90a). Other architectures get a small pointer-load tile that fits the ~100 KB of
# shared memory of sm86/sm89: a safe start, not a tuned one.
SM90_CONFIG = KernelConfig(block_n=64, num_warps=4, num_stages=2, tma=True)
# The INT8-QK kernel with the same TMA / 64-key / 4-warp shape: 1.42 ms against the bf16 kernel's
# 1.65 ms on the same H100 and masks (pointer loads, 128-key tiles, 8 warps: 1.55 ms).
SM90_INT8_CONFIG = KernelConfig(block_n=64, num_warps=4, num_stages=2, tma=True)
SAFE_CONFIG = KernelConfig(block_n=64, num_warps=8, num_stages=2)


def default_config(capability: tuple[int, int], int8: bool = False) -> KernelConfig:
    if capability[0] == 9:
        return SM90_INT8_CONFIG if int8 else SM90_CONFIG
    return SAFE_CONFIG


@triton.jit
def _task(ORDER, NQ):
    # One program per (query block, batch*head) task; ORDER lists the tasks, longest first, so the
    # last wave is not left with a few long query blocks (counts range 21..164 in a real layer).
    task = tl.load(ORDER + tl.program_id(0))
    return task % NQ, task // NQ


@triton.jit
def _pointer_program(ORDER, NQ, H, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr):
    """This program's query block, batch*head, 64-bit batch and head, and row/key/dim offsets
    (the pointer-load kernels)."""
    qblk, bh = _task(ORDER, NQ)
    return (qblk, bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64), qblk * MBLOCK + tl.arange(0, MBLOCK),
            tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM))


@triton.jit
def _empty_rows(ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Online-softmax state of ROWS query rows before any key: maxima, sums, accumulator."""
    return (tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32),
            tl.zeros([ROWS, HEAD_DIM], tl.float32))


@triton.jit
def _key_list(LUT, CNT, b, h, qblk, slb, slh, slm, scb, sch, SUB: tl.constexpr):
    """Where this query block's selected key blocks are listed, and how many key tiles to walk."""
    return LUT + b * slb + h * slh + qblk * slm, tl.load(CNT + b * scb + h * sch + qblk) * SUB


@triton.jit
def _softmax_step(qk, qk_scale, v, m_i, l_i, acc):
    """One key tile of the online softmax in base 2: ``qk * qk_scale`` are the tile's scores in log2
    units, ``v`` its values; returns the new row maxima, row sums and (rescaled) accumulator."""
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _value_tile(v, VS, vs_base, tile, offs_d, DTYPE: tl.constexpr, V_INT8: tl.constexpr, HEAD_DIM: tl.constexpr):
    """A loaded V tile in the compute dtype: as it is, or int8 times its tile's per-channel scales
    (``VS``: float32 (B, H, LK / BLOCK_N, D) contiguous; ``vs_base``: this batch*head's first scale)."""
    if V_INT8:
        scales = tl.load(VS + vs_base + tile * HEAD_DIM + offs_d)
        v = (v.to(tl.float32) * scales[None, :]).to(DTYPE)
    return v


@triton.jit
def _normalised(acc, l_i):
    # l_i is 0 only for a query block with no selected key block; acc is 0 there too.
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _bsa_fwd(
    Q, K, V, O, LUT, CNT, ORDER, NQ, qk_scale,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    slb, slh, slm, scb, sch, H,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr,
):
    qblk, _, b, h, offs_m, offs_n, offs_d = _pointer_program(ORDER, NQ, H, HEAD_DIM, BLOCK_N, MBLOCK)
    SUB: tl.constexpr = MBLOCK // BLOCK_N
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :])
    # Scalar bases only: a (D, N) tensor of 64-bit pointers held across the loop would take 64
    # registers per thread for K and again for V (spills with Triton 3.6).
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    lut, n_steps = _key_list(LUT, CNT, b, h, qblk, slb, slh, slm, scb, sch, SUB)

    m_i, l_i, acc = _empty_rows(MBLOCK, HEAD_DIM)
    for j in range(0, n_steps):
        rows = tl.load(lut + j // SUB) * MBLOCK + (j % SUB) * BLOCK_N + offs_n
        k = tl.load(k_base + rows[None, :] * skn + offs_d[:, None])             # (D, N): K^T tile
        v = tl.load(v_base + rows[:, None] * svn + offs_d[None, :])
        m_i, l_i, acc = _softmax_step(tl.dot(q, k), qk_scale, v, m_i, l_i, acc)
    out = _normalised(acc, l_i)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty))


@triton.jit
def _tma_program(q_desc, LUT, CNT, ORDER, NQ, slb, slh, slm, scb, sch, H,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr):
    """This program's query block, batch*head, batch, head, Q tile and key list (the TMA kernels)."""
    qblk, bh = _task(ORDER, NQ)
    b = bh // H
    h = bh % H
    q = q_desc.load([b, h, qblk * MBLOCK, 0]).reshape(MBLOCK, HEAD_DIM)
    lut, n_steps = _key_list(LUT, CNT, b.to(tl.int64), h, qblk, slb, slh, slm, scb, sch, MBLOCK // BLOCK_N)
    return qblk, bh, b, h, q, lut, n_steps


@triton.jit
def _bsa_fwd_tma(
    q_desc, k_desc, v_desc, o_desc, LUT, CNT, ORDER, NQ, qk_scale, slb, slh, slm, scb, sch, H,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr,
):
    # Same algorithm as _bsa_fwd; the descriptors are 4-D over (B, H, L, D) with the tensors' own
    # strides, so permuted (B, L, H, D) storage needs no copy.
    qblk, _, b, h, q, lut, n_steps = _tma_program(q_desc, LUT, CNT, ORDER, NQ, slb, slh, slm, scb, sch, H,
                                                  HEAD_DIM, BLOCK_N, MBLOCK)
    SUB: tl.constexpr = MBLOCK // BLOCK_N

    m_i, l_i, acc = _empty_rows(MBLOCK, HEAD_DIM)
    for j in range(0, n_steps):
        start = tl.load(lut + j // SUB) * MBLOCK + (j % SUB) * BLOCK_N
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        m_i, l_i, acc = _softmax_step(tl.dot(q, k.T), qk_scale, v, m_i, l_i, acc)
    out = _normalised(acc, l_i)
    o_desc.store([b, h, qblk * MBLOCK, 0], out.to(q.dtype).reshape(1, 1, MBLOCK, HEAD_DIM))


@triton.jit
def _bsa_fwd_int8_tma(
    q_desc, k_desc, v_desc, o_desc, QS, KS, VS, LUT, CNT, ORDER, NQ, slb, slh, slm, scb, sch, H, LQ, LK,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr, V_INT8: tl.constexpr = False,
):
    # _bsa_fwd_int8 with tensor-descriptor loads: int8 Q/K descriptors over the contiguous
    # quantised copies, V (int8 with V_INT8) and O over the caller's (possibly permuted) tensors.
    qblk, bh, b, h, q, lut, n_steps = _tma_program(q_desc, LUT, CNT, ORDER, NQ, slb, slh, slm, scb, sch, H,
                                                   HEAD_DIM, BLOCK_N, MBLOCK)
    SUB: tl.constexpr = MBLOCK // BLOCK_N
    q_scale = tl.load(QS + bh.to(tl.int64) * (LQ // MBLOCK) + qblk)
    ks_ptr = KS + bh.to(tl.int64) * (LK // BLOCK_N)
    vs_base = bh.to(tl.int64) * (LK // BLOCK_N) * HEAD_DIM
    offs_d = tl.arange(0, HEAD_DIM)

    m_i, l_i, acc = _empty_rows(MBLOCK, HEAD_DIM)
    for j in range(0, n_steps):
        tile = tl.load(lut + j // SUB) * SUB + j % SUB
        k = k_desc.load([b, h, tile * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([b, h, tile * BLOCK_N, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = _value_tile(v, VS, vs_base, tile, offs_d, o_desc.dtype, V_INT8, HEAD_DIM)
        qk = tl.dot(q, k.T).to(tl.float32)
        m_i, l_i, acc = _softmax_step(qk, q_scale * tl.load(ks_ptr + tile), v, m_i, l_i, acc)
    out = _normalised(acc, l_i)
    o_desc.store([b, h, qblk * MBLOCK, 0], out.to(o_desc.dtype).reshape(1, 1, MBLOCK, HEAD_DIM))


@triton.jit
def _quantize_tile(X, MEAN, Y, S, sxb, sxh, sxl, syb, syh, syl, ssb, ssh, H, multiplier, tile, bh,
                   ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, CENTRE: tl.constexpr):
    """Tile ``tile`` (ROWS rows) of batch*head ``bh``: int8 of ``(x - mean) * multiplier`` with one
    scale for the tile, into (B, H, L, D) int8 and (B, H, L / ROWS) float32 scales of any strides
    (a KV ring's slots included)."""
    bh = bh.to(tl.int64)
    b, h = bh // H, bh % H
    rows = tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + dims[None, :])
    x = x.to(tl.float32)
    if CENTRE:
        x = x - tl.load(MEAN + bh * HEAD_DIM + dims)[None, :]
    x = x * multiplier
    scale = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-8) / 127.0
    q = tl.floor(x / scale + 0.5)
    tl.store(Y + b * syb + h * syh + rows[:, None].to(tl.int64) * syl + dims[None, :], q.to(tl.int8))
    tl.store(S + b * ssb + h * ssh + tile, scale)


@triton.jit
def quantize_tiles_kernel(
    X, MEAN, Y, S, sxb, sxh, sxl, syb, syh, syl, ssb, ssh, H, multiplier,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, CENTRE: tl.constexpr,
):
    """One program per (tile, batch*head) of one tensor."""
    _quantize_tile(X, MEAN, Y, S, sxb, sxh, sxl, syb, syh, syl, ssb, ssh, H, multiplier, tl.program_id(0),
                   tl.program_id(1), ROWS, HEAD_DIM, CENTRE)


@triton.jit
def quantize_value_tiles_kernel(
    X, Y, S, sxb, sxh, sxl, syb, syh, syl, ssb, ssh, sst, H,
    ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """One program per (tile of ROWS rows, batch*head): int8 values with one scale per channel of
    the tile, into (B, H, L, D) int8 and (B, H, L / ROWS, D) float32 of any strides (a KV ring's
    slots included; the scales' last dim contiguous)."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = tile * ROWS + tl.arange(0, ROWS)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + b * sxb + h * sxh + rows[:, None].to(tl.int64) * sxl + dims[None, :]).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0), 1e-8) / 127.0          # (D,): one per channel
    q = tl.floor(x / scale[None, :] + 0.5)
    tl.store(Y + b * syb + h * syh + rows[:, None].to(tl.int64) * syl + dims[None, :], q.to(tl.int8))
    tl.store(S + b * ssb + h * ssh + tile * sst + dims, scale)


@triton.jit
def quantize_q_and_k_kernel(
    Q, K, MEAN, Q8, QS, K8, KS, sqb, sqh, sql, skb, skh, skl, H, LQ, LK, q_multiplier, Q_TILES,
    Q_ROWS: tl.constexpr, K_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Q's tiles (scaled, not centred) then K's (centred) in one launch: a launch costs the host
    tens of microseconds, twice per layer otherwise."""
    tile = tl.program_id(0)
    if tile < Q_TILES:
        _quantize_tile(Q, MEAN, Q8, QS, sqb, sqh, sql, H * LQ * HEAD_DIM, LQ * HEAD_DIM, HEAD_DIM,
                       H * (LQ // Q_ROWS), LQ // Q_ROWS, H, q_multiplier, tile, tl.program_id(1),
                       Q_ROWS, HEAD_DIM, False)
    else:
        _quantize_tile(K, MEAN, K8, KS, skb, skh, skl, H * LK * HEAD_DIM, LK * HEAD_DIM, HEAD_DIM,
                       H * (LK // K_ROWS), LK // K_ROWS, H, 1.0, tile - Q_TILES, tl.program_id(1),
                       K_ROWS, HEAD_DIM, True)


@triton.jit
def _bsa_fwd_int8(
    Q8, QS, K8, KS, V, VS, O, LUT, CNT, ORDER, NQ,
    svb, svh, svn, sob, soh, som, slb, slh, slm, scb, sch, H, LQ, LK,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr, V_INT8: tl.constexpr = False,
):
    # Q8/K8 are contiguous (B, H, L, D) int8; QS holds one scale per 128 query rows (softmax scale
    # and log2(e) folded in), KS one per BLOCK_N key rows, both contiguous (B, H, L / tile). With
    # V_INT8, V is int8 in any layout and VS its per-channel scales (B, H, LK / BLOCK_N, D).
    qblk, bh, b, h, offs_m, offs_n, offs_d = _pointer_program(ORDER, NQ, H, HEAD_DIM, BLOCK_N, MBLOCK)
    SUB: tl.constexpr = MBLOCK // BLOCK_N
    q = tl.load(Q8 + bh.to(tl.int64) * LQ * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    q_scale = tl.load(QS + bh.to(tl.int64) * (LQ // MBLOCK) + qblk)
    k_ptrs = K8 + bh.to(tl.int64) * LK * HEAD_DIM + offs_n[None, :] * HEAD_DIM + offs_d[:, None]
    ks_ptr = KS + bh.to(tl.int64) * (LK // BLOCK_N)
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :]
    vs_base = bh.to(tl.int64) * (LK // BLOCK_N) * HEAD_DIM
    lut, n_steps = _key_list(LUT, CNT, b, h, qblk, slb, slh, slm, scb, sch, SUB)

    m_i, l_i, acc = _empty_rows(MBLOCK, HEAD_DIM)
    for j in range(0, n_steps):
        tile = tl.load(lut + j // SUB) * SUB + j % SUB
        start = tile * BLOCK_N
        k = tl.load(k_ptrs + start * HEAD_DIM)
        v = _value_tile(tl.load(v_ptrs + start * svn), VS, vs_base, tile, offs_d, O.dtype.element_ty, V_INT8,
                        HEAD_DIM)
        qk = tl.dot(q, k).to(tl.float32)
        m_i, l_i, acc = _softmax_step(qk, q_scale * tl.load(ks_ptr + tile), v, m_i, l_i, acc)
    out = _normalised(acc, l_i)
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty))


def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"the triton kernel needs a contiguous last dim, got strides {t.stride()}")


def _descriptor(t: torch.Tensor, rows: int):
    """A 4-D tensor descriptor over (B, H, L, D) loading (1, 1, rows, D) tiles, or None when TMA
    cannot address the tensor (16-byte aligned base and strides) or this Triton has no descriptors."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    size = t.element_size()
    if t.data_ptr() % 16 or any((s * size) % 16 for s in t.stride()[:-1]):
        return None
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]])


def task_order(counts: torch.Tensor, longest_first: bool) -> torch.Tensor:
    """int32 task ids (batch*head*nq + query block), the query blocks with most key blocks first."""
    flat = counts.reshape(-1)
    if not longest_first:
        return torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    return torch.argsort(flat, descending=True, stable=True).to(torch.int32)


def block_sparse_attention(q, k, v, lut, counts, config: KernelConfig, scale: float | None = None,
                           order: torch.Tensor | None = None):
    """Block-sparse attention with bf16/fp16 tensor-core products and fp32 softmax.

    q (B, H, Lq, D), k/v (B, H, Lk, D), lut/counts from ``block_sparse.build_lut``; Lq and Lk multiples of 128.
    The output has q's memory layout. ``config.tma`` falls back to pointer loads where descriptors
    cannot be used. ``order`` may carry ``task_order(counts, config.longest_first)`` computed elsewhere.
    """
    _check_last_dim(q, k, v)
    _, heads, lq, dim = q.shape
    out = torch.empty_like(q)
    qk_scale = (dim ** -0.5 if scale is None else scale) * LOG2E
    nq = lq // MASK_BLOCK
    order = task_order(counts, config.longest_first) if order is None else order
    grid = (order.numel(),)
    common = dict(HEAD_DIM=dim, BLOCK_N=config.block_n, MBLOCK=MASK_BLOCK,
                  num_warps=config.num_warps, num_stages=config.num_stages)
    lut_strides = (lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1))
    if config.tma:
        descs = (_descriptor(q, MASK_BLOCK), _descriptor(k, config.block_n),
                 _descriptor(v, config.block_n), _descriptor(out, MASK_BLOCK))
        if all(d is not None for d in descs):
            _bsa_fwd_tma[grid](*descs, lut, counts, order, nq, qk_scale, *lut_strides, heads, **common)
            return out
    _bsa_fwd[grid](
        q, k, v, out, lut, counts, order, nq, qk_scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *lut_strides, heads, **common,
    )
    return out


def quantize_tiles(x: torch.Tensor, rows: int, multiplier: float = 1.0, mean: torch.Tensor | None = None,
                   out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Int8 tiles of ``(x - mean) * multiplier`` (mean (B, H, D) or None) in one Triton pass, one scale per
    ``rows`` rows and head (``block_sparse.quantize_tiles_reference`` is the torch version).

    Reads ``x`` in any layout with a contiguous last dim; never writes to it. ``out`` = (int8
    (B, H, L, D), float32 (B, H, L / rows)) views to write into (e.g. a KV ring's slots), else new
    contiguous tensors.
    """
    _check_last_dim(x)
    bsz, heads, length, dim = x.shape
    if out is None:
        out = (torch.empty((bsz, heads, length, dim), dtype=torch.int8, device=x.device),
               torch.empty((bsz, heads, length // rows), dtype=torch.float32, device=x.device))
    q8, scales = out
    _check_last_dim(q8, scales)
    centre = mean is not None
    mean = mean.float().contiguous() if centre else scales      # any pointer when not centring
    quantize_tiles_kernel[(length // rows, bsz * heads)](
        x, mean, q8, scales, x.stride(0), x.stride(1), x.stride(2), q8.stride(0), q8.stride(1), q8.stride(2),
        scales.stride(0), scales.stride(1), heads, multiplier, ROWS=rows, HEAD_DIM=dim, CENTRE=centre, num_warps=4)
    return q8, scales


def quantize_value_tiles(x: torch.Tensor, rows: int, out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Int8 values with one scale per (``rows`` rows, head, channel) in one Triton pass
    (``block_sparse.quantize_value_tiles_reference`` is the torch version, same rounding).

    Reads ``x`` in any layout with a contiguous last dim; never writes to it. ``out`` = (int8
    (B, H, L, D), float32 (B, H, L / rows, D)) views to write into (a KV ring's slots), else new
    contiguous tensors.
    """
    _check_last_dim(x)
    bsz, heads, length, dim = x.shape
    if out is None:
        out = (torch.empty((bsz, heads, length, dim), dtype=torch.int8, device=x.device),
               torch.empty((bsz, heads, length // rows, dim), dtype=torch.float32, device=x.device))
    v8, scales = out
    _check_last_dim(v8, scales)
    quantize_value_tiles_kernel[(length // rows, bsz * heads)](
        x, v8, scales, x.stride(0), x.stride(1), x.stride(2), v8.stride(0), v8.stride(1), v8.stride(2),
        scales.stride(0), scales.stride(1), scales.stride(2), heads, ROWS=rows, HEAD_DIM=dim, num_warps=4)
    return v8, scales


def quantize_q_and_k(q: torch.Tensor, k: torch.Tensor, key_rows: int, q_multiplier: float, key_mean: torch.Tensor):
    """``quantize_tiles(q, 128, q_multiplier)`` and ``quantize_tiles(k, key_rows, 1.0, key_mean)`` in one launch."""
    _check_last_dim(q, k)
    bsz, heads, lq, dim = q.shape
    lk = k.shape[2]
    q8 = torch.empty((bsz, heads, lq, dim), dtype=torch.int8, device=q.device)
    k8 = torch.empty((bsz, heads, lk, dim), dtype=torch.int8, device=k.device)
    q_scales = torch.empty((bsz, heads, lq // MASK_BLOCK), dtype=torch.float32, device=q.device)
    k_scales = torch.empty((bsz, heads, lk // key_rows), dtype=torch.float32, device=k.device)
    q_tiles = lq // MASK_BLOCK
    quantize_q_and_k_kernel[(q_tiles + lk // key_rows, bsz * heads)](
        q, k, key_mean.float().contiguous(), q8, q_scales, k8, k_scales,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), heads, lq, lk,
        q_multiplier, q_tiles, Q_ROWS=MASK_BLOCK, K_ROWS=key_rows, HEAD_DIM=dim, num_warps=4)
    return q8, q_scales, k8, k_scales


def block_sparse_attention_int8(q, k, v, lut, counts, config: KernelConfig, scale: float | None = None,
                                quantized=None, key_mean: torch.Tensor | None = None,
                                order: torch.Tensor | None = None):
    """INT8-QK variant (Sage-style): per-block int8 Q and mean-centred K, bf16/fp16 P·V, fp32 softmax.

    Q and K are quantised out of place by one Triton launch (the caller's K, often a KV cache,
    is never touched); ``k`` may instead be int8 already (``block_sparse.QuantizedKeys``). Subtracting one vector from every key leaves each softmax unchanged, so
    ``key_mean`` (B, H, D) may be any estimate of the keys' mean (the DiT passes its window means);
    without it the mean is computed. ``quantized`` may carry a precomputed :func:`quantize_q_and_k`
    result (benchmarks time the kernel alone); ``order`` a precomputed :func:`task_order`.

    ``v`` may be int8 too (``block_sparse.QuantizedValues`` of a KV ring, quantised per
    ``config.block_n`` rows): each V tile is turned into the compute dtype with its per-channel
    scales as it is loaded, and P·V runs as before (fp32 accumulation).
    """
    _, heads, lq, dim = q.shape
    lk = k.shape[2]
    multiplier = (dim ** -0.5 if scale is None else scale) * LOG2E
    if quantized is None and hasattr(k, "scales"):
        # keys already int8 (block_sparse.QuantizedKeys of a KV ring): only Q is quantised here
        if k.rows != config.block_n:
            raise ValueError(f"keys quantised per {k.rows} rows, the kernel walks {config.block_n}-key tiles")
        quantized = (*quantize_tiles(q, MASK_BLOCK, multiplier), k.values, k.scales)
    elif quantized is None:
        _check_last_dim(k)
        # float32 accumulation without a float32 copy of K (which would cost 4x the kernel's reads)
        mean = k.mean(dim=2, dtype=torch.float32) if key_mean is None else key_mean
        quantized = quantize_q_and_k(q, k, config.block_n, multiplier, mean)
    q8, q_scales, k8, k_scales = quantized
    v_int8 = hasattr(v, "scales")
    if v_int8:
        # values already int8 (block_sparse.QuantizedValues of a KV ring)
        if v.rows != config.block_n:
            raise ValueError(f"values quantised per {v.rows} rows, the kernel walks {config.block_n}-key tiles")
        v, v_scales = v.values, v.scales.contiguous()      # a ring's scales are contiguous already
    else:
        v_scales = k_scales                                # not read (V_INT8 False): any float32 pointer
    _check_last_dim(q, v)
    out = torch.empty_like(q)
    order = task_order(counts, config.longest_first) if order is None else order
    grid = (order.numel(),)
    lut_strides = (lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1))
    common = dict(HEAD_DIM=dim, BLOCK_N=config.block_n, MBLOCK=MASK_BLOCK,
                  num_warps=config.num_warps, num_stages=config.num_stages, V_INT8=v_int8)
    if config.tma:
        descs = (_descriptor(q8, MASK_BLOCK), _descriptor(k8, config.block_n),
                 _descriptor(v, config.block_n), _descriptor(out, MASK_BLOCK))
        if all(d is not None for d in descs):
            _bsa_fwd_int8_tma[grid](*descs, q_scales, k_scales, v_scales, lut, counts, order, lq // MASK_BLOCK,
                                    *lut_strides, heads, lq, lk, **common)
            return out
    k8 = k8.contiguous()           # the pointer kernel addresses K as contiguous (B, H, L, D)
    _bsa_fwd_int8[grid](
        q8, q_scales, k8, k_scales, v, v_scales, out, lut, counts, order, lq // MASK_BLOCK,
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *lut_strides, heads, lq, lk, **common,
    )
    return out


__all__ = [
    "KernelConfig", "MASK_BLOCK", "SM90_CONFIG", "SAFE_CONFIG", "default_config",
    "block_sparse_attention", "block_sparse_attention_int8", "quantize_tiles",
    "quantize_q_and_k", "quantize_value_tiles",
]
