"""Spatial tiles of one chunk run through the DiT as one batch (issue #14, "batched tiles").

Tiles of a chunk are independent streams of the same shape. Everything in a DiT block but the
self-attention works on each token by itself, so the tiles simply go on the batch axis there
(B = tiles). The self-attention (LCSA) is per head: its draft mask, top-k, KV ring and kernels
treat each head on its own. So a batch of tiles enters it as *one* stream with ``tiles x heads``
heads: the channels of the tiles side by side (tile t's head h becomes head t*heads + h), which
gives every tile exactly its own mask, top-k, ring (and int8 key shift) as if it ran alone.

The cost is one regrouping copy of q, k, v and the output per layer (tokens stay in window order).
"""
from __future__ import annotations

from dataclasses import replace

import torch


def fold(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(tiles*n, ..., C) -> (n, ..., tiles*C): the tiles' channels side by side (a copy)."""
    return x.unflatten(0, (tiles, -1)).movedim(0, -2).flatten(-2)


def unfold(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(1, L, tiles*C) -> (tiles, L, C): :func:`fold`'s inverse for the attention output."""
    return x.unflatten(-1, (tiles, -1)).movedim(-2, 0).flatten(0, 1)


def self_attention(chunk, layer: int, q_w, k_w, v_w, pooled_q, pooled_k) -> torch.Tensor:
    """``ChunkPass.self_attention`` of a batch of ``chunk.tiles`` tiles: inputs (tiles*windows, 128, C)
    and (tiles*windows, C), tile-major; returns (tiles, L, C)."""
    tiles = chunk.tiles
    if chunk.exchange is not None:
        raise RuntimeError("a batch of tiles cannot run over several processes (the pipeline runs them one by one)")
    one = replace(chunk, heads=chunk.heads * tiles, tiles=1)
    o = one.self_attention(layer, *(fold(t, tiles) for t in (q_w, k_w, v_w, pooled_q, pooled_k)))
    return unfold(o, tiles)


class PerTile:
    """The convolutions of a decoder batch of ``tiles`` tiles, one tile's frames at a time.

    A convolution off CUDA sums in another order for another batch size (the CPU's kernels even
    differ between 1 and 2 images), so a batch could not give the frames of its tiles run alone.
    The decoders route every spatial convolution through ``conv`` there (the ``rows`` slot of
    models/row_bands.py; ``rows`` composes an actual band under it); elementwise layers, norms and
    attention are per frame and run on the whole batch. Inputs are tile-major on dim 0.
    """

    def __init__(self, tiles: int, rows=None) -> None:
        self.tiles, self.rows = tiles, rows

    def conv(self, conv, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.tiles:
            raise ValueError(f"{x.shape[0]} frames cannot be split into {self.tiles} tiles")
        run = conv if self.rows is None else (lambda part: self.rows.conv(conv, part))
        return torch.cat([run(part) for part in x.chunk(self.tiles)])


def split_convs(x: torch.Tensor) -> bool:
    """Whether a decoder batch of tiles on ``x``'s device runs its convolutions tile by tile (off
    CUDA: see PerTile; on CUDA the batch is the point, and cuDNN's choice of algorithm by shape
    is rounding noise, checked in tests/gpu/test_tiles_gpu.py)."""
    return x.shape[0] > 1 and x.device.type != "cuda"
