"""The one device and precision resolver, shared by the command line, the nodes and the pipeline.

``auto`` means: the caller's own default when it has one (ComfyUI's device), else a visible CUDA GPU,
else Apple's MPS, else the CPU. ``auto`` precision is bf16 (the official dtype) on CUDA GPUs that
have it natively (compute capability 8 and up), fp16 on older GPUs and on MPS, fp32 on the CPU.
An explicit device that does not exist here is refused with one line naming what does exist.
torch is imported inside the functions, so ``flashvsr --help`` stays fast.
"""
from __future__ import annotations

import os
import sys

from .config import PRECISIONS

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
BF16_MIN_CAPABILITY = 8   # Ampere: native bf16 matmuls


def _mps_available() -> bool:
    import torch
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def cuda_count() -> int:
    """CUDA GPUs this process can use (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def existing_devices() -> list[str]:
    """The devices a user may name on this machine, ``cpu`` first."""
    found = ["cpu"] + [f"cuda:{i}" for i in range(cuda_count())]
    return found + (["mps"] if _mps_available() else [])


def why_no_cuda() -> str:
    import torch
    if torch.version.cuda is None:
        return f"this PyTorch {torch.__version__} is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU or driver"


def resolve_device(choice: str | None, auto: str | None = None, *, flag: str = "--device") -> str:
    """A device string torch accepts. ``flag`` names the option in the error (``--device``, ``device``)."""
    choice = "auto" if choice in (None, "") else str(choice).strip().lower()
    if choice == "auto":
        if auto:
            return auto
        if cuda_count():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    others = ", ".join(existing_devices())
    if choice == "mps":
        if not _mps_available():
            raise ValueError(f"{flag} mps: Apple's MPS is not available here; use one of: {others}")
        return "mps"
    if choice == "cuda" or choice.startswith("cuda:"):
        count = cuda_count()
        if not count:
            raise ValueError(f"{flag} {choice}: no CUDA GPU is visible ({why_no_cuda()}); use {flag} cpu "
                             "(very slow) or install a CUDA build of PyTorch")
        index = choice.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= count):
            raise ValueError(f"{flag} {choice}: this machine has {count} CUDA GPU{'s' * (count != 1)}; "
                             f"use one of: {others}")
        return choice
    raise ValueError(f"{flag} {choice}: unknown device; use auto or one of: {others}")


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16, fp16 or fp32 for ``device`` (a resolved device); explicit choices win."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        import torch
        index = device.partition(":")[2]
        major = torch.cuda.get_device_capability(int(index) if index else None)[0]
        return "bf16" if major >= BF16_MIN_CAPABILITY else "fp16"
    return "fp16" if device.startswith("mps") else "fp32"


def torch_dtype(precision: str, device: str):
    """The torch dtype of :func:`resolve_precision`."""
    import torch
    return getattr(torch, DTYPE_NAMES[resolve_precision(precision, device)])


# PyTorch reads its CUDA allocator settings from these variables (the second is the newer name).
ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_settings() -> str:
    """This process's CUDA allocator settings as they take effect (empty: PyTorch's defaults).
    Expandable segments exist on Linux only; elsewhere PyTorch ignores them, so they are left out."""
    text = ",".join(os.environ[name] for name in ALLOC_ENV if os.environ.get(name))
    if not sys.platform.startswith("linux"):
        text = ",".join(item for item in text.split(",") if not item.strip().startswith("expandable_segments"))
    return text

