"""Triton kernels for the per-layer block-mask bookkeeping of LCSA: the draft threshold and the LUT.

Self-contained on purpose (absolute imports of torch and triton only), like ``triton_kernels.py``:
the dispatcher imports it lazily, and the CPU tests load a second copy with ``TRITON_INTERPRET=1``.
Each kernel gives exactly the results of the torch code it replaces (``models/lcsa.py``
``select_above_kth``, ``block_sparse.build_lut``, ``triton_kernels.task_order``), in one launch
instead of several: at the real shape a 24 x 17424 selection instead of a full sort, one LUT kernel
instead of a cast, a sum, a stable sort and a cast, one ranking instead of an argsort and a cast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

SELECT_BLOCK = 2048       # row elements per step of the selection kernel
# 16 warps (4 elements per thread per step): 0.029 ms per (24, 17424) call on an H100 against 0.037 ms
# with 8 warps and 0.094 ms for torch.sort (.devcarry mask_bench sweep, docs/performance.md)
SELECT_WARPS = 16


NEG_INF_KEY = tl.constexpr(-2139095041)    # order key of -inf (bits 0xFF800000); smaller keys are negative NaNs
DEFAULT_NAN = tl.constexpr(0x7FC00000)   # the NaN a torch.sort threshold of NaNs is reported as


@triton.jit
def _key_value(key):
    """The float whose order key is ``key``: keys order floats as signed int32 (non-negative floats
    keep their bits, negative ones flip all but the sign bit); keys below -inf's give -inf."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return tl.where(key < NEG_INF_KEY, float("-inf"), bits.to(tl.float32, bitcast=True))


@triton.jit
def _count_at_or_above(base, N, value, BLOCK: tl.constexpr):
    """How many of the row's N values are >= ``value`` (NaNs never are); per-lane counts, reduced once."""
    offs = tl.arange(0, BLOCK)
    hits = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        hits += (tl.load(base + idx, mask=idx < N, other=float("nan")) >= value).to(tl.int32)
    return tl.sum(hits, 0)


@triton.jit
def select_above_kth_kernel(X, T, M, N, stride_x, stride_m, NEED, BLOCK: tl.constexpr):
    """One program per row: T[row] = the NEED-th largest value of X[row, :N], M[row] = X[row] > T[row].

    In ``torch.sort``'s order (-0.0 equals +0.0, NaN above everything) the answer's order key is the
    largest key K with at least NEED values >= K. It is built from the top bit down in two's
    complement: the sign first, then bits 30..0, each kept when at least NEED values are >= the
    candidate (setting a lower bit of a negative int32 also raises its value). The counts compare
    floats, so -0.0 and +0.0 count alike and the answer for a tie of zeros is +0.0.
    """
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    offs = tl.arange(0, BLOCK)
    nans = tl.zeros([BLOCK], tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < N, other=0.0)
        nans += (x != x).to(tl.int32)
    n_nan = tl.sum(nans, 0)
    negative = _count_at_or_above(base, N, 0.0, BLOCK) + n_nan < NEED
    found = tl.where(negative, -2147483647 - 1, 0)
    for i in range(0, 31):
        cand = found | (1 << (30 - i))
        hits = _count_at_or_above(base, N, _key_value(cand), BLOCK) + n_nan
        found = tl.where(hits >= NEED, cand, found)
    bits = tl.where(found >= 0, found, found ^ 0x7FFFFFFF)
    thr = tl.where(n_nan >= NEED, DEFAULT_NAN, bits).to(tl.float32, bitcast=True)
    tl.store(T + row, thr)
    out = M + row * stride_m
    for start in range(0, N, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < N, other=0.0)
        tl.store(out + idx, (x > thr).to(tl.uint8), mask=idx < N)


# Rows at least this long are selected by many programs per row (``radix_*`` kernels): one program
# per row reads a row ~34 times, which at 4K output (12 rows of ~1M candidates per layer) leaves
# most of the GPU idle (docs/performance.md, "Draft selection at high resolution").
WIDE_ROW = 1 << 18
RADIX_BITS = 8                      # four passes of 8-bit digits, most significant first
RADIX_SPAN = 32768                  # row elements per program in a pass (a few hundred atomics a row)
RADIX_BLOCK = 4096                  # elements per step inside a program
INT_MIN = tl.constexpr(-2147483648)


