"""Input frames for the streaming engine: checked once as they enter, then read by index over a
sliding window of a frame stream.

The engine reads each frame a few times (projector clip, decoder condition, colour-fix reference)
and never more than ~12 frames behind the newest one, so a source only buffers that window; a
10-minute clip never sits in memory whole.

What enters is refused with the frame's index rather than repaired: a NaN or infinite pixel spreads
through attention to every later frame (one bad pixel turns the whole clip NaN), and any repair
value would be a guess about what the pixel should have been; the caller knows where it came from.
The same goes for integer dtypes other than uint8: an int32 frame may hold 0-255 or 0-65535, and
picking a scale would silently turn the clip white or black.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

LAYOUT = "(N, H, W, C) tensor, C = 3 (RGB), 4 (RGBA, alpha ignored) or 1 (gray)"


class BadFrames(ValueError):
    """An input frame cannot be upscaled; the message names the frame and what to do."""


class FrameSource:
    """Frames (H, W, 3) by index from a tensor or an iterator; indices past the end report absent.

    A tensor is checked whole on construction (one pass, before any model work); a stream frame by
    frame as it is pulled, each against the first frame's size.
    """

    def __init__(self, frames: "torch.Tensor | Iterable[torch.Tensor]"):
        if isinstance(frames, torch.Tensor):
            frames = rgb_clip(frames)
            self._tensor, self._iter, self._count = frames, None, frames.shape[0]
        else:
            self._tensor, self._iter, self._count = None, iter(frames), None
        self._buffer: dict[int, torch.Tensor] = {}
        self._pulled = 0
        self._size: tuple[int, int] | None = None       # (H, W) of a stream's first frame

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
            self._buffer[self._pulled] = self._checked(frame, self._pulled)
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
            raise BadFrames("no input frames: give at least 1 frame")
        return self.get(0)

    def _checked(self, frame, index: int) -> torch.Tensor:
        frame = torch.as_tensor(frame)
        if frame.ndim != 3:
            raise BadFrames(f"frame {index} has shape {tuple(frame.shape)}; each frame of a stream must be "
                            f"(H, W, C), one frame of an {LAYOUT}")
        frame = rgb_clip(frame[None], first_index=index)[0]
        size = tuple(frame.shape[:2])
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise BadFrames(f"frame {index} is {size[1]}x{size[0]} but frame 0 is {self._size[1]}x{self._size[0]}: "
                            "all frames of a clip must have one size; resize or split the clip")
        return frame


def rgb_clip(frames: torch.Tensor, first_index: int = 0) -> torch.Tensor:
    """Check a clip (N, H, W, C) and return its RGB view (N, H, W, 3), uint8 or floating point.

    ``first_index``: the index of ``frames[0]`` in the whole input, for the messages.
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise BadFrames(f"expected frames as an {LAYOUT}, got {shape}")
    if frames.shape[0] < 1:
        raise BadFrames("no input frames: give at least 1 frame")
    c = frames.shape[-1]
    if c not in (1, 3, 4):
        raise BadFrames(f"expected 1, 3 or 4 channels in the last dimension, got {c} (shape "
                        f"{tuple(frames.shape)}); frames are an {LAYOUT}, not channels-first")
    _check_dtype(frames.dtype)
    frames = frames.expand(-1, -1, -1, 3) if c == 1 else frames[..., :3]
    if frames.is_floating_point():
        _check_finite(frames, first_index)
    return frames


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype == torch.uint8 or (dtype.is_floating_point and not dtype.is_complex):
        return
    raise BadFrames(f"frames of dtype {dtype} are not images FlashVSR can read: give float frames in [0, 1] "
                    f"or uint8 frames in 0-255 (values 0-255 in another dtype: frames.to(torch.uint8); "
                    f"another range, e.g. 16-bit: frames.float() / 65535)")


def _check_finite(frames: torch.Tensor, first_index: int) -> None:
    # A sum is one fast pass and is NaN or infinite whenever any value is; only then look for which
    # frame (huge finite values may also overflow the sum, which the exact test then clears).
    if torch.isfinite(frames.sum(dtype=torch.float32)):
        return
    ok = torch.isfinite(frames).flatten(1).all(dim=1)
    bad = (~ok).nonzero().flatten().tolist()
    if not bad:
        return
    frame = frames[bad[0]]
    nan, inf = int(frame.isnan().sum()), int(frame.isinf().sum())
    what = " and ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if p)
    more = f" (and {len(bad) - 1} later frame{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    raise BadFrames(f"frame {first_index + bad[0]} has {what} pixel values{more}: FlashVSR needs finite "
                    "values in [0, 1]; fix or drop the frames that produced them (a NaN would spread to "
                    "every later frame)")
