"""Sequence parallelism for the DiT across processes (Ulysses style), exact by construction.

Every rank holds a contiguous run of the chunk's 128-token windows for everything that works per
token (modulation, norms, linears, RoPE, the FFN, cross-attention to the prompt, the head). Only
LCSA self-attention needs every window at once; its draft scores, top-k and block masks are per
head, so an all-to-all turns the window slice into a head slice just before it (q, k, v and the
window means of q and k) and another turns the attention output back. Each rank's KV ring then
holds only its heads.

Windows are split as evenly as they go (``window_split``: the first ranks take one more), or with
fewer for rank 0, which also upsamples, embeds and colour-fixes (``rank0_share``); the collectives
take per-rank sizes, so nothing is padded and no rank computes a padded row. A rank may get no
window at all (a small frame on many ranks): it then only serves its heads. The heads always split
evenly.

The values each rank computes are the one-process values of the same rows and heads: no reduction
crosses a rank boundary (docs/parallel.md, "Why the frames are the same").
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .lcsa import BLOCK_TOKENS

PARTS = 3 * BLOCK_TOKENS + 2     # rows per window sent to attention: q, k, v tokens, then the two means


def check_heads(heads: int, world: int) -> None:
    """Heads must split evenly: each rank attends over whole heads (12 heads: 1, 2, 3, 4, 6, 12 ranks)."""
    if world < 1 or heads % world:
        ok = ", ".join(str(n) for n in range(1, heads + 1) if heads % n == 0)
        raise ValueError(f"the DiT has {heads} attention heads, which do not split over {world} processes: "
                         f"use {ok} GPUs")


def window_split(windows: int, world: int, rank0_share: float = 1.0) -> list[int]:
    """Windows per rank, contiguous and in rank order. Rank 0 gets ``rank0_share`` times another
    rank's share (rounded); the others split the rest, their sizes differing by one at most."""
    if not 0.0 <= rank0_share <= 1.0:
        raise ValueError(f"rank0_share must be in [0, 1], got {rank0_share}")
    if rank0_share == 1.0 or world == 1:
        base, extra = divmod(windows, world)
        return [base + (r < extra) for r in range(world)]
    first = round(windows * rank0_share / (rank0_share + world - 1))
    base, extra = divmod(windows - first, world - 1)
    return [first] + [base + (r < extra) for r in range(world - 1)]


class SequenceParallel:
    """The process group of one sequence-parallel DiT and its collectives, for one chunk shape at a time.

    ``group``: the processes (default: the whole world); rank 0 of the group embeds the chunk and
    gets the head's output back. All methods are collective: every rank calls them in the same order.
    """

    def __init__(self, heads: int, group=None, rank0_share: float = 1.0) -> None:
        self.group = group
        window_split(1, 1, rank0_share)           # checks the value
        self.rank0_share = rank0_share            # every rank must use rank 0's (see engine/parallel.py)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        check_heads(heads, self.world)
        self.heads = heads // self.world          # heads this rank attends over

    def split(self, windows: int) -> list[int]:
        return window_split(windows, self.world, self.rank0_share)

    def own_tokens(self, windows: int) -> slice:
        """This rank's tokens of a window-ordered chunk of ``windows`` windows."""
        sizes = self.split(windows)
        start = sum(sizes[: self.rank])
        return slice(start * BLOCK_TOKENS, (start + sizes[self.rank]) * BLOCK_TOKENS)

    # ---- rank 0 <-> all: the chunk's tokens in, the head's output out ----------------------------
    def scatter(self, x: torch.Tensor | None, windows: int, channels: int, dtype, device) -> torch.Tensor:
        """Rank 0 passes the window-ordered (1, L, C) tokens, the others None; each gets its (1, L_own, C)."""
        sizes = [n * BLOCK_TOKENS for n in self.split(windows)]
        out = torch.empty((sizes[self.rank], channels), dtype=dtype, device=device)
        if self.rank == 0:
            send, send_sizes = x.reshape(-1, channels), sizes
        else:
            send, send_sizes = out.new_empty((0, channels)), [0] * self.world
        recv_sizes = [sizes[self.rank] if src == 0 else 0 for src in range(self.world)]
        dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.group)
        return out.unsqueeze(0)

    def gather(self, y: torch.Tensor, windows: int) -> torch.Tensor | None:
        """Each rank's (1, L_own, C') -> the window-ordered (1, L, C') on rank 0, None elsewhere."""
        sizes = [n * BLOCK_TOKENS for n in self.split(windows)]
        channels = y.shape[-1]
        rows = sum(sizes) if self.rank == 0 else 0
        out = y.new_empty((rows, channels))
        recv_sizes = sizes if self.rank == 0 else [0] * self.world
        send_sizes = [sizes[self.rank] if dst == 0 else 0 for dst in range(self.world)]
        dist.all_to_all_single(out, y.reshape(-1, channels).contiguous(), recv_sizes, send_sizes, group=self.group)
        return out.unsqueeze(0) if self.rank == 0 else None

    # ---- around self-attention: windows <-> heads ----------------------------------------------
    def to_heads(self, q_w, k_w, v_w, pooled_q, pooled_k, windows: int):
        """This rank's windows of all heads -> all windows of this rank's heads.

        q_w, k_w, v_w: (w_own, 128, C); pooled_*: (w_own, C). Returns the same five for all windows
        with C/world channels (views into one receive buffer). One all-to-all: everything is packed
        per destination as (windows, q|k|v|pooled_q|pooled_k rows, channels of its heads).
        """
        n, w, c = self.world, q_w.shape[0], q_w.shape[-1]
        cn = c // n
        send = q_w.new_empty((n, w, PARTS, cn))
        for i, t in enumerate((q_w, k_w, v_w)):
            rows = slice(i * BLOCK_TOKENS, (i + 1) * BLOCK_TOKENS)
            send[:, :, rows].copy_(t.view(w, BLOCK_TOKENS, n, cn).permute(2, 0, 1, 3))
        send[:, :, PARTS - 2].copy_(pooled_q.view(w, n, cn).transpose(0, 1))
        send[:, :, PARTS - 1].copy_(pooled_k.view(w, n, cn).transpose(0, 1))
        sizes = self.split(windows)
        recv = q_w.new_empty((windows, PARTS, cn))     # sources in rank order = windows in chunk order
        dist.all_to_all_single(recv, send, sizes, [1] * n, group=self.group)
        t = BLOCK_TOKENS
        return (recv[:, :t], recv[:, t:2 * t], recv[:, 2 * t:3 * t], recv[:, PARTS - 2], recv[:, PARTS - 1])

    def to_tokens(self, o: torch.Tensor, windows: int) -> torch.Tensor:
        """(1, L, C/world) attention output of this rank's heads -> (1, L_own, C) of its windows."""
        sizes = [m * BLOCK_TOKENS for m in self.split(windows)]
        cn = o.shape[-1]
        mine = sizes[self.rank]
        recv = o.new_empty((self.world, mine, cn))
        dist.all_to_all_single(recv, o.reshape(-1, cn).contiguous(), [1] * self.world, sizes, group=self.group)
        return recv.permute(1, 0, 2).reshape(1, mine, self.world * cn)
