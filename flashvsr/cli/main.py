"""Command line: ``flashvsr upscale | doctor | bench`` (also ``python -m comfyui_flashvsr``).

``upscale`` streams: frames are decoded one at a time, pushed through
``FlashVSR.upscale_stream`` and encoded as soon as each chunk comes out, so memory does not grow
with the length of the clip. The output appears under its final name only once it is complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from .. import config
from ..engine.schedule import MIN_MODEL_FRAMES
from ..devices import torch_dtype
from .common import (latent_units, add_engine_arguments, default_models_roots, pack_version, pixels,
                     resolve_device)
from . import launch
from .output import OutputError, check_destination, clean_stale
from .video_io import VideoInfo, VideoIOError, VideoWriter, check_output, iter_frames, probe

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EXAMPLES = """examples:
  flashvsr upscale clip.mp4 clip_x4.mp4                  4x with the default tiny mode
  flashvsr upscale clip.mp4 clip_x2.mkv --scale 2 --mode tiny-long
  flashvsr upscale frames/ upscaled/ --fps 24            a folder of images to PNG frames
  flashvsr doctor                                        is this machine ready?
  flashvsr bench --modes tiny --size 768x1408            fps and peak VRAM on random weights
"""
UPSCALE_EXAMPLES = """examples:
  flashvsr upscale clip.mp4 clip_x4.mp4
  flashvsr upscale clip.mp4 clip_x2.mkv --scale 2 --sageattention disable
  flashvsr upscale long.mp4 long_x4.mp4 --mode tiny-long        flat VRAM for long clips
  flashvsr upscale big.mp4 big_x2.mp4 --scale 2 --tile-size 768 less VRAM, whole clip in RAM
  flashvsr upscale frames/ upscaled/ --fps 24                   PNG frames out (frame_000000.png ...)
  flashvsr upscale clip.mp4 clip_x4.mp4 --weights v1 --overwrite
"""


@dataclass(frozen=True)
class UpscaleJob:
    input: Path
    output: Path
    upscale: config.UpscaleConfig
    mode: str = "tiny"
    version: str = "v1.1"
    device: str = "auto"
    precision: str = "auto"
    models: tuple[Path, ...] = field(default_factory=tuple)
    download: bool = True
    fps: Fraction | None = None       # override (image folders have none)
    audio: bool = True
    crf: int = 18
    overwrite: bool = False
    gpus: int = 1                     # processes (GPUs) the DiT is split over
    rank0_share: float = 1.0          # rank 0's share of the DiT's windows (ParallelConfig)


class Progress:
    """One-line progress with frames/s and ETA on stderr; plain periodic lines when not a terminal."""

    def __init__(self, total: int | None, stream: TextIO = sys.stderr, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.stream, self.every_s, self.clock = total, stream, every_s, clock
        self.start = clock()
        self.done = 0
        self._last_print = float("-inf")
        self._printed = None          # the count in the last line written (not on a terminal)
        self._width = 0               # of the line on a terminal, so a shorter one blanks the rest
        self._tty = hasattr(stream, "isatty") and stream.isatty()

    def begin(self, what: str) -> None:
        """Say what happens before the first frames come out (that takes the longest)."""
        if self._tty:
            self._rewrite(f"{self.line()}  {what}")
        else:
            self.stream.write(f"{self.line()}  {what}\n")
        self.stream.flush()

    def _rewrite(self, text: str) -> None:
        self.stream.write("\r" + text.ljust(self._width))
        self._width = len(text)

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        fps = self.done / elapsed
        text = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text += f" frames  {fps:.2f} fps  {_hms(elapsed)} elapsed"
        if self.total and self.done and self.done < self.total:
            text += f"  ETA {_hms((self.total - self.done) / fps)}"
        return text

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if self._tty:
            self._rewrite(self.line())
            self.stream.flush()
        elif now - self._last_print >= self.every_s:
            self.stream.write(self.line() + "\n")
            self._last_print, self._printed = now, done

    def close(self) -> None:
        if self._tty:
            self._rewrite(self.line())
            self.stream.write("\n")
        elif self._printed != self.done:          # else the last line already says it
            self.stream.write(self.line() + "\n")
        self.stream.flush()


class DownloadLine:
    """Weight download progress on stderr: one rewritten line on a terminal, else the first status
    and one line every ``every_s`` seconds (the per-file "Downloaded" log line marks the end)."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.every_s, self.clock = stream, every_s, clock
        self._last_print = float("-inf")

    def __call__(self, status) -> None:     # a weights.download.DownloadStatus
        stream = self.stream or sys.stderr
        if hasattr(stream, "isatty") and stream.isatty():
            stream.write("\r" + status.line() + "   " + ("\n" if status.finished else ""))
        elif not status.finished and self.clock() - self._last_print >= self.every_s:
            stream.write(status.line() + "\n")
            self._last_print = self.clock()
        stream.flush()


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def check_paths(job: UpscaleJob) -> VideoInfo:
    """Fail fast on input/output problems, before any weights are loaded; clear what killed runs
    for this output left behind."""
    info = probe(job.input, fps=job.fps)
    check_output(job.output)
    clean_stale(job.output)           # first: it may bring back an output a killed swap moved aside
    check_destination(job.output, job.input, job.overwrite)
    return info


