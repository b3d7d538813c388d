"""FlashAttention-4 (CuTe DSL, ``pip install flash-attn-4``) as a block-sparse backend.

FA4's block sparsity takes, per (batch, head, query block), a count and a list of key blocks, in two
kinds: "mask" blocks (a mask_mod runs inside them) and "full" blocks. FlashVSR's selected blocks
are whole blocks, so they go in the full lists, which are exactly our LUT and counts (selected ids
first); the mask lists are empty (zero counts and a one-column dummy index). No host sync, no copy:
FA4 takes (B, L, H, D) tensors and accepts our (B, H, L, D) ones as transposed views.

Where it runs (flash-attn-4 4.0.0b36 source): the block-sparse forward exists for Hopper (sm90) and
datacenter Blackwell (sm100/sm110). The Ampere/Ada kernel (sm80-sm89) takes the block-sparse
argument but never reads it (it would run dense attention), and sm120 (consumer Blackwell) rejects
it, so both are refused here. Only head_dim 128 at 128x128 blocks was measured.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .block_sparse import BLOCK

DISTRIBUTION = "flash-attn-4"
SPARSE_ARCHS = (9, 10, 11)          # compute capability majors with a block-sparse forward
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class FA4Probe:
    available: bool
    version: Optional[str]
    reason: Optional[str]
    fn: Optional[Callable] = None
    tensors: Optional[type] = None          # BlockSparseTensorsTorch

    def describe(self) -> str:
        return f"flash-attn-4 {self.version}" if self.available else f"flash-attn-4 unavailable ({self.reason})"


def detect_fa4() -> FA4Probe:
    """Import FA4's CuTe interface now. Never raises: the CUTLASS DSL it loads can fail in many ways."""
    try:
        interface = importlib.import_module("flash_attn.cute")
        sparsity = importlib.import_module("flash_attn.cute.block_sparsity")
        fn, tensors = interface.flash_attn_func, sparsity.BlockSparseTensorsTorch
    except Exception as exc:       # ImportError, OSError (CUDA libraries), AttributeError (another API)
        return FA4Probe(False, None, f"import flash_attn.cute failed: {type(exc).__name__}: {exc}")
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return FA4Probe(True, version, None, fn, tensors)


# The installed package describes the machine, not a user choice: one answer per process.
probe_fa4 = functools.cache(detect_fa4)


def fa4_refusal(probe: FA4Probe, q, k, v, capability: Optional[tuple]) -> Optional[str]:
    """Why FA4 cannot run this block-sparse call (None: it can). Pure, CPU-testable."""
    if not probe.available:
        return probe.reason
    if q.device.type != "cuda" or capability is None:
        return "FA4 runs on CUDA only"
    if capability[0] not in SPARSE_ARCHS:
        return (f"FA4 block sparsity needs Hopper (sm90) or datacenter Blackwell (sm100/sm110); "
                f"this GPU is sm{capability[0]}{capability[1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16):
        return f"FA4 needs float16 or bfloat16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} not in {HEAD_DIMS}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "last dim of q/k/v not contiguous"
    return None


def fa4_block_sparse(probe: FA4Probe, q, k, v, lut: torch.Tensor, counts: torch.Tensor,
                     scale: Optional[float] = None) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D); lut (B, H, nq, nk) int32 with the selected ids first and
    counts (B, H, nq) int32 (``build_lut``). Returns (B, H, Lq, D); empty query blocks are 0."""
    b, h, nq = counts.shape
    no_mask_blocks = torch.zeros_like(counts)
    dummy_index = torch.zeros((b, h, nq, 1), dtype=torch.int32, device=counts.device)
    sparse = probe.tensors(mask_block_cnt=no_mask_blocks, mask_block_idx=dummy_index,
                           full_block_cnt=counts, full_block_idx=lut, block_size=(BLOCK, BLOCK))
    result = probe.fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                      block_sparse_tensors=sparse)
    out = result[0] if isinstance(result, tuple) else result
    return out.transpose(1, 2)
