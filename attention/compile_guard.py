"""Keep ``torch.compile`` out of attention calls without importing dynamo in processes that never compile."""
from __future__ import annotations

import sys
from typing import Callable


def opaque_to_compile(fn: Callable) -> Callable:
    """Make ``torch.compile`` of a calling model stop at ``fn``: the backends compile or launch their
    own kernels (dynamo cannot trace sage 1.x's Triton launches), and tracing our bookkeeping (CUDA
    events, sets) would only scatter graph breaks.

    Only a process that compiles has ``torch._dynamo`` loaded (``torch.compile`` imports it when a
    model is wrapped, before any run starts); elsewhere importing it would cost seconds for nothing.
    """
    if "torch._dynamo" not in sys.modules:
        return fn
    import torch

    return torch.compiler.disable(fn)