def load_pipeline(job: UpscaleJob):
    """The pipeline of ``job``; in a run over several processes (torchrun's variables), this rank's."""
    from ..pipeline import FlashVSR
    parallel = launch.parallel_config(job.gpus, job.rank0_share)
    roots = list(job.models) or default_models_roots()
    device = resolve_device(job.device)
    log.info("loading weights: FlashVSR %s %s from %s onto %s ...", job.mode, job.version,
             ", ".join(map(str, roots)), device)
    start = time.monotonic()
    extra = {"parallel": parallel} if parallel is not None else {}
    pipe = FlashVSR.from_pretrained(roots, mode=job.mode, version=job.version, device=device,
                                    dtype=torch_dtype(job.precision, device), download=job.download,
                                    progress=DownloadLine(), **extra)
    log.info("weights loaded in %.1f s", time.monotonic() - start)
    return pipe


@dataclass(frozen=True)
class Written:
    frames: int
    stats: object = None      # the pipeline's RunStats, when it gives one


def run_upscale(job: UpscaleJob, pipe, info: VideoInfo, progress: Progress | None = None,
                frames: Iterable | None = None) -> Written:
    """Stream ``job.input`` through ``pipe`` into ``job.output``: frames written and the run's stats.

    ``frames`` replaces the decoder (tests feed synthetic frames through it).
    """
    progress = progress or Progress(info.frames)
    progress.begin(f"warming up: the first chunk (the first {MIN_MODEL_FRAMES} frames) takes longest")
    stats = []
    source: Iterator = iter(frames) if frames is not None else iter_frames(job.input)
    audio_from = job.input if (job.audio and info.audio and not info.is_folder) else None
    tiled = _needs_tiles(job, pipe, info)
    if tiled:
        chunks = _whole_clip(job, pipe, source, progress, stats)
    else:
        chunks = pipe.upscale_stream(source, job.upscale, n_frames=info.frames)
    with VideoWriter(job.output, info.fps, audio_from=audio_from, crf=job.crf,
                     video_start=info.start) as writer:
        for chunk in chunks:
            for frame in chunk:
                writer.write(_to_u8(frame))
            if not tiled:                       # the tiled run reports progress while it computes
                progress.update(writer.frames_written)
        written = writer.frames_written
    progress.close()
    return Written(written, stats[0] if stats else getattr(pipe, "last_stats", None))


def _needs_tiles(job: UpscaleJob, pipe, info: VideoInfo) -> bool:
    """Tiles forced by --tile-size, or planned because the run would not fit --vram-budget."""
    if job.upscale.tile_size:
        return True
    plan = getattr(pipe, "plan", None)     # test doubles of the pipeline may have no planner
    if plan is None:
        return False
    chosen = plan(info.height, info.width, job.upscale)
    log.info("VRAM plan: %s", chosen.describe())
    return chosen.tiles is not None


