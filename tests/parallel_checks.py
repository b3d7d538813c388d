"""What "the same frames" means for a run split over processes (docs/parallel.md, "Why the frames
are the same"): each rank computes exactly the rows and heads of the one-process run, but on the
CPU a convolution or SiLU kernel chosen by shape (the band's row count) sums in another order.
Values of about 1 (frames, tokens): float32 rounding (ulp 1.2e-7 at 1) through up to ~30 layers of
random weights, up to 6.4e-6 seen; the tolerance is 1/80 of an 8-bit level."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

BAND_TOLERANCE = 5e-5


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_same_frames(name: str, alone: torch.Tensor, together: torch.Tensor) -> None:
    """Within ``BAND_TOLERANCE`` (relative to the values' size where they exceed 1)."""
    worst = max_difference(alone, together)
    assert worst <= BAND_TOLERANCE * max(1.0, alone.abs().max().item()), f"{name}: max difference {worst}"


# what every rank process of the tests runs with: one thread each (the CPU is shared by the ranks)
CHILD_ENV = {"OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def run_ranks(script: Path, job: Path, world: int, timeout: float = 120) -> list[tuple[int, str]]:
    """Start ``python script job rank`` for every rank; (exit code, output) per rank. Nothing
    outlives the call."""
    env = os.environ | CHILD_ENV
    procs = [subprocess.Popen([sys.executable, str(script), str(job), str(r)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(world)]
    deadline = time.monotonic() + timeout
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, out) for p, out in zip(procs, outs)]
