"""DiT blocks streamed from host memory: for budgets where even the smallest tiles do not fit.

The 30 blocks (about 2.7 GB in bf16) stay in host memory, pinned where the device is a GPU, and
two device-resident *slots* (blocks of the same structure) take turns: while block i runs in one
slot, block i+1 is copied into the other on a copy stream, and the compute stream waits for that
copy only when it reaches block i+1. A slot is overwritten only after the block that used it last
has been queued and finished (an event per slot). The weights therefore occupy 2 blocks on the
device instead of 30; the price is one pass of every block over the host link per chunk (and per
batch of tiles), which the planner counts (flashvsr/engine/memory.py, STREAM_FLOOR_PIXELS).

The block functions take their weights as arguments (models/dit_ops.py), so the compiled steps
serve the slots like any other block. Off CUDA the "device" copy is a plain copy between tensors,
which keeps the mechanism testable on the CPU.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn as nn


class StreamedBlocks:
    """The blocks of ``blocks`` (moved to host memory) run through two slots on ``device``."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device):
        self.device = torch.device(device)
        self.host = blocks
        cuda = self.device.type == "cuda"
        for p in self.host.parameters():      # host copies; pinned so the copies run asynchronously
            p.data = p.data.to("cpu")
            if cuda:
                p.data = p.data.pin_memory()
        self.slots = [copy.deepcopy(blocks[0]).to(self.device).requires_grad_(False) for _ in range(2)]
        self._host_tensors = [list(b.parameters()) for b in self.host]
        self._slot_tensors = [list(s.parameters()) for s in self.slots]
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._freed: list = [None, None]      # per slot: event after the last block that used it

    def __len__(self) -> int:
        return len(self.host)

    def blocks(self) -> Iterator[nn.Module]:
        """Yield, for block 0, 1, ..., the slot that holds it, ready to run on the current stream.
        The caller queues the block's work before asking for the next one."""
        ready = [None, None]
        ready[0] = self._fetch(0)
        for i in range(len(self.host)):
            if i + 1 < len(self.host):
                ready[(i + 1) % 2] = self._fetch(i + 1)      # copied while block i runs
            slot = i % 2
            if ready[slot] is not None:
                torch.cuda.current_stream(self.device).wait_event(ready[slot])
            yield self.slots[slot]
            self._freed[slot] = self._record(torch.cuda.current_stream(self.device) if self._copy_stream else None)

    def _fetch(self, index: int):
        """Queue the copy of block ``index`` into its slot; returns the copy's event (None off CUDA)."""
        slot = index % 2
        pairs = zip(self._slot_tensors[slot], self._host_tensors[index])
        if self._copy_stream is None:
            with torch.no_grad():
                for dst, src in pairs:
                    dst.copy_(src)
            return None
        with torch.cuda.stream(self._copy_stream), torch.no_grad():
            if self._freed[slot] is not None:
                self._copy_stream.wait_event(self._freed[slot])
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            return self._record(self._copy_stream)

    @staticmethod
    def _record(stream):
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def restore(self) -> nn.ModuleList:
        """Move the blocks back to the device (for runs that fit without streaming)."""
        for p in self.host.parameters():
            p.data = p.data.to(self.device)
        return self.host


def block_bytes(blocks: nn.ModuleList) -> int:
    """The weights of one block (all blocks have the same structure)."""
    return sum(p.numel() * p.element_size() for p in blocks[0].parameters()) if len(blocks) else 0


def set_streaming(dit: nn.Module, on: bool, device: torch.device) -> None:
    """Stream the DiT's blocks from host memory (``on``) or keep them all on ``device``."""
    if on and dit.streamed is None:
        dit.streamed = StreamedBlocks(dit.blocks, device)
    elif not on and dit.streamed is not None:
        dit.streamed.restore()
        dit.streamed = None