@triton.jit
def _radix_key(x):
    """int32 whose bits, read as unsigned, order floats like ``torch.sort`` with -0.0 equal to +0.0
    and every NaN the default NaN above +inf (the single-program kernel's order)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x != x, DEFAULT_NAN, tl.where(bits == INT_MIN, 0, bits))
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)         # signed order
    return key ^ INT_MIN                                        # unsigned order


@triton.jit
def radix_histogram_kernel(X, HIST, PREFIX, N, stride_x, SHIFT: tl.constexpr, SPAN: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Pass digit (key >> SHIFT) & 255 over the row's elements whose higher digits equal PREFIX[row]:
    grid (rows, programs per row); counts go to HIST[row, :256] (bins 256.. catch the others)."""
    row = tl.program_id(0).to(tl.int64)
    base = X + row * stride_x
    prefix = tl.load(PREFIX + row)
    hist = tl.zeros([512], tl.int32)
    offs = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * SPAN, tl.program_id(1) * SPAN + SPAN, BLOCK):
        idx = start + offs
        key = _radix_key(tl.load(base + idx, mask=idx < N, other=0.0))
        keep = idx < N
        if SHIFT < 24:
            keep = keep & (((key >> (SHIFT + 8)) & ((1 << (24 - SHIFT)) - 1)) == prefix)
        hist += tl.histogram(tl.where(keep, (key >> SHIFT) & 255, 256), 512)
    tl.atomic_add(HIST + row * 512 + tl.arange(0, 512), hist)


@triton.jit
def radix_pick_kernel(HIST, PREFIX, NEED, T):
    """One program per row: the digit of the NEED[row]-th largest key among the counted ones; it
    joins PREFIX[row], NEED[row] becomes the rank inside that digit, HIST[row] is cleared for the
    next pass, and T[row] holds the threshold the prefix stands for so far (final after the last)."""
    row = tl.program_id(0).to(tl.int64)
    digits = tl.arange(0, 256)
    counts = tl.load(HIST + row * 512 + digits)
    need = tl.load(NEED + row)
    at_or_above = tl.sum(counts, 0) - tl.cumsum(counts, 0) + counts      # counted keys with digit >= d
    pick = tl.max(tl.where(at_or_above >= need, digits, -1), 0)
    above = tl.sum(tl.where(digits > pick, counts, 0), 0)
    prefix = (tl.load(PREFIX + row) << 8) | pick
    tl.store(PREFIX + row, prefix)
    tl.store(NEED + row, need - above)
    tl.store(HIST + row * 512 + tl.arange(0, 512), tl.zeros([512], tl.int32))
    key = prefix ^ INT_MIN
    tl.store(T + row, tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True))


@triton.jit
def above_threshold_kernel(X, T, M, N, stride_x, stride_m, SPAN: tl.constexpr, BLOCK: tl.constexpr):
    """M[row] = X[row] > T[row] over one program's span of the row."""
    row = tl.program_id(0).to(tl.int64)
    thr = tl.load(T + row)
    offs = tl.arange(0, BLOCK)
    for start in range(tl.program_id(1) * SPAN, tl.program_id(1) * SPAN + SPAN, BLOCK):
        idx = start + offs
        x = tl.load(X + row * stride_x + idx, mask=idx < N, other=0.0)
        tl.store(M + row * stride_m + idx, (x > thr).to(tl.uint8), mask=idx < N)


