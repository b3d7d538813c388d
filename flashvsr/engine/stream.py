"""The one streaming engine behind Full, Tiny and Tiny-Long.

Per chunk (docs/model.md, "Frames and chunks"): upsample the LQ frames the chunk needs, feed the
projector its 4-frame clips, run one DiT step on the chunk's noise, decode the new latents (the
decoders carry their causal state), colour-correct against the aligned LQ frames and hand the frames out. The
variants differ only in the decoder object and in where finished frames go (the caller decides).
"""
from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ...models.dit import DiTStreamState, SparseParams, WanDiT, DiTConstants
from ...models.dit_ops import BlockSteps
from ...models.lcsa import topk_ratio_for
from ...models.lq_projector import LQProjector, ProjectorState
from .color import color_fix
from ..config import UpscaleConfig
from .frames import FrameSource
from .noise import latent_noise
from .preprocess import Geometry, Upsampler, Window
from .schedule import MIN_OFFICIAL_INPUT, chunk, min_input_frames

Observer = Callable[[str, int, torch.Tensor], None]   # (name, chunk index, tensor)


@dataclass
class EngineModels:
    dit: WanDiT
    projector: LQProjector
    decoder: object            # flashvsr.decoders.Decoder
    consts: DiTConstants
    device: torch.device
    dtype: torch.dtype
    dit_steps: BlockSteps | None = None     # compiled DiT block steps (CUDA) or None for eager


@dataclass
class ChunkOutput:
    index: int
    start: int                 # index of the first output frame in this chunk
    frames: torch.Tensor       # (t, out_h, out_w, 3) float in [0, 1] on the compute device
    stream: "torch.cuda.Stream | None" = None   # where ``frames`` was made: use it there (see run_stream)
    dit_start: "torch.cuda.Event | None" = None  # CUDA: recorded as the chunk's DiT step was queued (steady_period_ms)
    finite: "torch.Tensor | None" = None         # 0-d bool beside ``frames``: no NaN/Inf in them (check_finite)
    tile: "Tile | None" = None                   # the spatial tile these frames cover (None: the whole frame)

    def using(self):
        """Context in which to read ``frames`` on the GPU (its stream), without making the DiT wait."""
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _decoding_on(stream, *inputs: torch.Tensor):
    """Run the block on ``stream`` after the work queued so far on the current stream (the DiT);
    the current stream goes on with the next chunk without waiting for the decoder."""
    if stream is None:
        yield
        return
    stream.wait_stream(torch.cuda.current_stream(stream.device))
    for t in inputs:
        t.record_stream(stream)         # made on the DiT's stream, freed while the decoder may still read it
    with torch.cuda.stream(stream):
        yield


def chunk_needed(k: int, source: FrameSource, official: bool) -> bool:
    """Whether chunk k produces any output frame for this input (decided without knowing N)."""
    return source.has(min_input_frames(k, official) - 1)


