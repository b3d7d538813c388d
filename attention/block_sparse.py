"""Block-sparse attention pieces that need only torch: input checks, the look-up table, the
bounded-memory masked-SDPA reference, and compiled flex_attention.

Semantics (FlashVSR LCSA, docs/model.md §8): 128x128 blocks; head h uses ``block_mask[:, h]``;
the softmax runs over the selected key blocks only; a query block with no selected key block
outputs exactly zero.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

BLOCK = 128
# Token-level mask elements materialised per reference step: 32 Mi bools (64-128 MB once SDPA turns
# it into an additive mask) whatever the sequence lengths.
REFERENCE_MASK_BUDGET = 1 << 25


def _scaled_tiles(values: torch.Tensor, rows: int, scales: torch.Tensor) -> torch.Tensor:
    """int8 (B, H, L, D) ``values`` times ``scales`` broadcast over tiles of ``rows`` (B, H, L/rows,
    rows, D), in float32, back as (B, H, L, D)."""
    b, h, length, d = values.shape
    return (values.float().reshape(b, h, length // rows, rows, d) * scales).reshape(b, h, length, d)


@dataclass(frozen=True)
class Int8Tiles:
    """A KV ring's keys or values kept as int8 for the INT8 kernel: values (B, H, L, D) int8 in any
    layout with a contiguous last dim, float32 ``scales`` per ``rows`` of them, ``dtype`` the
    tensors' own dtype (what ``dequantize`` returns)."""
    values: torch.Tensor
    scales: torch.Tensor
    rows: int
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def dequantize(self) -> torch.Tensor:
        """The tensor as (B, H, L, D) of ``dtype``, int8 rounding included (for the backends that need it)."""
        raise NotImplementedError


@dataclass(frozen=True)
class QuantizedKeys(Int8Tiles):
    """Keys: ``key = values * scale + shift``, scales (B, H, L / rows), one per ``rows`` keys; shift
    (B, H, D) float32, the same vector for every key (the softmax of a query row ignores it, so the
    INT8 kernel never adds it back)."""
    shift: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        keys = _scaled_tiles(self.values, self.rows, self.scales[..., None, None]) + self.shift[:, :, None, :]
        return keys.to(self.dtype)


@dataclass(frozen=True)
class QuantizedValues(Int8Tiles):
    """Values: ``value = values * scale``, scales (B, H, L / rows, D), one per (``rows`` values,
    head, channel), contiguous.

    Why per channel of a tile of ``rows`` (the INT8 kernel's key tile, 64 on Hopper): a value's
    channels differ in range (Sage-class methods scale V per channel for this reason), so one scale
    per tile and head would let the widest channel set the step of all 128; and one tile is the
    smallest unit the kernel loads, so the scales cost one 128-float load per tile. The bytes: one
    float32 per 64 values, 1/16 byte per value (0.70 GiB at 720p->4K untiled, against the 11.2 GiB
    that int8 saves). Symmetric, no shift: the per-channel scales already follow each channel's own
    range, and a shift would need adding back after the softmax (docs/performance.md, "Int8 values").
    """

    def dequantize(self) -> torch.Tensor:
        return _scaled_tiles(self.values, self.rows, self.scales[:, :, :, None, :]).to(self.dtype)

    def like(self) -> torch.Tensor:
        """A stand-in of the values' shape and dtype that holds one row of memory (an expanded view),
        for the checks that look only at shapes, dtypes and the last stride."""
        b, h, length, d = self.values.shape
        return self.scales.new_zeros((1, 1, 1, d), dtype=self.dtype).expand(b, h, length, d)