def select_above_kth(flat: torch.Tensor, kept: int, *, radix: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``models.lcsa.select_above_kth`` in Triton: (mask (R, N) bool, thresholds (R, 1)) for a
    float32 (R, N) ``flat``. The threshold is the same order statistic, so the same value; where the
    tie at that rank mixes -0.0 and +0.0 it is +0.0, and a NaN threshold is the default NaN 0x7FC00000
    whatever NaN the row held (the mask is the same in both cases). Rows of ``WIDE_ROW`` candidates
    or more take a radix selection spread over many programs per row (same results; ``radix``
    forces either way)."""
    if flat.dtype != torch.float32 or flat.dim() != 2:
        raise ValueError(f"expected a float32 (R, N) tensor, got {flat.dtype} {tuple(flat.shape)}")
    rows, n = flat.shape
    if not 0 <= kept < n:
        raise ValueError(f"kept must be in [0, {n}) for rows of {n} candidates, got {kept}")
    if flat.stride(1) != 1:
        flat = flat.contiguous()
    thresholds = torch.empty((rows, 1), dtype=torch.float32, device=flat.device)
    mask = torch.empty((rows, n), dtype=torch.bool, device=flat.device)
    if radix if radix is not None else n >= WIDE_ROW:
        _radix_select(flat, kept + 1, thresholds)
        grid = (rows, triton.cdiv(n, RADIX_SPAN))
        above_threshold_kernel[grid](flat, thresholds, mask.view(torch.uint8), n, flat.stride(0), mask.stride(0),
                                     SPAN=RADIX_SPAN, BLOCK=RADIX_BLOCK, num_warps=8)
        return mask, thresholds
    select_above_kth_kernel[(rows,)](flat, thresholds, mask.view(torch.uint8), n, flat.stride(0), mask.stride(0),
                               kept + 1, BLOCK=SELECT_BLOCK, num_warps=SELECT_WARPS)
    return mask, thresholds


def _radix_select(flat: torch.Tensor, need: int, thresholds: torch.Tensor) -> None:
    """thresholds[row] = the need-th largest value of flat[row] (sort order as above): four passes,
    each a histogram of one 8-bit digit over the whole GPU, then one small program per row."""
    rows, n = flat.shape
    dev = flat.device
    hist = torch.zeros((rows, 512), dtype=torch.int32, device=dev)
    prefix = torch.zeros(rows, dtype=torch.int32, device=dev)
    left = torch.full((rows,), need, dtype=torch.int32, device=dev)
    grid = (rows, triton.cdiv(n, RADIX_SPAN))
    for shift in range(32 - RADIX_BITS, -1, -RADIX_BITS):
        radix_histogram_kernel[grid](flat, hist, prefix, n, flat.stride(0), SHIFT=shift, SPAN=RADIX_SPAN,
                                     BLOCK=RADIX_BLOCK, num_warps=8)
        radix_pick_kernel[(rows,)](hist, prefix, left, thresholds, num_warps=4)


@triton.jit
def lut_rows_kernel(MASK, LUT, CNT, NK, BLOCK: tl.constexpr):
    """One program per (batch, head, query block) row of NK key blocks: selected ids first in
    ascending order, then the others in ascending order (a stable descending sort of the flags)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < NK
    flag = (tl.load(MASK + row * NK + offs, mask=inside, other=0) != 0).to(tl.int32)
    before = tl.cumsum(flag, 0)                       # selected ids up to and including this one
    count = tl.sum(flag, 0)
    dest = tl.where(flag != 0, before - 1, count + offs - before)
    tl.store(LUT + row * NK + dest, offs, mask=inside)
    tl.store(CNT + row, count)


def lut_from_mask(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_sparse.build_lut`` in one kernel: (B, H, nq, nk) bool -> (indices int32, counts int32)."""
    if block_mask.dtype != torch.bool or block_mask.dim() != 4:
        raise ValueError(f"expected a bool (B, H, nq, nk) mask, got {block_mask.dtype} {tuple(block_mask.shape)}")
    flags = block_mask.contiguous()
    nk = flags.shape[-1]
    lut = torch.empty(flags.shape, dtype=torch.int32, device=flags.device)
    if nk == 0 or flags.numel() == 0:
        return lut, torch.zeros(flags.shape[:-1], dtype=torch.int32, device=flags.device)
    counts = torch.empty(flags.shape[:-1], dtype=torch.int32, device=flags.device)
    block = triton.next_power_of_2(nk)
    lut_rows_kernel[(flags.numel() // nk,)](flags.view(torch.uint8), lut, counts, nk, BLOCK=block,
                                      num_warps=max(1, min(8, block // 256)))
    return lut, counts


@triton.jit
def rank_longest_first_kernel(CNT, ORDER, N, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """ORDER[rank(i)] = i with rank(i) = #{j: c_j > c_i} + #{j < i: c_j == c_i}: a stable descending sort."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    c_i = tl.load(CNT + i, mask=i < N, other=0)
    rank = tl.zeros([BLOCK_I], tl.int32)
    for start in range(0, N, BLOCK_J):
        j = start + tl.arange(0, BLOCK_J)
        c_j = tl.load(CNT + j, mask=j < N, other=0)
        ahead = (c_j[None, :] > c_i[:, None]) | ((c_j[None, :] == c_i[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((ahead & (j[None, :] < N)).to(tl.int32), 1)
    tl.store(ORDER + rank, i, mask=i < N)


def longest_first_order(counts: torch.Tensor) -> torch.Tensor:
    """``triton_kernels.task_order(counts, longest_first=True)`` in one kernel: the int32 flat ids of
    ``counts`` (int32), largest count first, equal counts in id order."""
    if counts.dtype != torch.int32:
        raise ValueError(f"expected int32 counts, got {counts.dtype}")
    flat = counts.reshape(-1).contiguous()
    order = torch.empty(flat.numel(), dtype=torch.int32, device=flat.device)
    if flat.numel():
        # 16 ids per program: 99 programs for the real 1584 query blocks, one wave on an H100
        rank_longest_first_kernel[(triton.cdiv(flat.numel(), 16),)](flat, order, flat.numel(), BLOCK_I=16,
                                                                BLOCK_J=256, num_warps=4)
    return order


__all__ = ["longest_first_order", "lut_from_mask", "select_above_kth"]
