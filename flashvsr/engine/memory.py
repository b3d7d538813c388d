"""Peak-VRAM model and run planner: which tiling fits a memory budget, decided before the run.

The peak of a run (``torch.cuda.max_memory_allocated``) is the sum of:

* the loaded networks and the prompt's cross-attention constants (counted from the modules);
* the DiT's KV cache: per layer, ``slots`` groups of 2 latent frames of keys and values (keys in
  int8 under the INT8 block-sparse kernel), exact from the sizes (models/dit.py ``KVRing``);
* the working set of one chunk (DiT activations of chunk 0, upsampled LQ frames, decoder passes),
  which grows with the pixels one stream covers: ``base + per_pixel * pixels``, calibrated per mode
  on the H100 (docs/benchmarks.md, "VRAM planner");
* with spatial tiles, one full-size LQ frame upsampled in float32 before the tile is cut out.

The planner is a pure function of sizes: untiled when it fits the budget, else the tiling (tile
height and width chosen separately) that fits with the fewest pixels to compute, else the smallest
tiles with ``fits=False`` (the run is tried anyway; an out-of-memory error re-plans).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import Mode
from .preprocess import MULTIPLE

GiB = 2 ** 30
MIN_TILE = 256                 # UpscaleConfig's smallest tile (two 128-pixel windows)
TOKEN_PIXELS = 16              # one DiT token = 16x16 output pixels (VAE 8x, patch 2x2)
WINDOW_TOKENS = 128            # (2, 8, 8) tokens per attention window (models/lcsa.py)

# Working set per stream: bytes = BASE + PER_PIXEL * model pixels at 2-byte compute precision
# (float32 doubles it). Fitted to the H100 peaks of Tiny, Tiny-Long and Full at 768x1408 and Tiny at
# 2176x3840 (docs/benchmarks.md, "VRAM planner"; tests/test_planner.py pins them within 10 %).
WORKING_BASE = {Mode.TINY: 0.09 * GiB, Mode.TINY_LONG: 0.09 * GiB, Mode.FULL: 0.09 * GiB}
WORKING_PER_PIXEL = {Mode.TINY: 1.81 * GiB / 1e6, Mode.TINY_LONG: 1.75 * GiB / 1e6,
                     Mode.FULL: 9.67 * GiB / 1e6}
FULL_FRAME_UPSAMPLE_BYTES_PER_PIXEL = 24   # tiled runs: a whole frame in float32, twice, plus its cast


# The caching allocator reserves more than it hands out (split blocks, per-stream pools, cuDNN and
# compile work buffers), and a card runs out when its *reserved* memory reaches the budget: plans
# keep their predicted allocated peak to this share of the budget (docs/benchmarks.md, "VRAM planner").
USABLE_SHARE = 0.8
RETRY_SHARE = 0.85     # after an out-of-memory error: the next plan predicts at most this share of the failed one


@dataclass(frozen=True)
class MemoryInputs:
    """What the peak depends on besides the frame sizes (from the loaded pipeline and the config)."""
    weight_bytes: int          # networks + prompt constants on the device
    mode: Mode
    dtype_bytes: int           # compute precision: 2 (bf16/fp16) or 4 (fp32)
    int8_keys: bool            # KV keys in int8 (INT8 block-sparse kernel)
    kv_groups: int             # int(kv_ratio)
    dim: int = 1536            # DiT width
    layers: int = 30


@dataclass(frozen=True)
class TileShape:
    height: int                # model pixels, multiples of 128
    width: int
    overlap: int

    def describe(self) -> str:
        return f"{self.width}x{self.height} tiles (overlap {self.overlap})"


@dataclass(frozen=True)
class Plan:
    tiles: TileShape | None    # None = untiled
    tile_count: int
    predicted_peak: int        # bytes
    budget: int | None         # bytes; None = no budget (CPU, or planning off)
    fits: bool
    forced: bool = False       # the user's tile_size, not the planner's choice

    def describe(self) -> str:
        how = "untiled" if self.tiles is None else f"{self.tile_count} {self.tiles.describe()}"
        text = f"{how}, predicted peak {self.predicted_peak / GiB:.1f} GiB"
        if self.budget is not None:
            text += f" of a {self.budget / GiB:.1f} GiB budget"
            if not self.fits:
                text += " (does NOT fit: the smallest tiles; expect an out-of-memory error)"
        if self.forced:
            text += " (tile_size set by the user)"
        return text


def kv_cache_bytes(inputs: MemoryInputs, model_h: int, model_w: int) -> int:
    """The KV rings of all layers for one stream of model_h x model_w pixels."""
    tokens_per_group = 2 * (model_h // TOKEN_PIXELS) * (model_w // TOKEN_PIXELS)
    slots = max(3, max(inputs.kv_groups, 2) + 1)
    rows = slots * tokens_per_group
    key_bytes = 1 if inputs.int8_keys else inputs.dtype_bytes
    windows = rows // WINDOW_TOKENS
    pooled = windows * inputs.dim * inputs.dtype_bytes
    return inputs.layers * (rows * inputs.dim * (key_bytes + inputs.dtype_bytes) + pooled)


def working_bytes(inputs: MemoryInputs, model_h: int, model_w: int) -> int:
    scale = inputs.dtype_bytes / 2
    return int(scale * (WORKING_BASE[inputs.mode] + WORKING_PER_PIXEL[inputs.mode] * model_h * model_w))


def predict_peak(inputs: MemoryInputs, model_h: int, model_w: int, tile: TileShape | None = None) -> int:
    """Predicted ``max_memory_allocated`` of a run at model size ``model_h x model_w`` (bytes)."""
    if tile is None:
        return inputs.weight_bytes + kv_cache_bytes(inputs, model_h, model_w) + working_bytes(inputs, model_h, model_w)
    th, tw = min(tile.height, model_h), min(tile.width, model_w)
    upsample = FULL_FRAME_UPSAMPLE_BYTES_PER_PIXEL * model_h * model_w
    return inputs.weight_bytes + kv_cache_bytes(inputs, th, tw) + working_bytes(inputs, th, tw) + upsample


def tile_starts(total: int, size: int, overlap: int) -> list[int]:
    """Starts of overlapping tiles of ``size`` covering ``total``; the last one is shifted inwards."""
    if total <= size:
        return [0]
    step = max(MULTIPLE, ((size - overlap) // MULTIPLE) * MULTIPLE)
    return sorted(set(list(range(0, total - size, step)) + [total - size]))


def tile_count(model_h: int, model_w: int, tile: TileShape) -> int:
    return len(tile_starts(model_h, tile.height, tile.overlap)) * len(tile_starts(model_w, tile.width, tile.overlap))


def plan_run(inputs: MemoryInputs, model_h: int, model_w: int, budget: int | None, overlap: int,
             forced_tile: int = 0) -> Plan:
    """Choose the tiling for a run (see the module docstring). ``budget`` None: no limit (untiled
    unless forced); ``forced_tile``: the user's square tile size, used as given."""
    if forced_tile:
        tile = TileShape(forced_tile, forced_tile, overlap)
        peak = predict_peak(inputs, model_h, model_w, tile)
        return Plan(tile, tile_count(model_h, model_w, tile), peak, budget,
                    budget is None or peak <= usable(budget), forced=True)
    peak = predict_peak(inputs, model_h, model_w)
    if budget is None or peak <= usable(budget):
        return Plan(None, 1, peak, budget, True)
    best, smallest = None, None
    for tile in candidate_tiles(model_h, model_w, overlap):
        peak = predict_peak(inputs, model_h, model_w, tile)
        n = tile_count(model_h, model_w, tile)
        cost = (n * min(tile.height, model_h) * min(tile.width, model_w), n)
        if smallest is None or peak < smallest[0]:
            smallest = (peak, tile, n)
        if peak <= usable(budget) and (best is None or cost < best[0]):
            best = (cost, tile, n, peak)
    if best is not None:
        return Plan(best[1], best[2], best[3], budget, True)
    if smallest is None:       # frame no larger than the smallest tile: nothing to split
        return Plan(None, 1, predict_peak(inputs, model_h, model_w), budget, False)
    return Plan(smallest[1], smallest[2], smallest[0], budget, False)


def usable(budget: int) -> int:
    return int(budget * USABLE_SHARE)


def candidate_tiles(model_h: int, model_w: int, overlap: int) -> list[TileShape]:
    """Every tile shape smaller than the frame on at least one side (multiples of 128, >= 256, more
    than twice the overlap)."""
    def sides(total: int) -> list[int]:
        own = [total] if total >= MIN_TILE else []
        return own + [s for s in range(MIN_TILE, total, MULTIPLE) if s > 2 * overlap]
    return [TileShape(h, w, overlap) for h in sides(model_h) for w in sides(model_w)
            if (h, w) != (model_h, model_w)]


def shrink_budget(plan: Plan) -> int:
    """The budget for the retry after an out-of-memory error: one whose usable share is below what
    the failed plan predicted, so any plan that fits it is strictly smaller."""
    wanted = int(plan.predicted_peak * RETRY_SHARE / USABLE_SHARE)
    return min(wanted, plan.budget) if plan.budget else wanted
