"""Locality-constrained sparse attention (LCSA): the block masks of FlashVSR's self-attention.

Tokens are grouped into 128-token windows of 2 latent frames x 8 x 8 tokens. A query window may only
attend to key windows that (a) lie inside a ``local_range`` neighbourhood on the block grid and (b)
survive a top-k over softmax-normalised scores of window-mean-pooled queries and keys. The rules
below follow the official code exactly (docs/model.md §8); every one of them changes outputs:
pooled scores in the compute dtype, softmax in float32, the top-k taken *globally* per
(head, query group) over all of its query rows, and a *strict* ``>`` against the (k+1)-th value.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

WINDOW = (2, 8, 8)          # (frames, rows, cols) of latent tokens per 128-token window
BLOCK_TOKENS = WINDOW[0] * WINDOW[1] * WINDOW[2]


def topk_ratio_for(sparse_ratio: float, height: int, width: int) -> float:
    """The drivers' resolution-normalised budget; same float operations in the same order."""
    return sparse_ratio * 768 * 1280 / (height * width)


def topk_count(windows_per_group: int, topk_ratio: float) -> int:
    """Number of blocks kept per (head, query group), before clipping to the candidate count."""
    return int(windows_per_group * windows_per_group * topk_ratio) - 1


def local_block_mask(block_rows: int, block_cols: int, local_range: int,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """(s1, s1) bool: query block (r, c) may see key block (r', c') inside an R x R window.

    The window starts at ``r - R//2`` and is not clamped at the borders, so edge blocks see fewer
    neighbours (the official "normal slide" variant).
    """
    rows = torch.arange(block_rows, device=device)
    cols = torch.arange(block_cols, device=device)
    r = rows[:, None].expand(block_rows, block_cols).reshape(-1)
    c = cols[None, :].expand(block_rows, block_cols).reshape(-1)
    half = local_range // 2
    r0, c0 = r - half, c - half
    in_rows = (r[None, :] >= r0[:, None]) & (r[None, :] <= (r0 + local_range - 1)[:, None])
    in_cols = (c[None, :] >= c0[:, None]) & (c[None, :] <= (c0 + local_range - 1)[:, None])
    return in_rows & in_cols


def local_bias(local_mask: torch.Tensor, query_groups: int, key_groups: int) -> torch.Tensor:
    """(query_groups*s1, key_groups*s1) float32: 0 where ``local_mask`` allows a block, -inf elsewhere,
    tiled over every (query group, key group) pair. The same for every layer of a chunk, so callers
    may build it once per shape and pass it to :func:`draft_block_mask`."""
    bias = torch.zeros(local_mask.shape, dtype=torch.float32, device=local_mask.device)
    bias = bias.masked_fill(~local_mask, float("-inf"))
    return bias.repeat(query_groups, key_groups)


def select_above_kth(flat: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``flat`` (R, N): the (kept+1)-th largest value ``t`` (R, 1) and the mask ``flat > t``.

    ``t`` is upstream's ``topk(kept+1).values[..., -1]``: an order statistic, so every exact selection
    algorithm returns the same value, ties included (NaN counts as the largest value, as in
    ``torch.sort``). On CUDA this is the full sort (faster than ``topk``, and torch's ``kthvalue``
    there runs one thread block per row; docs/performance.md, "Top-k threshold by sort on CUDA"),
    and the attention session's Triton kernel replaces it; on the CPU quickselect (``kthvalue``)
    beats the sort.
    """
    n = flat.shape[1]
    if not 0 <= kept < n:
        raise ValueError(f"kept must be in [0, {n}) for rows of {n} candidates, got {kept}")
    if flat.is_cuda:
        thresholds = torch.sort(flat, dim=1, descending=True).values[:, kept:kept + 1]
    else:
        thresholds = torch.kthvalue(flat, n - kept, dim=1, keepdim=True).values
    return flat > thresholds, thresholds


def draft_block_mask(pooled_q: torch.Tensor, pooled_k: torch.Tensor, num_heads: int,
                     query_groups: int, local_mask: torch.Tensor, topk: int,
                     return_details: bool = False, *, bias: torch.Tensor | None = None,
                     select: Callable | None = None):
    """Select the key windows each query window attends to.

    pooled_q: (nq, C) window means of the queries (C = heads x head_dim), nq = query_groups * s1.
    pooled_k: (nk, C) window means of the keys (cached groups first, oldest first).
    local_mask: (s1, s1) bool from :func:`local_block_mask`.
    bias: :func:`local_bias` for this (nq, nk), or None to build it here.
    select: a faster stand-in for :func:`select_above_kth` with the same results (the attention
    session's Triton selection); it may return None for calls it cannot serve.
    Returns a (1, heads, nq, nk) bool mask (head h uses ``mask[:, h]``), and with
    ``return_details`` also a dict of the draft scores, probabilities and thresholds.
    """
    nq, channels = pooled_q.shape
    nk = pooled_k.shape[0]
    s1 = local_mask.shape[0]
    head_dim = channels // num_heads
    q = pooled_q.view(nq, num_heads, head_dim).transpose(0, 1)          # (H, nq, d)
    k = pooled_k.view(nk, num_heads, head_dim).transpose(0, 1)          # (H, nk, d)
    # Scores stay in the compute dtype, as upstream; only the mask addition promotes to float32
    # (half + float32 bias computes in float32: the values of an explicit cast first, one kernel less).
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(head_dim)   # (H, nq, nk)
    if bias is None:
        bias = local_bias(local_mask, nq // s1, nk // s1)
    if scores.dtype == torch.float64:
        scores = scores.to(torch.float32)
    scores = scores + bias                                               # (H, nq, nk) float32
    probs = torch.softmax(scores, dim=-1)
    flat = probs.reshape(num_heads * query_groups, s1 * nk)             # index = head*groups + group
    kept = min(flat.shape[1] - 1, topk)
    # The (kept+1)-th largest value per row, as upstream's topk(kept+1)[-1], and a strict ">".
    chosen = select(flat, kept) if select is not None else None
    flat_mask, thresholds = chosen if chosen is not None else select_above_kth(flat, kept)
    mask = flat_mask.reshape(num_heads, nq, nk).unsqueeze(0)
    if not return_details:
        return mask
    return mask, {"scores": scores, "probs": probs, "thresholds": thresholds.squeeze(1)}
