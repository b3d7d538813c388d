"""Seeded noise that is addressable by position.

Each latent frame's noise depends only on the seed and its index, and is drawn on the CPU, so the
same stretch of video gets the same noise on any device, alone or as part of a longer run. (The
official pipeline draws one CUDA tensor for the whole clip, which ties every value to the clip
length and the device; the parity tests inject that noise explicitly instead.)
"""
from __future__ import annotations

import hashlib

import torch

from .host_copy import upload

CHANNELS = 16


def _frame_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"flashvsr-noise/{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def latent_noise(seed: int, start: int, count: int, height: int, width: int, *, device, dtype) -> torch.Tensor:
    """(1, 16, count, height, width) noise for latent frames start .. start+count-1."""
    frames = []
    for index in range(start, start + count):
        gen = torch.Generator("cpu").manual_seed(_frame_seed(seed, index))
        frames.append(torch.randn((CHANNELS, height, width), generator=gen, dtype=torch.float32))
    return upload(torch.stack(frames, dim=1)[None], torch.device(device), dtype)
