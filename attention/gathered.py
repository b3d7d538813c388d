"""Exact block-sparse attention in plain PyTorch: each query block's selected key/value blocks are
gathered and fed to a fused attention kernel, a bounded number of blocks at a time.

This is the block-sparse path wherever no sparse kernel runs: CUDA without Triton (Windows ComfyUI's
default), Apple MPS, the CPU. Its work grows with the selected blocks only, unlike the masked-SDPA
reference, which computes every block and materialises a token-level mask.

Paged (``paged_attention``), CUDA only: no gather at all. The keys and values are laid out once per
call as 128-token pages, one page per (batch, head, key block), and torch's ``varlen_attn`` reads each
(batch, head, query block)'s selected pages through a block table built from the LUT on the device:
no host synchronisation. It needs a flash kernel that takes 128-token pages; where it refuses, the
dispatcher's negative cache moves to the gathered path.

Two ways to attend over the gathered blocks:
- ``varlen``: CUDA, fp16/bf16, torch's ``varlen_attn`` (a flash kernel over packed sequences): every
  (batch, head, query block) is one sequence of 128 queries and ``count * 128`` keys, no padding.
- ``padded``: anywhere: query blocks side by side as a batch, keys padded to the chunk's largest
  count and a key-padding mask (broadcast over the queries, never materialised per token).

One host synchronisation per call (the per-row counts, B*H*Lq/128 integers) sizes the chunks.
Empty query blocks output exactly zero.
"""
from __future__ import annotations

import inspect
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .block_sparse import BLOCK

# Gathered key + value bytes per chunk: the extra memory this path holds at once, whatever the size.
GATHER_BUDGET_BYTES = 512 << 20
# On CUDA a chunk may grow past the budget until each varlen call has this many query blocks per
# streaming multiprocessor (one program each): with the bare budget a call at 768x1408 held ~30-60
# query blocks on a 132-SM GPU and the flash kernel ran at ~50 TFLOP/s (docs/performance.md,
# "Without Triton"); never past a quarter of the device's free memory.
WAVES = 2
FREE_SHARE = 4


