"""SageAttention for dense (unmasked) attention: who may call it, and how to call it safely.

Eligibility is a pure function of a few tensor facts and the probe, so every rule is testable on a
CPU. The rules, the 1.0.6 bugs, the 2.x dispatch table and the check order used here are in
docs/model.md §14.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .probe import SageProbe

# 1.0.6 is Triton only: its kernels compile for these targets, not for sm_75 (docs/model.md §14).
SAGE1_CAPABILITIES = frozenset({(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)})
# 2.x ``sageattn`` has a kernel only for these; others raise "Unsupported CUDA architecture".
SAGE2_CAPABILITIES = frozenset({(8, 0), (8, 6), (8, 9), (9, 0), (12, 0), (12, 1)})
SAGE1_HEAD_DIMS = (64, 96, 128)
SAGE2_MAX_HEAD_DIM = 128
SAGE1_KEY_TILE = 64           # 1.0.6 does not mask a partial key tile (wrong by ~15-20 % relative L2)
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DenseCall:
    """The facts about one dense call that decide whether SageAttention may run it."""

    device_type: str
    capability: Optional[tuple[int, int]]     # None off CUDA
    dtype: torch.dtype
    same_dtypes: bool
    head_dim: int
    kv_len: int
    last_dim_contiguous: bool
    same_heads: bool

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           capability: Optional[tuple[int, int]]) -> "DenseCall":
        return cls(
            device_type=q.device.type,
            capability=capability,
            dtype=q.dtype,
            same_dtypes=q.dtype == k.dtype == v.dtype,
            head_dim=q.shape[-1],
            kv_len=k.shape[-2],
            last_dim_contiguous=all(t.stride(-1) == 1 for t in (q, k, v)),
            same_heads=q.shape[1] == k.shape[1] == v.shape[1],
        )

    def signature(self, probe: SageProbe) -> tuple:
        """Key of the negative cache: a failure repeats for the same flavour, GPU, dtype and head dim."""
        return (probe.flavour, self.capability, self.dtype, self.head_dim)


def sage_refusal(probe: SageProbe, call: DenseCall) -> Optional[str]:
    """Why SageAttention must not run this call, or None if it may. First failing rule wins."""
    if not probe.available:
        return probe.reason
    if call.device_type != "cuda" or call.capability is None:
        return f"tensors are on {call.device_type}, not CUDA"
    cc = call.capability
    sm = f"sm{cc[0]}{cc[1]}"
    if cc < (8, 0):
        return f"compute capability {cc[0]}.{cc[1]} < 8.0 (no int8 tensor-core path)"
    if probe.flavour == "2.x" and cc not in SAGE2_CAPABILITIES:
        return f"sageattention 2.x has no kernel for {sm}"
    if probe.flavour == "1.x" and cc not in SAGE1_CAPABILITIES:
        return f"sageattention 1.x is not known to compile for {sm}"
    if not call.same_dtypes or call.dtype not in HALF_DTYPES:
        return f"dtype {call.dtype} (sage needs q, k, v all float16 or all bfloat16)"
    if probe.flavour == "1.x" and call.head_dim not in SAGE1_HEAD_DIMS:
        return f"head_dim {call.head_dim} not in {SAGE1_HEAD_DIMS} (sageattention 1.x)"
    if probe.flavour == "2.x" and call.head_dim > SAGE2_MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} > {SAGE2_MAX_HEAD_DIM} (sageattention 2.x)"
    if probe.flavour == "1.x" and call.kv_len % SAGE1_KEY_TILE != 0:
        return f"key length {call.kv_len} is not a multiple of {SAGE1_KEY_TILE} (1.0.6 padding bug)"
    if not call.last_dim_contiguous:
        return "last dim of q/k/v not contiguous"
    if not call.same_heads:
        return "q, k, v have different head counts"
    return None


def run_sage(probe: SageProbe, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D). Never modifies k or v.

    Callers reach this through an :class:`AttentionSession`, whose methods are already opaque to
    ``torch.compile`` (dynamo cannot trace 1.x's Triton launches).
    """
    if probe.flavour == "1.x":
        # 1.0.6 runs ``k -= k.mean(...)`` on its argument; our K is a cache that later calls reuse.
        k = k.clone()
    return probe.fn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=q.shape[-1] ** -0.5)