def quantize_value_tiles_reference(x: torch.Tensor, rows: int):
    """Torch version of ``triton_kernels.quantize_value_tiles``, same rounding: int8 (B, H, L, D) and
    float32 scales (B, H, L / rows, D), one per ``rows`` rows, head and channel. Out of place."""
    b, h, length, d = x.shape
    tiles = x.float().reshape(b, h, length // rows, rows, d)
    scales = tiles.abs().amax(3).clamp_min(1e-8) / 127.0
    values = torch.floor(tiles / scales[:, :, :, None, :] + 0.5).to(torch.int8)
    return values.reshape(b, h, length, d), scales


def quantize_tiles_reference(x: torch.Tensor, rows: int, multiplier: float = 1.0,
                             shift: Optional[torch.Tensor] = None):
    """Torch version of the Triton quantiser (``triton_kernels.quantize_tiles``), same rounding:
    int8 (B, H, L, D) of ``(x - shift) * multiplier`` and float32 scales (B, H, L / rows), one per
    ``rows`` rows and head. Out of place: the caller's tensor (a KV cache) is never touched.

    Subtracting one vector from every key adds the same constant to every score of a query row, which
    the softmax ignores also when it runs over a subset of the keys; the keys' mean shrinks the range
    that int8 must cover.
    """
    b, h, length, d = x.shape
    x = x.float()
    if shift is not None:
        x = x - shift.float()[:, :, None, :]
    tiles = (x * multiplier).reshape(b, h, length // rows, rows * d)
    scales = tiles.abs().amax(-1).clamp_min(1e-8) / 127.0
    values = torch.floor(tiles / scales[..., None] + 0.5).to(torch.int8)
    return values.reshape(b, h, length, d), scales


def check_block_sparse_inputs(q, k, v, block_mask) -> None:
    """Raise ValueError naming the first thing that breaks the block_sparse contract."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    bsz, heads, lq, dim = q.shape
    if k.shape != v.shape or k.shape[0] != bsz or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"k and v must be (B={bsz}, H={heads}, Lk, D={dim}); got {tuple(k.shape)}, {tuple(v.shape)}")
    lk = k.shape[2]
    if lq % BLOCK or lk % BLOCK:
        raise ValueError(f"block-sparse lengths must be multiples of {BLOCK}; got Lq={lq}, Lk={lk} "
                         "(FlashVSR windows are 128 tokens: pad to whole windows before attention)")
    want = (bsz, heads, lq // BLOCK, lk // BLOCK)
    if block_mask.dtype != torch.bool or tuple(block_mask.shape) != want:
        raise ValueError(f"block_mask must be bool {want}; got {block_mask.dtype} {tuple(block_mask.shape)}")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask is on {block_mask.device} but q is on {q.device}")


def build_lut(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nq, nk) bool -> (indices (B, H, nq, nk) int32, selected ids first in ascending order;
    counts (B, H, nq) int32).

    A stable sort and a sum on the mask's device: no host synchronisation, no Python loop over blocks.
    """
    flags = block_mask.to(torch.uint8)
    counts = flags.sum(-1, dtype=torch.int32)
    order = torch.sort(flags, dim=-1, descending=True, stable=True).indices
    return order.to(torch.int32), counts


def zero_empty_query_blocks(out: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Write exact zeros into the query blocks that selected no key block (in place, returns ``out``)."""
    empty = (counts == 0).repeat_interleave(BLOCK, dim=-1)[..., None]      # (B, H, Lq, 1)
    return out.masked_fill_(empty, 0)


def masked_reference(q, k, v, block_mask, scale: Optional[float] = None,
                     mask_budget: int = REFERENCE_MASK_BUDGET) -> torch.Tensor:
    """Exact block-sparse attention by SDPA with a token-level boolean mask, one head and a few
    query blocks at a time so that the materialised mask stays under ``mask_budget`` elements."""
    bsz, heads, lq, _ = q.shape
    lk = k.shape[2]
    out = torch.empty_like(q)
    step = max(1, mask_budget // (BLOCK * lk))          # query blocks per SDPA call
    for h in range(heads):
        for q0 in range(0, lq // BLOCK, step):
            rows = block_mask[:, h, q0:q0 + step]                                  # (B, n, nk)
            token_mask = rows.repeat_interleave(BLOCK, 1).repeat_interleave(BLOCK, 2)[:, None]
            span = slice(q0 * BLOCK, q0 * BLOCK + rows.shape[1] * BLOCK)
            o = F.scaled_dot_product_attention(q[:, h:h + 1, span], k[:, h:h + 1], v[:, h:h + 1],
                                               attn_mask=token_mask, scale=scale)
            # Fully masked rows come back as 0 on recent CPU builds but NaN on some CUDA backends.
            visible = rows.any(-1).repeat_interleave(BLOCK, 1)[:, None, :, None]
            out[:, h:h + 1, span] = torch.where(visible, o, torch.zeros((), dtype=o.dtype, device=o.device))
    return out


def _accepted(fn: Callable, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def flex_block_mask(lut: torch.Tensor, counts: torch.Tensor, lq: int, lk: int, mask_mod: Optional[Callable] = None):
    """A flex ``BlockMask`` whose selected blocks are all full blocks (no per-token mask_mod work).

    Only the compiled kernel reads block indices; eager flex evaluates ``mask_mod`` alone
    (docs/model.md §14), so callers that may run eagerly must pass a lookup ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask, noop_mask

    build = BlockMask.from_kv_blocks
    extra = {}
    if _accepted(build, "seq_lengths"):
        extra["seq_lengths"] = (lq, lk)
    if _accepted(build, "compute_q_blocks"):
        extra["compute_q_blocks"] = False          # the transposed indices serve only the backward pass
    return build(torch.zeros_like(counts), lut, full_kv_num_blocks=counts, full_kv_indices=lut,
                 BLOCK_SIZE=BLOCK, mask_mod=mask_mod or noop_mask, **extra)


class CompiledFlex:
    """``torch.compile(flex_attention)``, created on first use and reused: dynamo compiles once per
    (shape, dtype) and the mask values change per call without recompiling (they are inputs)."""

    def __init__(self) -> None:
        self._fn: Optional[Callable] = None

    def __call__(self, q, k, v, lut, counts, scale: Optional[float] = None) -> torch.Tensor:
        if self._fn is None:
            from torch.nn.attention.flex_attention import flex_attention
            self._fn = torch.compile(flex_attention, dynamic=False)
        block_mask = flex_block_mask(lut, counts, q.shape[2], k.shape[2])
        out = self._fn(q, k, v, block_mask=block_mask, scale=scale)
        return zero_empty_query_blocks(out, counts)