def varlen_function():
    """torch's packed-sequence flash attention (torch >= 2.9), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def chunk_blocks(budget_bytes: int, block_bytes: int, widest: int, device: torch.device) -> int:
    """Gathered blocks per chunk: the budget's, or on CUDA enough for ``WAVES`` query blocks per SM
    at the widest row where a quarter of the free memory holds them."""
    blocks = max(1, budget_bytes // block_bytes)
    if device.type != "cuda":
        return blocks
    wanted = WAVES * torch.cuda.get_device_properties(device).multi_processor_count * max(1, widest)
    free, _ = torch.cuda.mem_get_info(device)       # a driver query: no stream synchronisation
    return max(blocks, min(wanted, free // FREE_SHARE // block_bytes))


def plan_chunks(counts: np.ndarray, blocks_per_chunk: int) -> list[tuple[int, int]]:
    """Equal, consecutive row ranges ``[r0, r1)`` whose padded gather (rows x the largest count) stays
    within ``blocks_per_chunk`` blocks (one row alone may exceed it). No Python step per row."""
    widest = max(1, int(counts.max()))
    rows = max(1, blocks_per_chunk // widest)
    return [(r0, min(r0 + rows, len(counts))) for r0 in range(0, len(counts), rows)]


def gathered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor,
                       counts: torch.Tensor, scale: Optional[float] = None, *,
                       budget_bytes: int = GATHER_BUDGET_BYTES, method: str = "auto") -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) in any layout with a contiguous last dim; ``lut``/``counts``
    from ``build_lut``. Returns (B, H, Lq, D). ``method``: "auto", "varlen" or "padded"."""
    bsz, heads, lq, dim = q.shape
    nq, nk = lq // BLOCK, k.shape[2] // BLOCK
    rows_total = bsz * heads * nq
    use_varlen = method == "varlen" or (
        method == "auto" and q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16)
        and varlen_function() is not None)
    host_counts = counts.reshape(-1).cpu().numpy()
    block_bytes = 2 * BLOCK * dim * k.element_size()
    blocks_per_chunk = chunk_blocks(budget_bytes, block_bytes, int(host_counts.max(initial=0)), q.device)

    q_rows = q.reshape(rows_total, BLOCK, dim)             # a copy only if q is a strided view
    # One row of 128 keys per (batch, head, key block): a copy of the ring's (L, H, D) layout, after
    # which every gather is an index_select of whole 32 KB rows (multi-dimensional advanced indexing
    # of the strided view computes an index per element and runs several times slower).
    k_blocks = k.reshape(bsz * heads * nk, BLOCK * dim)
    v_blocks = v.reshape(bsz * heads * nk, BLOCK * dim)
    first = (torch.arange(rows_total, device=q.device) // nq * nk)[:, None]
    block_ids = lut.reshape(rows_total, nk).long() + first  # rows of k_blocks, selected ones first
    out = torch.zeros_like(q_rows)
    for r0, r1 in plan_chunks(host_counts, blocks_per_chunk):
        widest = int(host_counts[r0:r1].max())
        if widest == 0:
            continue                                        # every row empty: zeros already
        if use_varlen:
            out[r0:r1] = _varlen_chunk(q_rows[r0:r1], k_blocks, v_blocks, block_ids[r0:r1], counts.reshape(-1)[r0:r1],
                                       int(host_counts[r0:r1].sum()), widest, scale)
        else:
            out[r0:r1] = _padded_chunk(q_rows[r0:r1], k_blocks, v_blocks, block_ids[r0:r1], counts.reshape(-1)[r0:r1],
                                       widest, scale)
    empty = torch.from_numpy(host_counts == 0).to(q.device, non_blocking=True)
    out.masked_fill_(empty[:, None, None], 0)               # 0/0 rows of either kernel, exactly zero
    return out.reshape(bsz, heads, lq, dim)


def _padded_chunk(q_rows, k_blocks, v_blocks, block_ids, counts, widest: int, scale):
    n, dim = q_rows.shape[0], q_rows.shape[-1]
    ids = block_ids[:, :widest].reshape(-1)                             # (n * widest), valid first per row
    keys = k_blocks.index_select(0, ids).view(n, 1, widest * BLOCK, dim)    # gathered: (n, 1, w*128, D)
    vals = v_blocks.index_select(0, ids).view(n, 1, widest * BLOCK, dim)
    valid = torch.arange(widest, device=q_rows.device)[None, :] < counts[:, None]
    mask = valid.repeat_interleave(BLOCK, dim=1)[:, None, None, :]     # (n, 1, 1, w*128), broadcast
    o = F.scaled_dot_product_attention(q_rows[:, None], keys, vals, attn_mask=mask, scale=scale)
    return o[:, 0]


def _varlen_chunk(q_rows, k_blocks, v_blocks, block_ids, counts, selected: int, widest: int, scale):
    """Packed: the chunk's selected blocks back to back (``selected`` of them, known on the host), so
    no padding and no mask. The packing index is computed on the device from the counts."""
    n, dim = q_rows.shape[0], q_rows.shape[-1]
    device = q_rows.device
    ends = torch.cumsum(counts.long(), 0)                                # (n,)
    slot = torch.arange(selected, device=device)
    row = torch.searchsorted(ends, slot, right=True)                     # the row each packed block is for
    col = slot - (ends - counts.long())[row]
    ids = block_ids[row, col]
    keys = k_blocks.index_select(0, ids).view(selected * BLOCK, 1, dim)
    vals = v_blocks.index_select(0, ids).view(selected * BLOCK, 1, dim)
    cu_q = torch.arange(0, (n + 1) * BLOCK, BLOCK, device=device, dtype=torch.int32)
    cu_k = torch.zeros(n + 1, device=device, dtype=torch.int32)
    cu_k[1:] = (ends * BLOCK).to(torch.int32)
    o = varlen_function()(q_rows.reshape(n * BLOCK, 1, dim), keys, vals, cu_q, cu_k, BLOCK, widest * BLOCK,
                          scale=scale)
    return o.reshape(n, BLOCK, dim)


def varlen_refusal(q) -> Optional[str]:
    """Why torch's varlen flash kernel cannot take this call (None: it can)."""
    if q.device.type != "cuda":
        return "varlen attention runs on CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"varlen attention needs float16 or bfloat16, got {q.dtype}"
    if varlen_function() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def paged_refusal(q) -> Optional[str]:
    why = varlen_refusal(q)
    if why is not None:
        return why
    fn = varlen_function()
    if not {"block_table", "seqused_k"} <= set(inspect.signature(fn).parameters):
        return f"torch {torch.__version__}'s varlen_attn takes no block_table (paged KV)"
    return None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lut: torch.Tensor,
                    counts: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """Block-sparse attention through varlen_attn's paged KV: one page per (batch, head, key block),
    each (batch, head, query block) a sequence whose block table is its LUT row. Same arguments and
    result as :func:`gathered_attention`."""
    bsz, heads, lq, dim = q.shape
    nq, nk = lq // BLOCK, k.shape[2] // BLOCK
    rows = bsz * heads * nq
    device = q.device
    # (B*H*nk, 128, 1, D) pages: one copy of the ring's keys and values (its layout is (L, H, D))
    k_pages = k.reshape(bsz * heads * nk, BLOCK, 1, dim)
    v_pages = v.reshape(bsz * heads * nk, BLOCK, 1, dim)
    first_page = (torch.arange(bsz * heads, device=device, dtype=torch.int32) * nk)[:, None, None]
    table = (lut.reshape(bsz * heads, nq, nk) + first_page).reshape(rows, nk)
    used = counts.reshape(rows).to(torch.int32) * BLOCK
    cu_k = torch.zeros(rows + 1, device=device, dtype=torch.int32)
    cu_k[1:] = torch.cumsum(used, 0, dtype=torch.int32)
    cu_q = torch.arange(0, (rows + 1) * BLOCK, BLOCK, device=device, dtype=torch.int32)
    out = varlen_function()(q.reshape(rows * BLOCK, 1, dim), k_pages, v_pages, cu_q, cu_k, BLOCK, nk * BLOCK,
                            scale=scale, seqused_k=used, block_table=table)
    out = out.reshape(rows, BLOCK, dim).masked_fill((counts.reshape(rows) == 0)[:, None, None], 0)
    return out.reshape(bsz, heads, lq, dim)