def run_stream(models: EngineModels, source: FrameSource, geom: Geometry, cfg: UpscaleConfig, attn,
               noise: torch.Tensor | None = None, observer: Observer | None = None,
               tiles: "Sequence[Tile] | None" = None,
               decode_stream: "torch.cuda.Stream | None" = None) -> Iterator[ChunkOutput]:
    """Yield output frames chunk by chunk. ``noise`` (1, 16, T, h, w) overrides the seeded noise.

    With ``tiles`` (spatial tiling, all of one shape) the run covers only those windows of the model
    frame, as one batch: each tile is a stream of its own (its own projector cache, KV rings, decoder
    state), run in lockstep with the others through the projector, the DiT (models/tile_batch.py)
    and the decoder (one call per chunk; its causal state holds every tile's on its batch axis);
    the colour fix and the output are per tile. Each chunk yields one output per tile, in
    ``tiles`` order.
    ``geom`` is still the whole frame's geometry; the tiles' own sizes come from ``tiles``. With
    ``decode_stream`` (CUDA, the "side stream") everything but the noise and the DiT runs on that
    stream: chunk k+1's LQ upsampling and projector beside chunk k's DiT, chunk k's decoding and
    colour fix beside chunk k+1's DiT. The yielded frames belong to that stream (read them inside
    ``ChunkOutput.using()``).
    """
    dev, dtype = models.device, models.dtype
    tiles = list(tiles) if tiles else [None]
    if len({(t.height, t.width) for t in tiles if t is not None}) > 1:
        raise ValueError("the tiles of one batch must share one shape")
    # Each tile upsamples only its own window (preprocess.Upsampler), not the whole frame.
    ups = [Upsampler(geom, dev, dtype, None if t is None else t.window()) for t in tiles]
    geoms = [geom if t is None else t.geometry(geom) for t in tiles]
    geom = geoms[0]           # the model size all tiles share (their user-visible sizes differ)
    hr: dict[int, torch.Tensor] = {}

    def lq(a: int, b: int) -> torch.Tensor:
        """LQ video frames [a, b) at model size, (tiles, 3, b-a, H, W); the tail repeats the last frame."""
        out = []
        for i in range(a, b):
            if i not in hr:
                frame = source.get(i if source.has(i) else _last(source))
                # one tile (or none): a view with a batch axis, not a stacked copy of every frame
                hr[i] = ups[0](frame)[None] if len(ups) == 1 else torch.stack([up(frame) for up in ups])
            out.append(hr[i])
        return torch.stack(out, dim=2)

    def _last(src: FrameSource) -> int:
        src.has(10 ** 12)          # drains a stream to learn its length (only the tail is buffered)
        return src.count - 1

    sparse = SparseParams(topk_ratio=topk_ratio_for(cfg.sparse_ratio, geom.model_h, geom.model_w),
                          kv_groups=int(cfg.kv_ratio), local_range=int(cfg.local_range))
    dit_state = DiTStreamState()
    if observer is not None:
        dit_state.observe = lambda layer, name, t: observer(f"layer{layer}/{name}", dit_state.chunk_index, t)
    proj_state = ProjectorState()
    dec_state = models.decoder.new_state()       # all tiles' causal state, stacked on the batch axis
    lat_h, lat_w = geom.model_h // 8, geom.model_w // 8
    if geom.official and not source.has(MIN_OFFICIAL_INPUT - 1):
        raise ValueError(f"official preprocessing needs at least {MIN_OFFICIAL_INPUT} input frames; "
                         "use preprocess='exact'")

    def tokens_for(ck) -> torch.Tensor:
        tokens = [models.projector.stream(lq(a, b), proj_state) for a, b in ck.projector_clips]
        return torch.cat([t for t in tokens if t is not None], dim=1)

    ahead = None         # (tokens, event): a chunk's projector output made on the side stream
    k = 0
    while chunk_needed(k, source, geom.official):
        ck = chunk(k)
        if decode_stream is None:
            tokens = tokens_for(ck)
        else:
            tokens, ready = ahead or _on_side(decode_stream, tokens_for, ck, after_main=True)
            torch.cuda.current_stream(dev).wait_event(ready)
        if noise is not None:
            x = noise[:, :, ck.latent_start:ck.latent_start + ck.latent_count].to(dev, dtype)
        else:
            x = latent_noise(cfg.seed, ck.latent_start, ck.latent_count, lat_h, lat_w, device=dev, dtype=dtype)
        if len(tiles) > 1:
            x = x.expand(len(tiles), *x.shape[1:]).contiguous()    # every tile's stream draws the same noise
        if observer is not None:
            observer("lq_latents", k, tokens)
        dit_start = _timing_event(dev)
        latents = models.dit.forward_chunk(x, tokens, models.consts, dit_state, sparse, attn, models.dit_steps)
        del tokens, x          # not needed while decoding (chunk 0: ~80 MB at 768x1408)
        # The next chunk's projector goes on the side stream before this chunk's decoding, which
        # must wait for the DiT: it then runs beside this DiT instead of after the decoder.
        ahead = None
        if decode_stream is not None and chunk_needed(k + 1, source, geom.official):
            ahead = _on_side(decode_stream, tokens_for, chunk(k + 1))
        if observer is not None:
            observer("latents", k, latents)
        stop = ck.out_end
        if not geom.official and not source.has(ck.out_end - 1):
            stop = source.count            # exact mode: the padded tail is not the user's
        outs = []
        with _decoding_on(decode_stream, latents):
            conds = lq(ck.out_start, ck.out_end)
            decoded = models.decoder.decode(latents, conds, dec_state)   # (tiles, 3, t, H, W) in [-1, 1]
            for i, tile_geom in enumerate(geoms):
                frames, cond = decoded[i:i + 1], conds[i:i + 1]
                if observer is not None:
                    observer("frames_decoded", k, frames)
                frames, ref = _crop(frames[0].transpose(0, 1), tile_geom), _crop(cond[0].transpose(0, 1), tile_geom)
                frames = color_fix(frames, ref, cfg.color_fix, float32=cfg.color_fix_float32)
                if observer is not None:
                    observer("frames_final", k, frames)
                out = to_unit_hwc(frames[: max(0, stop - ck.out_start)])
                # NaN survives the clamp; summing [0, 1] cannot overflow
                outs.append(ChunkOutput(k, ck.out_start, out, decode_stream, dit_start, out.sum().isfinite(), tiles[i]))
                # Nothing of this chunk but its output may stay alive while the caller works and the
                # next chunk runs (a generator keeps its locals): ~0.3 GB at 768x1408.
                del cond, frames, ref, out
            del latents, conds, decoded
        while outs:
            yield outs.pop(0)
        for i in [i for i in hr if i < ck.out_end]:
            del hr[i]
        source.forget_before(ck.out_end)
        k += 1


