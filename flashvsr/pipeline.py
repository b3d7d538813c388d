"""The public entry point: load FlashVSR once, upscale many clips.

    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR, UpscaleConfig
    pipe = FlashVSR.from_pretrained("models/FlashVSR", mode="tiny", version="v1.1")
    result = pipe.upscale(frames)                  # (N, H, W, 3) float in [0, 1]
    result.frames                                  # (N, 4H, 4W, 3); result.stats.summary()
"""
from __future__ import annotations

import gc
import logging
import pathlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from ..attention import AttentionDispatcher
from ..models.block_stream import block_bytes, set_streaming
from .config import Mode, UpscaleConfig, Version, budget_gib
from .devices import allocator_settings, resolve_device
from .engine import memory
from .engine.parallel import ParallelConfig, ParallelDiT, ProcessGroup, join, serve
from .engine.stream import EngineModels, Tile, check_finite, run_stream, steady_period_ms
from .engine.frames import FrameSource
from .engine.host_copy import DeferredDownload
from .engine.preprocess import plan_geometry
from .engine.schedule import STEADY_CHUNK_FRAMES, plan_frames, total_chunks

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
MAX_REPLANS = 3      # out-of-memory retries of one run, each under a smaller budget


@dataclass
class RunStats:
    frames: int
    seconds: float
    peak_vram_bytes: int
    attention: str
    chunks: int
    mode: str
    device: str
    steady_fps: float | None = None   # CUDA, >= 4 chunks: output frames per second of the GPU's steady period
    plan: str = ""                    # the tiling that ran and its predicted peak (memory.Plan.describe)
    predicted_peak_bytes: int = 0
    replans: tuple[str, ...] = ()     # one line per out-of-memory re-plan

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        vram = f"peak VRAM {self.peak_vram_bytes / 2**30:.1f} GiB" if self.peak_vram_bytes else f"device {self.device}"
        steady = f", steady {self.steady_fps:.1f} fps" if self.steady_fps else ""
        text = f"{self.attention} | {self.frames} frames in {self.seconds:.1f} s ({self.fps:.1f} fps{steady}) | {vram}"
        if self.plan:
            text += f" | plan: {self.plan}"
        if self.replans:
            text += f" | re-planned {len(self.replans)}x after out-of-memory errors"
        return text


@dataclass
class UpscaleResult:
    frames: torch.Tensor
    stats: RunStats


