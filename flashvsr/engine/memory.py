"""Peak-VRAM model and run planner: which tiling fits a memory budget, decided before the run.

The peak of a run (``torch.cuda.max_memory_allocated``) is the sum of:

* the loaded networks and the prompt's cross-attention constants (counted from the modules); with
  the DiT's blocks streamed from host memory (models/block_stream.py) only 2 of its 30 blocks;
* the DiT's KV cache: per layer, ``slots`` groups of 2 latent frames of keys and values (keys in
  int8 under the INT8 block-sparse kernel, values too with ``kv_int8_values``, plus their float32
  scales), exact from the sizes (models/dit.py ``KVRing``), once per tile of a batch;
* the working set of one chunk (DiT activations of chunk 0, upsampled LQ frames, decoder passes),
  which grows with the pixels one stream covers: ``base + per_pixel * pixels``, calibrated per mode
  on the H100 (docs/benchmarks.md, "VRAM planner"). A batch of tiles counts all its pixels: the
  DiT, the projector and the decoder hold the whole batch. The decoder's share is linear in the
  batch too, not only an upper bound: its causal state holds every tile's frames, a TCDecoder pass
  takes its latents (and a tail pass its frames) of every tile, and the Wan VAE's pass budget
  (``max_pass_elements``) is per tile, so a batch's passes are B tiles' passes side by side.

Each tile upsamples only its own window of the LQ frame (preprocess.Upsampler), so tiling adds
nothing for the whole frame.

The planner is a pure function of sizes: untiled when it fits the budget; else untiled with a smaller
KV cache where allowed (int8 keys by the INT8 kernel instead of FA4, then int8 values too:
:func:`smaller_caches`); else, among the tilings
(tile height and width chosen separately) and batch sizes (tiles per batch) that fit, the cheapest
by :func:`plan_cost`; else the same with the DiT's blocks streamed from host memory; else the
smallest tiles, streamed, with ``fits=False`` (the run is tried anyway; an out-of-memory error
re-plans).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ...models.wan_vae import DEFAULT_MAX_PASS_ELEMENTS, WanVAEConfig
from ..config import Mode
from .preprocess import MULTIPLE
from .schedule import chunk

GiB = 2 ** 30
MIN_TILE = 256                 # UpscaleConfig's smallest tile (two 128-pixel windows)
TOKEN_PIXELS = 16              # one DiT token = 16x16 output pixels (VAE 8x, patch 2x2)
WINDOW_TOKENS = 128            # (2, 8, 8) tokens per attention window (models/lcsa.py)
STREAMED_BLOCKS = 2            # DiT blocks on the device while streaming: the running one and the next
VALUE_SCALE_ROWS = 64          # int8 values per float32 scale and channel: the INT8 kernel's key tile on
                               # Hopper (attention/triton_kernels.py, SM90_INT8_CONFIG.block_n)

# Working set per stream: bytes = BASE + PER_PIXEL * model pixels at 2-byte compute precision
# (float32 doubles it). Fitted to the H100 peaks of Tiny, Tiny-Long and Full at 768x1408 and Tiny at
# 2176x3840 (docs/benchmarks.md, "VRAM planner"; tests/test_planner.py pins them within 10 %).
WORKING_BASE = {Mode.TINY: 0.09 * GiB, Mode.TINY_LONG: 0.09 * GiB, Mode.FULL: 0.09 * GiB}
WORKING_PER_PIXEL = {Mode.TINY: 1.81 * GiB / 1e6, Mode.TINY_LONG: 1.75 * GiB / 1e6,
                     Mode.FULL: 9.67 * GiB / 1e6}
# Full's Wan VAE decoder runs each layer in passes of up to max_pass_elements per tile, splitting a
# chunk in time (models/wan_vae.py): 4 frames of a 768x1408 stream's full-resolution stage fill a
# pass, 16 of the 21 frames chunk 0 decodes do at 512x512, so a small tile's pass does not shrink
# with its pixels until the chunk's frames no longer fill it. Per stream, Full's working set is at
# least the pass's share of PASS_FLOOR's bytes + its per-pixel rest; fitted to Full at 768x1408 and
# to 2 x 512x512 tiles of 720p->4K (15.14 GiB, session 5; 15.10 in session 6: docs/benchmarks.md). The lines meet at
# 768x1408; above, where one frame alone passes the budget (unmeasured), the steeper line stays.
PASS_FLOOR = {Mode.FULL: (2.94 * GiB, 6.95 * GiB / 1e6)}   # (bytes of a full pass, bytes per pixel)
# The stream size (pixels) at which chunk 0's frames at the full-resolution stage fill one pass.
PASS_PIXELS = DEFAULT_MAX_PASS_ELEMENTS / ((chunk(0).out_end - chunk(0).out_start) * WanVAEConfig().base_dim)

# The time of one pass of a chunk through the pipeline, in model pixels of GPU work
# (docs/performance.md, "Tile cost"): a pass costs at least the host's time to queue a DiT chunk
# (about 60 ms, the GPU time of ~0.45 Mpixel), and with streamed blocks at least the copy of the
# DiT's blocks over PCIe (2.7 GB, ~110 ms at 25 GB/s: ~0.9 Mpixel).
HOST_FLOOR_PIXELS = 450_000
STREAM_FLOOR_PIXELS = 900_000
MAX_BATCH = 16


# A card runs out when the caching allocator's *reserved* memory reaches the budget, and it reserves
# more than it hands out: plans keep their predicted allocated peak to a share of the budget that
# depends on the allocator. PyTorch's default (fixed segments: split blocks, per-stream pools) needs
# more headroom than expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the
# user's choice); each share is what runs under a capped allocator showed to complete
# (docs/benchmarks.md, "Allocator headroom"). ComfyUI's cudaMallocAsync is not measured: the default.
USABLE_SHARE = 0.82
EXPANDABLE_SHARE = 0.9
RETRY_SHARE = 0.85     # after an out-of-memory error: the next plan predicts at most this share of the failed one


def usable_share(alloc_conf: str) -> float:
    """The share of a budget a plan may predict, for the allocator settings ``alloc_conf``
    (``PYTORCH_CUDA_ALLOC_CONF``'s text: comma-separated ``key:value`` pairs)."""
    settings = dict(item.split(":", 1) for item in alloc_conf.replace(" ", "").split(",") if ":" in item)
    native = settings.get("backend", "native") == "native"
    expandable = settings.get("expandable_segments", "").lower() == "true"
    return EXPANDABLE_SHARE if native and expandable else USABLE_SHARE


@dataclass(frozen=True)
class MemoryInputs:
    """What the peak depends on besides the frame sizes (from the loaded pipeline and the config)."""
    weight_bytes: int          # networks + prompt constants, all on the device
    mode: Mode
    dtype_bytes: int           # compute precision: 2 (bf16/fp16) or 4 (fp32)
    int8_keys: bool            # KV keys in int8 (INT8 block-sparse kernel)
    kv_groups: int             # int(kv_ratio)
    dim: int = 1536            # DiT width
    layers: int = 30
    block_bytes: int = 0       # one DiT block's weights (0: streaming saves nothing, never planned)
    int8_values: bool = False  # KV values in int8 too (UpscaleConfig.kv_int8_values where it takes effect)
    # What the planner may change to keep a run untiled rather than tile it (plan_run): int8 keys, where
    # the INT8 kernel could serve if FA4 stepped aside; int8 values, where the INT8 kernel can read
    # them (one process).
    int8_keys_allowed: bool = False
    int8_values_allowed: bool = False
    usable_share: float = USABLE_SHARE   # of a budget, for this process's allocator (usable_share())


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
    batch: int = 1             # tiles per batch (run in lockstep through projector and DiT)
    streamed: bool = False     # the DiT's blocks stream from host memory, two on the device
    int8_values: bool = False  # the KV cache's values in int8 (asked for, or chosen to stay untiled)
    int8_kernel: bool = False  # chosen to stay untiled: the INT8 kernel and int8 keys instead of FA4's bf16
    share: float = USABLE_SHARE   # the share of the budget the plan kept its predicted peak to

    def describe(self) -> str:
        how = "untiled" if self.tiles is None else f"{self.tile_count} {self.tiles.describe()}"
        if self.batch > 1:
            how += f" in batches of {self.batch}"
        if self.streamed:
            how += ", DiT blocks streamed from host memory (2 on the GPU)"
        if self.int8_kernel:
            how += ", INT8 kernel instead of FA4 (int8 keys)"
        if self.int8_values:
            how += ", KV cache values in int8"
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
    if inputs.int8_values:           # one byte per value and a float32 scale per 64 values of a channel
        value_bytes = rows * inputs.dim + rows // VALUE_SCALE_ROWS * inputs.dim * 4
    else:
        value_bytes = rows * inputs.dim * inputs.dtype_bytes
    windows = rows // WINDOW_TOKENS
    pooled = windows * inputs.dim * inputs.dtype_bytes
    return inputs.layers * (rows * inputs.dim * key_bytes + value_bytes + pooled)


def pass_fill(pixels: int) -> float:
    """How full the Wan VAE decoder's largest pass is for a stream of ``pixels``, at most 1."""
    return min(1.0, pixels / PASS_PIXELS)


def working_bytes(inputs: MemoryInputs, model_h: int, model_w: int, batch: int = 1) -> int:
    scale = inputs.dtype_bytes / 2
    pixels = model_h * model_w
    per_stream = WORKING_PER_PIXEL[inputs.mode] * pixels
    if inputs.mode in PASS_FLOOR:
        full_pass, per_pixel = PASS_FLOOR[inputs.mode]
        per_stream = max(per_stream, full_pass * pass_fill(pixels) + per_pixel * pixels)
    return int(scale * (WORKING_BASE[inputs.mode] + batch * per_stream))


def weight_bytes(inputs: MemoryInputs, streamed: bool = False) -> int:
    """The weights on the device: all of them, or with ``streamed`` blocks all but two DiT blocks."""
    if not streamed:
        return inputs.weight_bytes
    return inputs.weight_bytes - (inputs.layers - STREAMED_BLOCKS) * inputs.block_bytes


def predict_peak(inputs: MemoryInputs, model_h: int, model_w: int, tile: TileShape | None = None,
                 batch: int = 1, streamed: bool = False) -> int:
    """Predicted ``max_memory_allocated`` of a run at model size ``model_h x model_w`` (bytes), untiled
    or in batches of ``batch`` tiles."""
    h, w = (model_h, model_w) if tile is None else (min(tile.height, model_h), min(tile.width, model_w))
    return (weight_bytes(inputs, streamed) + batch * kv_cache_bytes(inputs, h, w)
            + working_bytes(inputs, h, w, batch))


def plan_cost(model_h: int, model_w: int, tile: TileShape | None, batch: int, streamed: bool = False) -> int:
    """Relative time of a plan, in model pixels of GPU work per chunk: each pass (a batch of tiles,
    or the untiled frame) costs its pixels, but at least the host's (and with streaming, the
    weight copy's) time per pass (see HOST_FLOOR_PIXELS)."""
    if tile is None:
        count, pixels = 1, model_h * model_w
    else:
        count, pixels = tile_count(model_h, model_w, tile), min(tile.height, model_h) * min(tile.width, model_w)
    floor = max(HOST_FLOOR_PIXELS, STREAM_FLOOR_PIXELS if streamed else 0)
    return math.ceil(count / batch) * max(batch * pixels, floor)


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
    """Choose the tiling, batch size and weight streaming for a run (see the module docstring).
    ``budget`` None: no limit (untiled unless forced, one tile at a time); ``forced_tile``: the
    user's square tile size, used as given (the planner still picks the batch and streaming)."""
    def plan(tile, n, peak, fits=True, batch=1, streamed=False, cache=inputs):
        return Plan(tile, n, peak, budget, fits, bool(forced_tile), batch, streamed, int8_values=cache.int8_values,
                    int8_kernel=cache.int8_keys and not inputs.int8_keys, share=inputs.usable_share)

    if forced_tile:
        shapes: list[TileShape | None] = [TileShape(forced_tile, forced_tile, overlap)]
        if budget is None:
            tile = shapes[0]
            return plan(tile, tile_count(model_h, model_w, tile), predict_peak(inputs, model_h, model_w, tile))
    else:
        peak = predict_peak(inputs, model_h, model_w)
        if budget is None or peak <= usable(budget, inputs.usable_share):
            return plan(None, 1, peak)
        # A smaller KV cache changes the frames less than tiles do (the official fixtures give the
        # same PSNR with int8 keys and values as with bf16: docs/benchmarks.md, "Int8 values").
        for cache in smaller_caches(inputs):
            peak = predict_peak(cache, model_h, model_w)
            if peak <= usable(budget, inputs.usable_share):
                return plan(None, 1, peak, cache=cache)
        shapes = [None, *candidate_tiles(model_h, model_w, overlap)]
    for streamed in (False, True) if inputs.block_bytes else (False,):
        best = None
        for tile in shapes:
            n = 1 if tile is None else tile_count(model_h, model_w, tile)
            for batch in batch_sizes(n):
                peak = predict_peak(inputs, model_h, model_w, tile, batch, streamed)
                if peak > usable(budget, inputs.usable_share):
                    break                       # a larger batch only holds more
                key = (plan_cost(model_h, model_w, tile, batch, streamed), peak)
                if best is None or key < best[0]:
                    best = (key, tile, n, batch, peak)
        if best is not None:
            _, tile, n, batch, peak = best
            return plan(tile, n, peak, batch=batch, streamed=streamed)
    streamed = inputs.block_bytes > 0          # nothing fits: the least memory there is
    tile = min(shapes, key=lambda t: predict_peak(inputs, model_h, model_w, t, 1, streamed))
    n = 1 if tile is None else tile_count(model_h, model_w, tile)
    return plan(tile, n, predict_peak(inputs, model_h, model_w, tile, 1, streamed), fits=False, streamed=streamed)


def smaller_caches(inputs: MemoryInputs) -> list[MemoryInputs]:
    """The KV cache formats an untiled run may fall back to, largest first: int8 keys (the INT8 kernel
    instead of FA4), then int8 keys and values."""
    out = []
    if inputs.int8_keys_allowed and not inputs.int8_keys:
        out.append(replace(inputs, int8_keys=True))
    if inputs.int8_values_allowed and not inputs.int8_values:
        out.append(replace(inputs, int8_keys=True, int8_values=True))
    return out


def batch_sizes(tiles: int) -> list[int]:
    """Tiles per batch worth trying, ascending: divisors of the tile count, so every batch has the
    same shape (one set of compiled DiT graphs), at most MAX_BATCH."""
    return [b for b in range(1, min(tiles, MAX_BATCH) + 1) if tiles % b == 0]


def usable(budget: int, share: float = USABLE_SHARE) -> int:
    return int(budget * share)


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
    wanted = int(plan.predicted_peak * RETRY_SHARE / plan.share)
    return min(wanted, plan.budget) if plan.budget else wanted
