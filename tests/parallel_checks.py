"""What "the same frames" means for a run split over processes (docs/parallel.md, "Why the frames
are the same"): each rank computes exactly the rows and heads of the one-process run, but on the
CPU a convolution or SiLU kernel chosen by shape (the band's row count) sums in another order.
Values of about 1 (frames, tokens): float32 rounding (ulp 1.2e-7 at 1) through up to ~30 layers of
random weights, up to 6.4e-6 seen; the tolerance is 1/80 of an 8-bit level."""
from __future__ import annotations

import torch

BAND_TOLERANCE = 5e-5


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_same_frames(name: str, alone: torch.Tensor, together: torch.Tensor) -> None:
    """Within ``BAND_TOLERANCE`` (relative to the values' size where they exceed 1)."""
    worst = max_difference(alone, together)
    assert worst <= BAND_TOLERANCE * max(1.0, alone.abs().max().item()), f"{name}: max difference {worst}"