def _whole_clip(job: UpscaleJob, pipe, source: Iterator, progress: Progress, stats: list) -> Iterator:
    """Spatial tiling runs every tile over the whole clip, so the clip has to be in memory."""
    import numpy as np
    import torch
    clip = [np.asarray(f, dtype=np.uint8) for f in source]
    n = len(clip)
    h, w = clip[0].shape[:2] if clip else (0, 0)
    out_px = round(h * job.upscale.scale) * round(w * job.upscale.scale)
    log.warning("spatial tiles need the whole clip at once, so this run holds all %d "
                "frames in memory (about %.1f GB); without tiling frames stream with flat memory",
                n, n * (h * w * 5 + out_px * 12) / 1e9)
    frames = torch.from_numpy(np.stack(clip)).float().div_(255.0)
    del clip

    def on_progress(done: int, total: int) -> None:
        progress.update(n * done // max(total, 1))

    result = pipe.upscale(frames, job.upscale, on_progress=on_progress)
    del frames
    stats.append(getattr(result, "stats", None))
    step = 8
    for i in range(0, result.frames.shape[0], step):
        yield result.frames[i:i + step]


def _to_u8(frame):
    import numpy as np
    import torch
    if isinstance(frame, torch.Tensor):
        if frame.dtype != torch.uint8:
            frame = (frame.float() * 255.0).round_().clamp_(0, 255).to(torch.uint8)
        return frame.numpy()
    return np.asarray(frame)


def _upscale_command(args: argparse.Namespace) -> int:
    job = job_from_args(args)
    parallel = launch.parallel_config(job.gpus, job.rank0_share)
    if parallel is not None and parallel.rank != 0:
        return _serve(job)
    info = check_paths(job)
    if parallel is None and job.gpus > 1:       # the paths are checked before any process starts
        return launch.launch(args.argv, job.gpus, cleanup=lambda: clean_stale(job.output))
    log.info("input %s: %dx%d, %s fps, %s frames, audio: %s", info.path, info.width, info.height,
             float(info.fps), info.frames or "?", info.audio or "none")
    pipe = load_pipeline(job)
    try:
        done = run_upscale(job, pipe, info)
    finally:
        if parallel is not None:
            pipe.close()
    if info.frames and done.frames != info.frames:
        log.warning("wrote %d frames for %d input frames", done.frames, info.frames)
    print(f"wrote {job.output} ({done.frames} frames)")
    if done.stats is not None:
        print(f"FlashVSR {job.mode} {job.version}: {done.stats.summary()}")
    return EXIT_OK


def _serve(job: UpscaleJob) -> int:
    """A rank other than 0: load the same weights, run the DiT's share of rank 0's chunks."""
    pipe = load_pipeline(job)
    try:
        pipe.serve()
    finally:
        pipe.close()
    return EXIT_OK


def job_from_args(args: argparse.Namespace) -> UpscaleJob:
    upscale = config.UpscaleConfig(
        scale=args.scale, sparse_ratio=args.sparse_ratio, kv_ratio=args.kv_ratio,
        local_range=args.local_range, color_fix=args.color_fix, seed=args.seed,
        sageattention=args.sageattention, preprocess=args.preprocess, tile_size=args.tile_size,
        tile_overlap=args.tile_overlap, vae_tiling=args.vae_tiling, vram_budget=args.vram_budget,
        vae_tile=latent_units(args.vae_tile, "--vae-tile"), vae_stride=latent_units(args.vae_stride, "--vae-stride"),
        compile=args.compile, kv_int8_values=args.kv_int8_values)
    return UpscaleJob(
        input=Path(args.input), output=Path(args.output), upscale=upscale,
        mode=config.Mode.parse(args.mode).value, version=config.Version.parse(args.weights).value,
        device=args.device, precision=args.precision, models=tuple(Path(m) for m in args.models),
        download=args.download, fps=Fraction(args.fps) if args.fps else None,
        audio=args.audio, crf=args.crf, overwrite=args.overwrite, gpus=args.gpus,
        rank0_share=args.rank0_share)


def _add_upscale_parser(sub) -> None:
    d = config.UpscaleConfig()
    p = sub.add_parser("upscale", help="upscale a video file or a folder of images",
                       description="Upscale IN (video file or image folder) to OUT (.mp4/.mov/.mkv/"
                                   ".webm, or a folder name without suffix for PNG frames). Keeps "
                                   "the frame rate and the audio; weights download on first use. "
                                   "Prints a run summary (attention backends, fps, peak VRAM).",
                       epilog=UPSCALE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="video file or folder of images")
    p.add_argument("output", help="output video (.mp4 .mov .mkv .webm) or folder for PNG frames")
    p.add_argument("--mode", default="tiny", choices=config.MODES,
                   help="tiny (default: fast TCDecoder), tiny-long (same output, flat VRAM for long "
                        "clips), full (Wan VAE decoder: slower, more memory)")
    add_engine_arguments(p)
    p.add_argument("--scale", type=float, default=d.scale, help="upscale factor, 1..4 (default 4)")
    p.add_argument("--color-fix", default=d.color_fix, choices=config.COLOR_FIXES,
                   help="match colours to the input (default adain, the official choice)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help=f"noise seed of the single diffusion step (default {d.seed}, the official one)")
    p.add_argument("--sparse-ratio", type=float, default=d.sparse_ratio,
                   help="sparse attention budget (2.0 official; 1.5 faster)")
    p.add_argument("--kv-ratio", type=float, default=d.kv_ratio, help="cached chunks (3.0 official)")
    p.add_argument("--local-range", type=int, default=d.local_range,
                   help="local attention window in blocks (11 official; 9 sharper)")
    p.add_argument("--preprocess", default=d.preprocess, choices=config.PREPROCESS_MODES,
                   help="exact: every frame, exact size (default); official: the drivers' crop/trim")
    p.add_argument("--tile-size", type=int, default=d.tile_size,
                   help="spatial tiles in output pixels to save VRAM (0 = off; multiple of 128, >= 256)")
    p.add_argument("--tile-overlap", type=int, default=d.tile_overlap,
                   help=f"overlap of neighbouring tiles in output pixels, blended to hide seams "
                        f"(default {d.tile_overlap}; less than half of --tile-size)")
    p.add_argument("--vram-budget", default=d.vram_budget, metavar="GiB|auto",
                   help="GPU memory the run may use: auto (default: the free memory) or GiB; picks spatial "
                        "tiles when the untiled run would not fit (--tile-size overrides)")
    p.add_argument("--vae-tiling", action="store_true", help="tile the Wan VAE decode (full mode)")
    p.add_argument("--vae-tile", type=pixels, default=(d.vae_tile[0] * 8, d.vae_tile[1] * 8),
                   metavar="HxW", help="VAE tile in output pixels (default 480x832)")
    p.add_argument("--vae-stride", type=pixels, default=(d.vae_stride[0] * 8, d.vae_stride[1] * 8),
                   metavar="HxW", help="step between VAE tiles in output pixels (default 240x416)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="do not torch.compile the DiT's small elementwise steps (CUDA only)")
    p.add_argument("--fps", type=Fraction, default=None,
                   help="output frame rate (default: the input's; 30 for image folders)")
    p.add_argument("--no-audio", dest="audio", action="store_false", help="drop the audio track")
    p.add_argument("--crf", type=int, default=18, help="encoder quality, lower is better (default 18)")
    p.add_argument("--overwrite", "-y", action="store_true",
                   help="replace OUT if it exists, once the run has succeeded (a folder only if it "
                        "holds nothing but frame_NNNNNN.png files)")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="never download weights; fail if they are missing")
    p.set_defaults(func=_upscale_command)


class _RenamedVersion(argparse.Action):
    """``--version`` used to name the weights; now it is the pack's version, so say the new name."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"--version {values or ''} no longer selects the weights: use --weights "
                     f"{values or 'v1.1'} (flashvsr --version prints the pack's version)")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, doctor
    parser = argparse.ArgumentParser(
        prog="flashvsr", description="FlashVSR ⚡ video super-resolution (one-step diffusion, "
                                     "streaming) from the command line.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, full tracebacks")
    parser.add_argument("--version", action="version", version=f"flashvsr {pack_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_upscale_parser(sub)
    doctor.add_parser(sub)
    bench.add_parser(sub)
    for p in sub.choices.values():
        # -v after the subcommand too; SUPPRESS keeps an absent one from undoing a -v given before
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="debug logging, full tracebacks")
    for name in ("upscale", "bench"):               # the subcommands that take --weights
        sub.choices[name].add_argument("--version", action=_RenamedVersion, nargs="?", help=argparse.SUPPRESS)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story (no traceback unless --verbose)."""
    errors: list[type[BaseException]] = [VideoIOError, OutputError, ValueError, FileNotFoundError]
    try:
        from ..weights.store import MissingWeights, WeightError
        errors += [MissingWeights, WeightError]
    except ImportError:         # the weights module is optional for tests of the CLI alone
        pass
    try:
        from ..weights.download import DownloadError
        errors.append(DownloadError)
    except ImportError:
        pass
    from ..engine.stream import NonFiniteOutput      # broken weights: a message, not a black video
    errors.append(NonFiniteOutput)
    return tuple(errors)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (it may be swapped after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool) -> None:
    """Show this package's log on stderr; third-party loggers keep their own handlers (no doubles).
    The ranks other than 0 of a parallel run say only what goes wrong, under their rank."""
    pkg = logging.getLogger(__name__.rsplit(".", 2)[0])
    worker = os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    pkg.setLevel(logging.DEBUG if verbose else logging.WARNING if worker else logging.INFO)
    if not any(isinstance(h, _StderrHandler) for h in pkg.handlers):
        handler = _StderrHandler()
        prefix = f"rank {os.environ['RANK']}: " if worker else ""
        handler.setFormatter(logging.Formatter(prefix + "%(levelname)s: %(message)s"))
        pkg.addHandler(handler)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # --gpus N starts N children with them
    _setup_logging(args.verbose)
    # `kill` / a closing terminal / a job scheduler send SIGTERM: clean up as for Ctrl-C.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: no output file was left behind\n")
        return EXIT_INTERRUPTED
    except _user_errors() as exc:
        if args.verbose:
            raise
        log.error("%s", _in_cli_words(str(exc)))
        return EXIT_USAGE
    except _oom_errors() as exc:
        log.error("out of memory (%s). Try --mode tiny-long, --tile-size 512, a smaller --scale, "
                  "or see the memory guide in README.md", exc)
        return EXIT_ERROR
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


# The library names its keyword arguments; on the command line the same switch is a flag.
_API_TO_FLAG = (("(download=False)", "(--no-download)"),)


def _in_cli_words(message: str) -> str:
    for api, flag in _API_TO_FLAG:
        message = message.replace(api, flag)
    return message


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch
    return (MemoryError, torch.cuda.OutOfMemoryError)


if __name__ == "__main__":
    raise SystemExit(main())
