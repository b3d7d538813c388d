"""Frame bookkeeping: how many frames the model runs on, and what each chunk reads and writes.

The model needs F = 8n+1 frames (n >= 3), always reads 4 frames ahead of what it outputs, and emits
F - 4 frames (docs/model.md, "Frames and chunks"). Chunk 0 runs 6 latent frames, every later chunk 2.
Every frame and chunk count in the package comes from this module: the engine, the pipeline's
progress totals and output sizes, and the tests all call these functions.
"""
from __future__ import annotations

from dataclasses import dataclass

MIN_MODEL_FRAMES = 25      # n = 3: the smallest run the official pipeline can do
MIN_OFFICIAL_INPUT = MIN_MODEL_FRAMES - 4   # the drivers add 4 copies of the last frame
STEADY_CHUNK_FRAMES = 8    # output frames of every chunk after the first (see chunk())


def largest_8n1_at_most(x: int) -> int:
    return ((x - 1) // 8) * 8 + 1


def smallest_8n1_at_least(x: int) -> int:
    return -(-(x - 1) // 8) * 8 + 1


@dataclass(frozen=True)
class FramePlan:
    """input_frames: what the user gave; model_frames: F; output_frames: what we return."""
    input_frames: int
    model_frames: int
    output_frames: int

    @property
    def chunks(self) -> int:
        return (self.model_frames - 1) // 8 - 2

    @property
    def latent_frames(self) -> int:
        return (self.model_frames - 1) // 4


def plan_frames(n: int, official: bool) -> FramePlan:
    """Exact mode pads the tail (copies of the last frame) and trims after, so N in gives N out.

    Official mode reproduces the drivers: 4 copies of the last frame, keep the largest 8n+1, which
    drops up to 7 trailing frames, and refuse fewer than 21 input frames.
    """
    if n < 1:
        raise ValueError("no input frames: give at least 1 frame")
    if official:
        if n < MIN_OFFICIAL_INPUT:
            raise ValueError(f"official preprocessing needs at least {MIN_OFFICIAL_INPUT} input frames, got {n}; "
                             "use preprocess='exact' for short clips")
        f = largest_8n1_at_most(n + 4)
        return FramePlan(n, f, f - 4)
    f = smallest_8n1_at_least(max(n + 4, MIN_MODEL_FRAMES))
    return FramePlan(n, f, n)


@dataclass(frozen=True)
class Chunk:
    index: int
    latent_start: int          # noise slice [latent_start, latent_start + latent_count)
    latent_count: int
    projector_clips: tuple[tuple[int, int], ...]   # LQ frame ranges fed to the projector
    out_start: int             # output frames [out_start, out_end) decoded by this chunk
    out_end: int

    @property
    def lq_end(self) -> int:
        return self.projector_clips[-1][1]


def chunk(k: int) -> Chunk:
    if k == 0:
        clips = ((0, 1),) + tuple((4 * i - 3, 4 * i + 1) for i in range(1, 7))
        return Chunk(0, 0, 6, clips, 0, 21)
    clips = ((8 * k + 17, 8 * k + 21), (8 * k + 21, 8 * k + 25))
    return Chunk(k, 4 + 2 * k, 2, clips, 8 * k + 13, 8 * k + 21)


def min_input_frames(k: int, official: bool) -> int:
    """The fewest input frames for which chunk k runs, so a stream of unknown length can decide by
    asking for frame ``min_input_frames(k) - 1``. Official mode runs chunk k when F reaches the
    chunk's last LQ frame; exact mode when the chunk's first output frame is the user's."""
    ck = chunk(k)
    return ck.lq_end - 4 if official else ck.out_start + 1


def total_chunks(n: int, official: bool) -> int:
    """Chunks run for n input frames; 0 where official preprocessing refuses n (progress totals)."""
    if n < 1 or (official and n < MIN_OFFICIAL_INPUT):
        return 0
    return plan_frames(n, official).chunks
