"""Moving frames between host and GPU without making the host wait for the GPU queue.

A blocking copy to the GPU, or a copy to the host that the host then waits for, drains the GPU's
queue: the GPU idles while Python enqueues the next layers (docs/performance.md, "Host copies").
Uploads therefore never block, and downloads are handed back one chunk late, when the GPU finished
them long ago.
"""
from __future__ import annotations

import torch


def upload(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.to(device, dtype)`` that does not wait for the GPU queue to drain.

    A blocking host-to-device copy synchronises the stream; a non-blocking one from pageable memory
    is staged by the driver and returns at once. (Pinning each frame first is slower: page-locking
    costs more than it saves; docs/performance.md, "Host copies".) The cast runs on the device.
    """
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if dtype is not None else x


class DeferredDownload:
    """Copies device tensors to pinned host memory; ``push`` returns the previously pushed ones.

    ``push(t, meta)`` starts copying ``t`` and returns ``[(host_tensor, meta), ...]`` for the copies
    pushed before it (waiting for them, which by then costs nothing); ``flush`` returns the rest.
    CPU tensors pass straight through, in order.
    """

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.cuda.Event, object] | None = None   # one copy in flight

    def push(self, tensor: torch.Tensor, meta: object = None) -> list[tuple[torch.Tensor, object]]:
        earlier, self._pending = self._pending, None
        if tensor.device.type != "cuda":
            return self._finished(earlier) + [(tensor, meta)]
        stage = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        stage.copy_(tensor, non_blocking=True)       # queued before waiting for the earlier copy
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensor.device))
        self._pending = (stage, done, meta)
        return self._finished(earlier)

    def flush(self) -> list[tuple[torch.Tensor, object]]:
        earlier, self._pending = self._pending, None
        return self._finished(earlier)

    @staticmethod
    def _finished(item) -> list[tuple[torch.Tensor, object]]:
        if item is None:
            return []
        stage, done, meta = item
        done.synchronize()
        return [(stage, meta)]
