"""What the machine offers: SageAttention (1.x / 2.x) and Triton, probed on first use, memoised.

Probing imports the optional packages, which is slow and can fail in odd ways (a missing or
broken Triton, a Windows DLL, a torch ABI mismatch), so it never runs when the pack is imported
and never raises. Nothing here touches CUDA: capabilities are checked per call (``sage.py``).
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Optional

# Entry points that only SageAttention 2.x has; 1.0.x exports only sageattn / sageattn_varlen.
# Feature detection, because third-party 2.x wheels carry versions like "2.2.0+cu128torch2.7.1.post1".
_SAGE2_ONLY = (
    "sageattn_qk_int8_pv_fp8_cuda",
    "sageattn_qk_int8_pv_fp8_cuda_sm90",
    "sageattn_qk_int8_pv_fp16_cuda",
    "sageattn_qk_int8_pv_fp16_triton",
)


@dataclass(frozen=True)
class SageProbe:
    """Result of trying to import SageAttention. ``fn`` is ``sageattn`` when available."""

    available: bool
    flavour: Optional[str]          # "1.x" or "2.x"
    version: Optional[str]          # from package metadata; None when not installed as a distribution
    reason: Optional[str]           # why unavailable
    fn: Optional[Callable] = None

    def describe(self) -> str:
        if not self.available:
            return f"sageattention unavailable ({self.reason})"
        return f"sageattention {self.version or 'unknown version'} ({self.flavour})"


@dataclass(frozen=True)
class TritonProbe:
    available: bool
    version: Optional[str]
    reason: Optional[str]


def _distribution_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def detect_sage() -> SageProbe:
    """Import ``sageattention`` now and classify it. Never raises (tests call this directly)."""
    try:
        module = importlib.import_module("sageattention")
    except Exception as exc:        # ImportError (no triton), OSError (DLL), RuntimeError (ABI), ...
        return SageProbe(False, None, None, f"import sageattention failed: {type(exc).__name__}: {exc}")
    fn = getattr(module, "sageattn", None)
    version = _distribution_version("sageattention") or getattr(module, "__version__", None)
    if not callable(fn):
        return SageProbe(False, None, version, "the sageattention package has no sageattn function")
    flavour = "2.x" if any(hasattr(module, name) for name in _SAGE2_ONLY) else "1.x"
    return SageProbe(True, flavour, version, None, fn)


def detect_triton() -> TritonProbe:
    try:
        triton = importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:
        return TritonProbe(False, None, f"import triton failed: {type(exc).__name__}: {exc}")
    return TritonProbe(True, getattr(triton, "__version__", None), None)


# The installed packages describe the machine, not a user choice, so one answer per process is right.
probe_sage = functools.cache(detect_sage)
probe_triton = functools.cache(detect_triton)