class NonFiniteOutput(RuntimeError):
    """The networks produced NaN or infinite values: broken weights or a precision they overflow."""


def check_finite(finite: "torch.Tensor | bool", start: int, count: int) -> None:
    """Raise for a chunk whose ``ChunkOutput.finite`` is false. Read it on the host only once the
    chunk's frames are there (a read earlier would make the host wait for the GPU)."""
    if not bool(finite):
        raise NonFiniteOutput(f"FlashVSR produced NaN or infinite values in output frames {start}-{start + count - 1}: "
                              "the weight files are broken or overflow this precision. Check them with "
                              "`flashvsr doctor --deep`; with fp16, try bf16 or fp32.")


def _timing_event(dev: torch.device) -> "torch.cuda.Event | None":
    if dev.type != "cuda":
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def steady_period_ms(starts: list) -> float | None:
    """Median GPU time from one chunk's DiT start to the next's, from chunk 2 on (chunk 0 is three
    times as long and chunk 1 still warms caches): everything the GPU does per steady chunk on all
    streams, idle time included, i.e. the pipeline's steady throughput. None with fewer than 4
    chunks or without CUDA events. Call after the work has finished (reads the events)."""
    steady = [e for e in starts[2:] if e is not None]
    if len(steady) < 2:
        return None
    return statistics.median_low(a.elapsed_time(b) for a, b in zip(steady, steady[1:]))


def _on_side(stream, tokens_for, ck, after_main: bool = False) -> tuple[torch.Tensor, "torch.cuda.Event"]:
    """Chunk ``ck``'s LQ upsampling and projector on the side stream (where its cached state and
    upsampled frames live); the event marks the tokens ready for the DiT's stream. ``after_main``:
    first wait for what the current stream has queued (the upsampler's matrices on chunk 0)."""
    main = torch.cuda.current_stream(stream.device)
    if after_main:
        stream.wait_stream(main)
    with torch.cuda.stream(stream):
        tokens = tokens_for(ck)
        ready = torch.cuda.Event()
        ready.record(stream)
    tokens.record_stream(main)      # freed by the host while the DiT may still read it
    return tokens, ready


def to_unit_hwc(frames: torch.Tensor) -> torch.Tensor:
    """(t, 3, H, W) in [-1, 1] -> contiguous float32 (t, H, W, 3) in [0, 1], the values of
    ``((x.float() + 1) * 0.5).clamp(0, 1)``: halving is exact, so x / 2 + 1 / 2 rounds once like
    (x + 1) / 2. One layout-changing copy and in-place arithmetic instead of four new tensors and
    the hidden contiguous copy a download of the permuted view would make (100 MB each per chunk
    at 768x1408)."""
    out = torch.empty((frames.shape[0], frames.shape[2], frames.shape[3], frames.shape[1]),
                      dtype=torch.float32, device=frames.device)
    out.copy_(frames.permute(0, 2, 3, 1))
    return out.mul_(0.5).add_(0.5).clamp_(0, 1)


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    height: int      # multiples of 128
    width: int

    def window(self) -> Window:
        return Window(self.top, self.left, self.height, self.width)

    def geometry(self, whole: Geometry) -> Geometry:
        """The tile as a frame of its own; its output is the part inside the user's frame."""
        from dataclasses import replace
        return replace(whole, model_h=self.height, model_w=self.width,
                       out_h=max(0, min(self.height, whole.out_h - self.top)),
                       out_w=max(0, min(self.width, whole.out_w - self.left)))


def _crop(frames: torch.Tensor, geom: Geometry) -> torch.Tensor:
    """(t, 3, H, W) at model size -> the user's size (exact mode pads bottom/right)."""
    return frames[:, :, : geom.out_h, : geom.out_w]
