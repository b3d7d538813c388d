"""Input frames for the streaming engine: random access over a sliding window of a frame stream.

The engine reads each frame a few times (projector clip, decoder condition, colour-fix reference)
and never more than ~12 frames behind the newest one, so a source only buffers that window; a
10-minute clip never sits in memory whole.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class FrameSource:
    """Frames (H, W, 3) by index from a tensor or an iterator; indices past the end report absent."""

    def __init__(self, frames: "torch.Tensor | Iterable[torch.Tensor]"):
        if isinstance(frames, torch.Tensor):
            if frames.ndim != 4:
                raise ValueError(f"expected frames as (N, H, W, C), got shape {tuple(frames.shape)}")
            self._tensor, self._iter, self._count = frames, None, frames.shape[0]
        else:
            self._tensor, self._iter, self._count = None, iter(frames), None
        self._buffer: dict[int, torch.Tensor] = {}
        self._pulled = 0

    @property
    def count(self) -> int | None:
        """The number of frames, once known (always for tensors; for streams after the end)."""
        return self._count

    def has(self, index: int) -> bool:
        if self._tensor is not None or self._count is not None:
            return index < self._count
        while self._pulled <= index:
            try:
                frame = next(self._iter)
            except StopIteration:
                self._count = self._pulled
                return False
            self._buffer[self._pulled] = _as_frame(frame)
            self._pulled += 1
        return True

    def get(self, index: int) -> torch.Tensor:
        if not self.has(index):
            raise IndexError(f"frame {index} is past the end of the input ({self._count} frames)")
        if self._tensor is not None:
            return self._tensor[index]
        return self._buffer[index]

    def forget_before(self, index: int) -> None:
        # The newest frame stays: the padded tail of a clip repeats it.
        for i in [i for i in self._buffer if i < index and i != self._pulled - 1]:
            del self._buffer[i]

    def first(self) -> torch.Tensor:
        if not self.has(0):
            raise ValueError("no input frames: give at least 1 frame")
        return self.get(0)


def _as_frame(frame) -> torch.Tensor:
    if not isinstance(frame, torch.Tensor):
        frame = torch.as_tensor(frame)
    if frame.ndim != 3:
        raise ValueError(f"expected each frame as (H, W, C), got shape {tuple(frame.shape)}")
    return frame

