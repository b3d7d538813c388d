"""Run and load options, as small frozen dataclasses passed explicitly, and every allowed value.

This module imports nothing from the project, so every layer (attention, weights, engine, CLI,
nodes) may read its tuples and rules."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    TINY = "tiny"            # TCDecoder
    TINY_LONG = "tiny-long"  # TCDecoder, every output chunk leaves the GPU at once: flat VRAM
    FULL = "full"            # Wan 2.1 VAE decoder: best quality, slowest decode

    @classmethod
    def parse(cls, value: "str | Mode") -> "Mode":
        try:
            return cls(value.value if isinstance(value, Mode) else str(value).lower().replace("_", "-"))
        except ValueError:
            raise ValueError(f"unknown mode {value!r}: use one of {[m.value for m in cls]}") from None


class Version(str, Enum):
    V1 = "v1"        # JunhaoZhuang/FlashVSR, Buffer LQ projector
    V1_1 = "v1.1"    # JunhaoZhuang/FlashVSR-v1.1, Causal LQ projector

    @classmethod
    def parse(cls, value: "str | Version") -> "Version":
        try:
            return cls(value.value if isinstance(value, Version) else str(value).lower())
        except ValueError:
            raise ValueError(f"unknown weights version {value!r}: use 'v1' or 'v1.1'") from None


class SageAttention(str, Enum):
    ENABLE = "enable"    # Sage-style quantised attention where it is faster (the dispatcher decides per call)
    DISABLE = "disable"  # bf16/fp16 attention only


# Every allowed value is written here once; the nodes, the command line, bench and the weights
# table read these tuples.
MODES = tuple(m.value for m in Mode)
VERSIONS = tuple(v.value for v in Version)
SAGE_CHOICES = tuple(s.value for s in SageAttention)
COLOR_FIXES = ("adain", "wavelet", "none")
PREPROCESS_MODES = ("exact", "official")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TILE_STEP = 128       # DiT tiles are whole 128-pixel blocks of the output
TILE_MIN = 2 * TILE_STEP


def tile_problems(tile_size: int, tile_overlap: int | None) -> dict[str, str]:
    """The spatial tiling rules, by the field each broken rule is about (empty when they hold).

    ``tile_overlap`` may be None (not known yet, e.g. a linked node input)."""
    if not tile_size:
        return {}
    if tile_size < TILE_MIN or tile_size % TILE_STEP:
        return {"tile_size": f"tile_size is {tile_size}; use 0 (off) or a multiple of {TILE_STEP} of at "
                             f"least {TILE_MIN}, e.g. 512"}
    if tile_overlap is not None and not 0 <= tile_overlap <= max_tile_overlap(tile_size):
        return {"tile_overlap": f"tile_overlap is {tile_overlap}; it must be less than half of tile_size "
                                f"({tile_size}), i.e. at most {max_tile_overlap(tile_size)}"}
    return {}


def max_tile_overlap(tile_size: int) -> int:
    """The largest overlap a (valid, nonzero) tile size allows: less than half the tile, so every
    tile keeps a middle that no neighbour blends into."""
    return tile_size // 2 - 1


@dataclass(frozen=True)
class UpscaleConfig:
    """Everything one run needs besides the weights.

    Defaults are the official drivers' values (sparse_ratio 2.0, kv_ratio 3.0, local_range 11, AdaIN,
    seed 0); the pipeline signature's own default local_range of 9 is not what the drivers use.
    """
    scale: float = 4.0
    sparse_ratio: float = 2.0
    kv_ratio: float = 3.0
    local_range: int = 11
    color_fix: str = "adain"
    seed: int = 0
    sageattention: str = SageAttention.ENABLE.value
    preprocess: str = "exact"     # "exact": N frames in, N out, exact size; "official": the drivers' crop/trim
    tile_size: int = 0            # spatial DiT tiling in output pixels (0 = off); multiple of 128
    tile_overlap: int = 128
    vae_tiling: bool = False      # Full only
    vae_tile: tuple[int, int] = (60, 104)
    vae_stride: tuple[int, int] = (30, 52)
    color_fix_float32: bool = True
    compile: bool = True          # CUDA only: torch.compile the DiT's elementwise glue (falls back to eager)
    overlap_decode: bool = True   # CUDA, Tiny/Full: projector and decoder on a second stream, beside the DiT
    vram_budget: "str | float" = "auto"   # CUDA: GiB the run may use, or "auto" (free memory); picks the tiling
    # The KV cache's values in int8 too (keys are already, under the INT8 kernel): ~1/3 less cache,
    # ~8 % slower at 720p->4K (docs/performance.md, "Int8 values"). True: always, where the INT8
    # block-sparse kernel runs (enable, Hopper, no FA4; else ignored with the reason logged). False:
    # only where the planner needs them to keep a run untiled within vram_budget (memory.plan_run).
    kv_int8_values: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems.values()))

    def problems(self) -> dict[str, str]:
        """Every broken rule, keyed by the field it is about, so a caller (the Advanced node) can
        show each message on its own input."""
        out: dict[str, str] = {}
        if not 1.0 <= float(self.scale) <= 4.0:
            out["scale"] = f"scale must be between 1 and 4, got {self.scale}"
        if self.sparse_ratio <= 0:
            out["sparse_ratio"] = f"sparse_ratio must be > 0, got {self.sparse_ratio}"
        if self.kv_ratio < 1:
            out["kv_ratio"] = f"kv_ratio must be >= 1 (cached groups of 2 latent frames), got {self.kv_ratio}"
        if self.local_range < 1:
            out["local_range"] = f"local_range must be >= 1 block, got {self.local_range}"
        if self.color_fix not in COLOR_FIXES:
            out["color_fix"] = f"color_fix must be one of {COLOR_FIXES}, got {self.color_fix!r}"
        if self.sageattention not in SAGE_CHOICES:
            out["sageattention"] = f"sageattention must be one of {SAGE_CHOICES}, got {self.sageattention!r}"
        if not isinstance(self.kv_int8_values, bool):
            out["kv_int8_values"] = f"kv_int8_values must be True or False, got {self.kv_int8_values!r}"
        elif self.kv_int8_values and self.sageattention != SageAttention.ENABLE.value:
            out["kv_int8_values"] = ("kv_int8_values needs sageattention='enable' (int8 values are read only by "
                                     f"the INT8 block-sparse kernel), got sageattention={self.sageattention!r}")
        if self.preprocess not in PREPROCESS_MODES:
            out["preprocess"] = f"preprocess must be one of {PREPROCESS_MODES}, got {self.preprocess!r}"
        try:
            budget_gib(self.vram_budget)
        except ValueError as err:
            out["vram_budget"] = str(err)
        return out | tile_problems(self.tile_size, self.tile_overlap)


def budget_gib(value: "str | float") -> float | None:
    """``"auto"`` -> None; a number of GiB (or its text) -> that float, which must be > 0."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return None
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"vram_budget must be 'auto' or a number of GiB such as 12, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"vram_budget must be 'auto' or a positive number of GiB, got {value!r}")
    return float(value)