class FlashVSR:
    """A loaded model set (DiT, LQ projector, decoder, prompt) for one mode and weights version.

    ``parallel``: a joined ``ProcessGroup`` to run the DiT over several processes (GPUs). Rank 0
    upscales as usual; every other rank calls :meth:`serve` instead, which returns when rank 0
    calls :meth:`close` (docs/parallel.md).
    """

    def __init__(self, dit, projector, decoder, prompt: torch.Tensor, mode, version, device, dtype,
                 parallel: ProcessGroup | None = None):
        self.parallel = parallel
        self._exchange = None
        if parallel is not None:
            from ..models.sequence_parallel import SequenceParallel
            # refuses heads that do not split
            self._exchange = SequenceParallel(dit.cfg.num_heads, rank0_share=parallel.config.rank0_share)
        self.mode, self.version = Mode.parse(mode), Version.parse(version)
        self.device, self.dtype = torch.device(device), dtype
        self.dit, self.projector, self.decoder = dit, projector, decoder
        self.prompt = prompt
        if self.device.type == "cuda":
            projector.use_conv_taps()
            if self.mode is Mode.FULL:
                decoder.to_channels_last()
        self.consts = dit.prepare(prompt)
        self.attention = AttentionDispatcher()
        self._tc_layers = None          # compiled TCDecoder pass, built on first CUDA run
        self._stream = None             # decoder stream (see decode_stream_for)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, roots: "str | pathlib.Path | Sequence", mode="tiny", version="v1.1", device=None,
                        dtype=torch.bfloat16, download: bool = True, verify_sha256: bool = False,
                        progress=None, parallel: "ParallelConfig | ProcessGroup | None" = None) -> "FlashVSR":
        """Load the official weights (or a known repack) from ``roots``, downloading what is missing.
        ``parallel``: this process's place in a run over several (``ParallelConfig.from_env()``)."""
        from .weights.store import COMMON_PREFIXES, ensure_weights, read_prompt, read_state_dict
        mode, version = Mode.parse(mode), Version.parse(version)
        roots = [pathlib.Path(roots)] if isinstance(roots, (str, pathlib.Path)) else [pathlib.Path(r) for r in roots]
        parallel, device = _joined(parallel, _default_device(device))
        if parallel is not None and not parallel.is_main:
            parallel.expect("weights")      # rank 0 downloads what is missing, once
            download = False
        files = ensure_weights(roots, version.value, mode.value, download=download, progress=progress,
                               verify_sha256=verify_sha256)
        if parallel is not None and parallel.is_main:
            parallel.send(("weights",))
        dec_path, dec_role = (files.vae, "vae") if mode is Mode.FULL else (files.tcdecoder, "tcdecoder")
        # role= rejects a misplaced file (say a TCDecoder in the DiT slot) before gigabytes load;
        # repacks (Kijai's, 1038lab's) may prefix every key, which the strict loaders must not see.
        dit_sd = read_state_dict(files.dit, role="dit", strip_prefixes=COMMON_PREFIXES)
        proj_sd = read_state_dict(files.lq_proj, role="lq_proj", strip_prefixes=COMMON_PREFIXES)
        dec_sd = read_state_dict(dec_path, role=dec_role,
                                 strip_prefixes=COMMON_PREFIXES if dec_role == "tcdecoder" else ())
        return cls.from_state_dicts(dit_sd, proj_sd, dec_sd, read_prompt(files.prompt), mode, version,
                                    device, dtype,
                                    sources=(str(files.dit), str(files.lq_proj), str(dec_path), str(files.prompt)),
                                    parallel=parallel)

    @classmethod
    def from_state_dicts(cls, dit_sd, projector_sd, decoder_sd, prompt, mode="tiny", version="v1.1",
                         device=None, dtype=torch.bfloat16, sources=("", "", "", ""),
                         parallel: "ParallelConfig | ProcessGroup | None" = None) -> "FlashVSR":
        """``sources``: the files of the DiT, projector, decoder and prompt, for the error messages."""
        from .engine.loader import build_dit, build_projector, build_tcdecoder, build_vae, check_fit
        mode = Mode.parse(mode)
        parallel, device = _joined(parallel, _default_device(device))
        sources = tuple(sources) + ("",) * (4 - len(sources))
        dit = build_dit(dit_sd, device, dtype, sources[0])
        projector = build_projector(projector_sd, version, device, dtype, sources[1])
        if mode is Mode.FULL:
            decoder = build_vae(decoder_sd, device, dtype, sources[2])
        else:
            decoder = build_tcdecoder(decoder_sd, device, dtype, sources[2])
        check_fit(dit, projector, decoder, prompt, sources)
        return cls(dit, projector, decoder, prompt, mode, version, device, dtype, parallel)

    @classmethod
    def random(cls, mode="tiny", version="v1.1", device=None, dtype=torch.bfloat16, size: str = "full",
               seed: int = 0, parallel: "ParallelConfig | ProcessGroup | None" = None) -> "FlashVSR":
        """Randomly initialised networks (speed tests only: the output means nothing); ``size`` is
        ``random_weights.random_networks``'s: 'full' (official widths), 'tiny' or 'micro'."""
        from .engine.random_weights import random_networks
        mode = Mode.parse(mode)
        parallel, device = _joined(parallel, _default_device(device))
        dit, projector, decoder, prompt = random_networks(mode, version, device, dtype, size, seed)
        return cls(dit, projector, decoder, prompt, mode, version, device, dtype, parallel)

    def switch_mode(self, mode, roots: "str | pathlib.Path | Sequence" = (), download: bool = True) -> bool:
        """Run ``mode`` from now on, keeping the DiT, projector and prompt; True if a decoder was loaded.

        Modes differ only in the decoder: Tiny and Tiny-Long share the TCDecoder, so only a switch to
        or from Full loads the other decoder (from ``roots``, like ``from_pretrained``) and drops this one.
        """
        from .engine.loader import build_tcdecoder, build_vae
        from .weights.store import COMMON_PREFIXES, ensure_weights, read_state_dict
        mode = Mode.parse(mode)
        if (mode is Mode.FULL) == (self.mode is Mode.FULL):
            self.mode = mode
            return False
        roots = [pathlib.Path(roots)] if isinstance(roots, (str, pathlib.Path)) else [pathlib.Path(r) for r in roots]
        files = ensure_weights(roots, self.version.value, mode.value, download=download)
        self.decoder, self._tc_layers = None, None          # free the old decoder before loading the new one
        self._release()
        if mode is Mode.FULL:
            decoder = build_vae(read_state_dict(files.vae, role="vae"), self.device, self.dtype, str(files.vae))
            if self.device.type == "cuda":
                decoder.to_channels_last()
        else:
            sd = read_state_dict(files.tcdecoder, role="tcdecoder", strip_prefixes=COMMON_PREFIXES)
            decoder = build_tcdecoder(sd, self.device, self.dtype, str(files.tcdecoder))
        self.mode, self.decoder = mode, decoder
        return True

    # ---- running ------------------------------------------------------------------------
    def _decoder_for(self, cfg: UpscaleConfig):
        from ..models.tcdecoder import TCDecoderPasses
        from .engine.decoders import FullDecoder, TinyDecoder
        if self.mode is Mode.FULL:
            return FullDecoder(self.decoder, cfg.vae_tiling, cfg.vae_tile, cfg.vae_stride,
                               compiled_norms=self._compiling(cfg) and _fused_vae_norms_supported())
        # One latent per body pass and one output frame per tail pass: the same frames and speed as
        # bigger passes, at a much lower peak VRAM (docs/performance.md, "One latent per body pass").
        body, tail = self._compiled_tc() if self._compiling(cfg) else (None, None)
        return TinyDecoder(self.decoder, TCDecoderPasses(latents=1, tail_frames=1, body=body, tail=tail))

    def decode_stream_for(self, cfg: UpscaleConfig):
        """A second CUDA stream for the projector and decoder, beside the DiT (Tiny and Full): chunk
        k+1's projector and chunk k's decoding run while the DiT works on chunk k or k+1.

        Tiny-Long decodes on the DiT's stream: overlapping would hold both working sets at once,
        and its point is the lowest, flat memory.
        """
        if self.device.type != "cuda" or self.mode is Mode.TINY_LONG or not cfg.overlap_decode:
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _compiling(self, cfg: UpscaleConfig) -> bool:
        from ..models.compiled import triton_usable
        return cfg.compile and self.device.type == "cuda" and triton_usable()

    def _compiled_tc(self):
        if self._tc_layers is None:
            from ..models.compiled import compile_with_fallback
            net = self.decoder
            weights = net.fast_tail_weights()     # the upsampling folded into the next convolution

            def tail(x):
                return net.run_tail_subpixel(x, weights)

            self._tc_layers = (compile_with_fallback(net.run_body, "the TCDecoder"),
                               compile_with_fallback(tail, "the TCDecoder's last stage"))
        return self._tc_layers

    def upscale(self, frames: torch.Tensor, config: UpscaleConfig | None = None, on_progress: Progress | None = None,
                noise: torch.Tensor | None = None) -> UpscaleResult:
        """frames: (N, H, W, C) float in [0, 1] or uint8 (C = 3; RGBA and gray are converted). Returns N frames.

        Raises ``BadFrames`` (a ValueError naming the frame) for NaN/Inf pixels, other dtypes or layouts,
        and ``NonFiniteOutput`` when the networks produce NaN (broken weights) instead of returning it.

        The run's tiling comes from ``plan()`` (``config.vram_budget``, or the user's ``tile_size``).
        An out-of-memory error frees the run, re-plans under a smaller budget and starts again, up to
        ``MAX_REPLANS`` times: the frames are those the final plan gives from the start."""
        cfg = config or UpscaleConfig()
        src = FrameSource(frames)        # checked here once; a tensor source is shared by the tiles
        n, (h, w) = src.count, src.first().shape[:2]
        geom = plan_geometry(h, w, cfg.scale, cfg.preprocess == "official")
        plan = self._plan(geom, cfg, self._budget(cfg))
        log.info("[FlashVSR] %dx%d -> %dx%d (%s): %s", geom.in_w, geom.in_h, geom.out_w, geom.out_h,
                 self.mode.value, plan.describe())
        replans: list[str] = []
        while True:
            failure = None
            try:
                out, stats = self._run(src, n, geom, cfg, plan, on_progress, noise)
            except torch.cuda.OutOfMemoryError as err:
                failure = str(err).split("\n")[0]
            if failure is None:
                break
            self._release(collect=True)     # outside the handler: its traceback no longer holds tensors
            smaller = self._plan(geom, replace(cfg, tile_size=0), memory.shrink_budget(plan))
            if len(replans) >= MAX_REPLANS or smaller.predicted_peak >= plan.predicted_peak:
                after = f"; after {len(replans)} re-plan(s)" if replans else ""
                raise RuntimeError(f"FlashVSR ran out of GPU memory at {geom.model_w}x{geom.model_h} ({self.mode.value}, "
                                   f"{plan.describe()}{after}): use mode 'tiny-long', a smaller vram_budget or "
                                   f"tile_size, a smaller scale, or free other models first. ({failure})") from None
            note = f"out of GPU memory with {plan.describe()}; re-planned: {smaller.describe()}"
            log.warning("[FlashVSR] %s", note)
            replans.append(note)
            plan = smaller
        stats.plan, stats.predicted_peak_bytes, stats.replans = plan.describe(), plan.predicted_peak, tuple(replans)
        log.info("[FlashVSR] %s", stats.summary())
        return UpscaleResult(out, stats)

    def plan(self, height: int, width: int, config: UpscaleConfig | None = None) -> memory.Plan:
        """The tiling and predicted peak VRAM of a run on (height x width) input frames."""
        cfg = config or UpscaleConfig()
        geom = plan_geometry(height, width, cfg.scale, cfg.preprocess == "official")
        return self._plan(geom, cfg, self._budget(cfg))

    def _plan(self, geom, cfg: UpscaleConfig, budget: int | None) -> memory.Plan:
        plan = memory.plan_run(self._memory_inputs(cfg), geom.model_h, geom.model_w, budget,
                               cfg.tile_overlap, cfg.tile_size)
        if self.parallel is not None and (plan.batch > 1 or plan.streamed):
            # the workers hold their own blocks and take one stream at a time: tiles one by one
            # (the peak predicted for the batch stays an upper bound)
            plan = replace(plan, batch=1, streamed=False)
        return plan

    def _memory_inputs(self, cfg: UpscaleConfig) -> memory.MemoryInputs:
        probe = torch.empty(0, device=self.device, dtype=self.dtype)
        cuda = self.device.type == "cuda"
        int8 = cuda and self.attention.key_rows(cfg.sageattention, probe) is not None
        # the INT8 kernel could serve where FA4 does now (a plan may choose it: Plan.int8_kernel)
        possible = int8 or (cuda and self.attention.without_fa4().key_rows(cfg.sageattention, probe) is not None)
        values = int8 and self._int8_values(cfg)      # int8 values go with the int8 keys (value_rows)
        fallback = possible and self.parallel is None
        return memory.MemoryInputs(self._weight_bytes(), self.mode, torch.finfo(self.dtype).bits // 8, int8,
                                   int(cfg.kv_ratio), self.dit.cfg.dim, self.dit.cfg.num_layers,
                                   block_bytes(self.dit.blocks), values,
                                   int8_keys_allowed=fallback, int8_values_allowed=fallback,
                                   usable_share=memory.usable_share(allocator_settings()))

    def _int8_values(self, cfg: UpscaleConfig) -> bool:
        """``cfg.kv_int8_values`` where this pipeline can honour it: one process only (the workers of
        a parallel run are not told yet, so the option is ignored there, with the reason logged)."""
        if cfg.kv_int8_values and self.parallel is not None:
            log.info("[FlashVSR] kv_int8_values ignored: not passed to the processes of a parallel run yet")
            return False
        return cfg.kv_int8_values

    def _session(self, cfg: UpscaleConfig, plan: memory.Plan):
        # int8 values asked for (ignored with a logged reason where the INT8 kernel does not run), or
        # chosen by the plan to keep the run untiled, as the INT8 kernel instead of FA4 may be
        # (the INT8 kernel's int8 values exactly as planned then: asking for them is for where it runs anyway)
        if plan.int8_kernel:
            return self.attention.without_fa4().session(cfg.sageattention, int8_values=plan.int8_values)
        return self.attention.session(cfg.sageattention, int8_values=plan.int8_values or self._int8_values(cfg))

    def _weight_bytes(self, on_device: bool = False) -> int:
        """The networks' and prompt constants' bytes, as if all on the device (what the memory model
        starts from), or with ``on_device`` only those there now (blocks may be streamed)."""
        tensors = [t for net in (self.dit, self.projector, self.decoder)
                   for t in (*net.parameters(), *net.buffers())]
        tensors += [t for pair in self.consts.cross_kv for t in pair] + [self.consts.t, self.consts.t_mod]
        if on_device and self.dit.streamed is not None:
            tensors = [t for t in tensors if t.device == self.device]
            tensors += [t for slot in self.dit.streamed.slots for t in slot.parameters()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _stream_blocks(self, on: bool) -> None:
        """Keep the DiT's blocks in host memory for this run (the plan says so) or all on the device."""
        if on != (self.dit.streamed is not None):
            set_streaming(self.dit, on, self.device)
            self._release()

    def _budget(self, cfg: UpscaleConfig) -> int | None:
        """Bytes the run may reach (``max_memory_allocated``); None without CUDA (no planning).
        auto: the device's free memory plus what this process holds unused or in these weights."""
        if self.device.type != "cuda":
            return None
        gib = budget_gib(cfg.vram_budget)
        if gib is not None:
            return int(gib * memory.GiB)
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return free + cached + self._weight_bytes(on_device=True)

    def _run(self, src: FrameSource, n: int, geom, cfg: UpscaleConfig, plan: memory.Plan, on_progress, noise):
        """One run of the ``n`` frames of ``src`` with ``plan``'s tiling: (frames, stats)."""
        tiles = _tiles(geom.model_h, geom.model_w, plan.tiles) if plan.tiles else [None]
        # tiles of one batch run in lockstep through the projector and the DiT (engine.run_stream)
        batches = [tiles[i:i + plan.batch] for i in range(0, len(tiles), plan.batch)]
        total = total_chunks(n, geom.official) * len(tiles)
        n_out = plan_frames(n, geom.official).output_frames      # refuses a clip too short for official mode
        cuda = self.device.type == "cuda"
        # Tiny/Full: the whole result in pinned memory, filled by asynchronous copies while the GPU
        # works on. Tiny-Long pins only one chunk (long clips must not pin gigabytes of host RAM).
        pin_all = cuda and len(tiles) == 1 and self.mode is not Mode.TINY_LONG
        out = torch.zeros((n_out, geom.out_h, geom.out_w, 3), dtype=torch.float32, pin_memory=pin_all)
        weight = torch.zeros((1, geom.out_h, geom.out_w, 1), dtype=torch.float32) if len(tiles) > 1 else None
        overlap = plan.tiles.overlap if plan.tiles else 0
        ramps = {tile: _ramp(tile, geom, overlap) for tile in tiles} if weight is not None else {}
        attn = self._session(cfg, plan)
        done = 0
        downloads = DeferredDownload()
        starts = []                   # per batch of tiles: each chunk's DiT-start event (steady_fps)
        checks = []                   # (finite flag on the device, first frame, frames) per chunk

        def tick() -> None:
            nonlocal done
            done += 1
            if on_progress is not None:
                on_progress(done, total)

        def place(ready) -> None:
            for host, (s0, tile, ramp) in ready:
                _place(out, weight, s0, host, tile, ramp)
                tick()

        self._stream_blocks(plan.streamed)
        start = self._start_timing()
        try:
            for batch in batches:
                starts.append([])
                for chunk_out in _tuned(run_stream(self.engine_models(cfg), src, geom, cfg, attn, noise=noise,
                                                   tiles=batch if batch[0] is not None else None,
                                                   decode_stream=self.decode_stream_for(cfg))):
                    f, s0, tile = chunk_out.frames, chunk_out.start, chunk_out.tile
                    ramp = ramps.get(tile)
                    if tile == batch[0]:            # one DiT step per chunk for the whole batch
                        starts[-1].append(chunk_out.dit_start)
                    checks.append((chunk_out.finite, s0, f.shape[0]))
                    with chunk_out.using():
                        if pin_all:
                            out[s0:s0 + f.shape[0]].copy_(f, non_blocking=True)
                            tick()
                        else:
                            place(downloads.push(f, (s0, tile, ramp)))
                    del chunk_out, f     # the GPU copy must not live on while the next chunk runs
            place(downloads.flush())
            if cuda:
                torch.cuda.synchronize(self.device)
            _check_outputs(checks)
            if weight is not None:
                out /= weight
        finally:
            self._release()
        return out, self._stats(start, n_out, attn, done, starts)

    def upscale_stream(self, frames: Iterable, config: UpscaleConfig | None = None, n_frames: int | None = None,
                       on_progress: Progress | None = None) -> Iterator[torch.Tensor]:
        """Stream frames through: yields (t, H', W', 3) uint8 CPU tensors in order, one per input frame.
        Untiled only: check ``plan()`` first; a run that needs tiles to fit its budget goes to upscale()."""
        cfg = config or UpscaleConfig()
        if cfg.tile_size:
            raise ValueError("spatial tiling needs the whole clip; use upscale() or tile_size=0 when streaming")
        src = FrameSource(frames)
        first = src.first()
        geom = plan_geometry(first.shape[0], first.shape[1], cfg.scale, cfg.preprocess == "official")
        plan = self._plan(geom, cfg, self._budget(cfg))
        if plan.tiles is not None:
            raise ValueError(f"this run needs spatial tiles to fit its VRAM budget ({plan.describe()}), and tiles "
                             "need the whole clip; use upscale() or a larger vram_budget when streaming")
        log.info("[FlashVSR] %dx%d -> %dx%d (%s): %s", geom.in_w, geom.in_h, geom.out_w, geom.out_h,
                 self.mode.value, plan.describe())
        total = total_chunks(n_frames, geom.official) if n_frames else 0
        attn = self._session(cfg, plan)
        self.last_stats = None
        self._stream_blocks(plan.streamed)
        start, done, count, starts = self._start_timing(), 0, 0, []
        try:
            downloads = DeferredDownload()

            def ready(items):
                nonlocal count, done
                for u8, (finite, s0) in items:
                    check_finite(finite, s0, u8.shape[0])
                    count += u8.shape[0]
                    done += 1
                    if on_progress is not None:
                        on_progress(done, max(total, done))
                    yield u8

            for chunk_out in _tuned(run_stream(self.engine_models(cfg), src, geom, cfg, attn,
                                               decode_stream=self.decode_stream_for(cfg))):
                starts.append(chunk_out.dit_start)
                with chunk_out.using():
                    u8 = (chunk_out.frames * 255.0).round_().to(torch.uint8)
                    done_u8 = downloads.push(u8, (_on_host(chunk_out.finite), chunk_out.start))
                del chunk_out, u8    # the GPU copies must not live on while the next chunk runs
                yield from ready(done_u8)
            yield from ready(downloads.flush())
        finally:
            self._release()
        self.last_stats = self._stats(start, count, attn, done, [starts])
        self.last_stats.plan, self.last_stats.predicted_peak_bytes = plan.describe(), plan.predicted_peak

    def engine_models(self, cfg: UpscaleConfig) -> EngineModels:
        """The model set ``upscale`` hands to ``run_stream`` for ``cfg`` (on CUDA: the compiled passes),
        for tools that drive the engine directly, such as the golden-fixture check."""
        steps = self._dit_steps(cfg.compile)
        dit = self.dit
        if self.parallel is not None:
            if not self.parallel.is_main:
                raise RuntimeError(f"process {self.parallel.rank} of a parallel run serves rank 0: call serve(), "
                                   "not upscale()")
            from .engine.parallel_bands import ParallelDecoder, ParallelProjector
            dit = ParallelDiT(self.dit, self.parallel, self._exchange, cfg.sageattention, cfg.compile)
            return EngineModels(dit, ParallelProjector(self.projector, self.parallel),
                                ParallelDecoder(self._decoder_for(cfg), self.parallel), self.consts, self.device,
                                self.dtype, steps)
        return EngineModels(dit, self.projector, self._decoder_for(cfg), self.consts, self.device, self.dtype, steps)

    def _dit_steps(self, compile: bool):
        if compile and self.device.type == "cuda":
            from ..models.compiled import triton_usable
            if triton_usable():
                from ..models.dit_ops import compiled_steps
                return compiled_steps()
        return None

    def serve(self) -> None:
        """Ranks other than 0 of a parallel run: run the DiT's share, and the projector's and the
        decoder's band, of every chunk rank 0 runs, until rank 0 calls :meth:`close`. Every rank
        must have loaded the same mode (the decoder)."""
        if self.parallel is None or self.parallel.is_main:
            raise RuntimeError("serve() is for the ranks other than 0 of a parallel run")
        from .engine.parallel_bands import BandWorker
        serve(self.parallel, self.dit, self.consts, self._exchange, self.attention.session, self._dit_steps,
              BandWorker(self.parallel, self.projector, self.decoder))

    def close(self) -> None:
        """A parallel run: rank 0 lets the other ranks' serve() return; every rank leaves the group."""
        if self.parallel is not None:
            self.parallel.close()

    def _start_timing(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _stats(self, start: float, frames: int, attn, chunks: int, starts: list[list]) -> RunStats:
        """``starts``: per batch of tiles, the DiT-start events of its chunks (the steady rate covers all tiles)."""
        peak = 0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        seconds = time.perf_counter() - start
        device = str(self.device) + (f" + {self.parallel.world - 1} workers" if self.parallel else "")
        return RunStats(frames, seconds, peak, attn.summary(), chunks, self.mode.value, device, steady_fps(starts))

    def _release(self, collect: bool = False) -> None:
        """Drop what a finished or cancelled run left in the allocator; the weights stay loaded.
        ``collect``: first collect garbage (tensors held by the frames of a failed run)."""
        if collect:
            gc.collect()
        if self.parallel is not None:
            self.parallel.end_run()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unload(self) -> None:
        for name in ("dit", "projector", "decoder", "consts"):
            setattr(self, name, None)
        self._release()

    @staticmethod
    def sage_status() -> dict:
        """Whether SageAttention is importable here (probed once per process, never raises)."""
        from ..attention.probe import probe_sage
        p = probe_sage()
        return {"installed": p.available, "version": p.version, "flavour": p.flavour, "reason": p.reason}


def steady_fps(starts: list[list]) -> float | None:
    """Output frames per second of the steady period; ``starts``: per batch of tiles, the DiT-start
    events of its chunks (the batches run one after another, so their periods add up). None below 4 chunks or
    without CUDA events."""
    periods = [p for p in map(steady_period_ms, starts) if p is not None]
    return STEADY_CHUNK_FRAMES * 1000.0 / (statistics.median_low(periods) * len(starts)) if periods else None


def _fused_vae_norms_supported() -> bool:
    """The VAE's fused norm kernel rounds like eager only with inductor's emulate_precision_casts."""
    import torch._inductor.config as inductor_config
    return hasattr(inductor_config, "emulate_precision_casts")


def _check_outputs(checks: list) -> None:
    """After a run (the GPU is done): one read of all chunks' finite flags, then name the first bad one."""
    if not checks or bool(torch.stack([finite for finite, _, _ in checks]).all()):
        return
    for finite, start, count in checks:
        check_finite(finite, start, count)


def _on_host(flag: torch.Tensor) -> torch.Tensor:
    """A copy of a CUDA scalar queued on the current stream, there by the time the work queued
    after it is (a DeferredDownload's event): reading it then costs no wait."""
    if flag.device.type != "cuda":
        return flag
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    return host.copy_(flag, non_blocking=True)


def _tuned(chunks: Iterator) -> Iterator:
    """Run each chunk with cuDNN autotuning on (our conv shapes repeat every chunk), without
    changing the flag for the rest of the process (other ComfyUI nodes)."""
    while True:
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=True, benchmark=True, deterministic=cudnn.deterministic, allow_tf32=cudnn.allow_tf32):
            try:
                item = next(chunks)
            except StopIteration:
                return
        yield item


def _joined(parallel, device: torch.device) -> tuple[ProcessGroup | None, torch.device]:
    """Join the process group a ``ParallelConfig`` describes; the device becomes this rank's."""
    if isinstance(parallel, ParallelConfig):
        parallel = join(parallel, device)
    return parallel, (parallel.device if parallel is not None else device)


def _default_device(device) -> torch.device:
    """``flashvsr.devices``' rule: auto is CUDA, else MPS, else CPU; a missing device is refused."""
    return device if isinstance(device, torch.device) else torch.device(resolve_device(device, flag="device"))


def _tiles(model_h: int, model_w: int, shape: memory.TileShape) -> list[Tile]:
    """Overlapping tiles (multiples of 128) covering the model frame; edge tiles are shifted inwards."""
    th, tw = min(shape.height, model_h), min(shape.width, model_w)
    return [Tile(y, x, th, tw) for y in memory.tile_starts(model_h, shape.height, shape.overlap)
            for x in memory.tile_starts(model_w, shape.width, shape.overlap)]


def _ramp(tile: Tile, geom, overlap: int) -> torch.Tensor:
    """(th, tw) blending weights: linear ramps over the overlap on sides that touch another tile."""
    def axis(start, length, total):
        w = torch.ones(length)
        ramp = min(overlap, length // 2)
        if ramp > 0:
            r = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp
            if start > 0:
                w[:ramp] = r
            if start + length < total:
                w[length - ramp:] = r.flip(0)
        return w
    return axis(tile.top, tile.height, geom.model_h)[:, None] * axis(tile.left, tile.width, geom.model_w)[None, :]


def _place(out, weight, start, frames, tile, ramp) -> None:
    t = frames.shape[0]
    if tile is None:
        out[start:start + t] = frames
        return
    h, w = frames.shape[1], frames.shape[2]
    region = out[start:start + t, tile.top:tile.top + h, tile.left:tile.left + w]
    if ramp is None:
        region.copy_(frames)
        return
    r = ramp[:h, :w, None]
    region += frames * r
    if start == 0:
        weight[0, tile.top:tile.top + h, tile.left:tile.left + w] += r
