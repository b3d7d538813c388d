"""``flashvsr bench``: reproducible speed and memory numbers on randomly initialised networks.

Random weights give the real amount of work (same shapes, same kernels, same sparse-attention
budget), so fps and memory are meaningful; the pictures are not, and every report says so.
``--widths tiny`` shrinks the networks so the command finishes in seconds on a CPU: those numbers
only show that the command works and are labelled as such.

One network per mode is built and reused for every ``sageattention`` setting; each measured run is
preceded by a short warm-up run (CUDA context, kernel autotuning, Triton compilation).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from .. import config
from ..devices import allocator_settings
from .common import add_gpus_argument, add_int8_values_argument, add_weights_argument, pixels

log = logging.getLogger(__name__)

LABEL_RANDOM = "RANDOM WEIGHTS: speed and memory only, not quality"
LABEL_TINY = "REDUCED WIDTHS (--widths tiny): NOT the real model's speed; a smoke test only"
# Measured runs per case unless --repeat says otherwise. One end-to-end run on a GPU can be far off
# (a stray compile, clock ramp-up), so CUDA takes the median of three and shows the spread; CPU runs
# are smoke tests and slow, so one.
DEFAULT_REPEAT = {"cuda": 3, "cpu": 1}


@dataclass(frozen=True)
class BenchParams:
    modes: tuple[str, ...]
    sage: tuple[str, ...]
    out_h: int
    out_w: int
    scale: float
    frames: int
    widths: str            # "full" (the real networks) or "tiny" (reduced, CPU smoke test)
    version: str
    device: str
    precision: str
    warmup_frames: int
    repeat: int = 1        # measured runs per case; the median time is reported
    compile: bool = True   # UpscaleConfig.compile (CUDA only)
    seed: int = 0
    tile_size: int = 0     # UpscaleConfig.tile_size: spatial tiling in output pixels (0 = off)
    tile_overlap: int = config.UpscaleConfig.tile_overlap
    vram_budget: float | None = None   # GiB: plan for a card of this size and cap the allocator there (CUDA)
    gpus: int = 1          # processes (GPUs) the DiT is split over; peak VRAM is rank 0's (it also decodes)
    rank0_share: float = 1.0   # rank 0's share of the DiT's windows (ParallelConfig)
    inject_oom: int = 0    # > 0: each measured run raises an out-of-memory error once, at this chunk
    kv_int8_values: bool = False   # UpscaleConfig.kv_int8_values (--int8-kv-values)

    @property
    def in_h(self) -> int:
        return max(1, round(self.out_h / self.scale))

    @property
    def in_w(self) -> int:
        return max(1, round(self.out_w / self.scale))


@dataclass(frozen=True)
class BenchResult:
    mode: str
    sageattention: str
    frames: int
    seconds: float
    fps: float
    peak_vram_bytes: int | None
    peak_ram_bytes: int | None
    attention: str
    steady_fps: float | None = None   # CUDA, >= 4 chunks: from the GPU's period per steady chunk (RunStats)
    runs: int = 1                     # measured runs; fps and steady_fps are their medians
    fps_range: tuple[float, float] | None = None          # (slowest, fastest) of the runs
    steady_fps_range: tuple[float, float] | None = None
    predicted_vram_bytes: int | None = None   # the planner's prediction for the run (RunStats)
    plan: str = ""
    replans: int = 0                          # out-of-memory re-plans in the run (RunStats.replans)
    # The caching allocator's reserved peak: what a card of a given size must hold (the planner keeps
    # the allocated peak within a share of the budget because of the difference: memory.usable_share).
    peak_reserved_bytes: int | None = None


def default_repeat(device: str) -> int:
    return DEFAULT_REPEAT["cuda" if device.startswith("cuda") else "cpu"]


class PeakRSS:
    """Peak resident memory of this process while the block runs.

    Linux: reset the kernel's high-water mark (``/proc/self/clear_refs``) and read ``VmHWM``, which
    is exact. Elsewhere: sample the RSS every 5 ms with psutil (if installed); else None.
    """

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self._exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakRSS":
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._exact = True
        except OSError:
            self._start_sampler()
        return self

    def _start_sampler(self) -> None:
        try:
            import psutil
        except ImportError:
            return
        proc = psutil.Process()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self.peak_bytes = max(self.peak_bytes or 0, proc.memory_info().rss)

        self.peak_bytes = proc.memory_info().rss
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def __exit__(self, *exc) -> None:
        if self._exact:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_bytes = int(line.split()[1]) * 1024
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()


def random_frames(n: int, h: int, w: int, seed: int):
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, h, w, 3), generator=gen)


def oom_at(chunk: int):
    """A progress callback that raises one out-of-memory error when ``chunk`` chunks are done (the
    pipeline's recovery then frees the run, re-plans smaller and starts again); None for 0."""
    if chunk <= 0:
        return None
    import torch
    armed = [True]

    def on_progress(done: int, total: int) -> None:
        if armed[0] and done >= chunk:
            armed[0] = False
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected by bench --inject-oom {chunk})")
    return on_progress


def measure(pipe, frames, cfg: config.UpscaleConfig, device: str, mode: str, inject_oom: int = 0) -> BenchResult:
    import torch
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as ram:
        start = time.perf_counter()
        hook = oom_at(inject_oom)
        result = pipe.upscale(frames, cfg) if hook is None else pipe.upscale(frames, cfg, on_progress=hook)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    vram = torch.cuda.max_memory_allocated(device) if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) if cuda else None
    stats = getattr(result, "stats", None)
    attention = getattr(stats, "attention", "") or ""
    n = int(result.frames.shape[0])
    return BenchResult(mode, cfg.sageattention, n, seconds, n / seconds, vram, ram.peak_bytes,
                       str(attention), getattr(stats, "steady_fps", None),
                       predicted_vram_bytes=getattr(stats, "predicted_peak_bytes", None) or None,
                       plan=getattr(stats, "plan", ""), replans=len(getattr(stats, "replans", ()) or ()),
                       peak_reserved_bytes=reserved)


def run(params: BenchParams, build: Callable[[str], object] | None = None) -> list[BenchResult]:
    """Build one network per mode (``build(mode)``, default ``FlashVSR.random``) and time each case."""
    if build is None:
        build = _random_builder(params)
    if params.vram_budget is not None:
        emulate_card(params.vram_budget, params.device)
    frames = random_frames(params.frames, params.in_h, params.in_w, params.seed)
    warm = random_frames(params.warmup_frames, params.in_h, params.in_w, params.seed + 1)
    results = []
    for mode in params.modes:
        pipe = build(mode)
        for sage in params.sage:
            cfg = config.UpscaleConfig(scale=params.scale, sageattention=sage, seed=params.seed,
                                       compile=params.compile, tile_size=params.tile_size,
                                       tile_overlap=params.tile_overlap,
                                       vram_budget=params.vram_budget if params.vram_budget is not None else "auto",
                                       kv_int8_values=params.kv_int8_values and sage == "enable")
            if params.warmup_frames:
                pipe.upscale(warm, cfg)
            runs = sorted((measure(pipe, frames, cfg, params.device, mode, params.inject_oom)
                           for _ in range(params.repeat)), key=lambda r: r.seconds)
            median = runs[len(runs) // 2]
            results.append(replace(median, peak_vram_bytes=_max(r.peak_vram_bytes for r in runs),
                                   peak_reserved_bytes=_max(r.peak_reserved_bytes for r in runs),
                                   peak_ram_bytes=_max(r.peak_ram_bytes for r in runs),
                                   steady_fps=_median(r.steady_fps for r in runs), runs=len(runs),
                                   replans=max(r.replans for r in runs),
                                   fps_range=_range(r.fps for r in runs),
                                   steady_fps_range=_range(r.steady_fps for r in runs)))
            log.info("%s / sageattention=%s: %.2f fps (median of %d)", mode, sage, results[-1].fps,
                     len(runs))
        if getattr(pipe, "parallel", None) is not None:
            pipe.parallel.release()            # the workers move on to the next mode with rank 0
        del pipe
        _empty_cache(params.device)
    return results


def serve(params: BenchParams, build: Callable[[str], object]) -> None:
    """A rank other than 0: the same networks as rank 0, mode by mode, serving its runs."""
    if params.vram_budget is not None:
        emulate_card(params.vram_budget, params.device)
    for mode in params.modes:
        pipe = build(mode)
        pipe.serve()
        del pipe
        _empty_cache(params.device)


def emulate_card(gib: float, device: str) -> None:
    """Cap this process's CUDA allocator at ``gib`` GiB, as on a card of that size (an allocation
    beyond it raises the out-of-memory error a smaller card would)."""
    if not device.startswith("cuda"):
        return
    import torch
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()   # the call needs an index
    total = torch.cuda.get_device_properties(index).total_memory
    if gib * 2**30 > total:
        raise ValueError(f"--vram-budget {gib:g} GiB is more than this GPU has ({total / 2**30:.1f} GiB)")
    torch.cuda.set_per_process_memory_fraction(gib * 2**30 / total, index)


def _max(values) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _range(values) -> tuple[float, float] | None:
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else None


def _median(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median_low(known) if known else None


def _random_builder(params: BenchParams, parallel=None) -> Callable[[str], object]:
    """``parallel``: the joined ``ProcessGroup`` of a run over several processes."""
    from ..devices import torch_dtype
    from ..pipeline import FlashVSR
    extra = {"parallel": parallel} if parallel is not None else {}

    def build(mode: str):
        return FlashVSR.random(mode=mode, version=params.version, device=params.device,
                               dtype=torch_dtype(params.precision, params.device), size=params.widths, **extra)
    return build


def _empty_cache(device: str) -> None:
    import gc
    import torch
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(device: str) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": device, "platform": platform.platform()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
        env["compute_capability"] = "sm%d%d" % torch.cuda.get_device_capability(device)
        env["allocator"] = allocator_settings() or "default"
    else:
        env["cpu"] = platform.processor() or platform.machine()
    for pkg in ("triton", "sageattention"):
        env[pkg] = _version(pkg)
    return env


def _version(pkg: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def labels(params: BenchParams) -> list[str]:
    return [LABEL_RANDOM] + ([LABEL_TINY] if params.widths == "tiny" else [])


def report(params: BenchParams, results: list[BenchResult], env: dict) -> dict:
    return {"labels": labels(params), "params": asdict(params), "environment": env,
            "results": [asdict(r) for r in results]}


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _fps(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _spread(r: dict, key: str) -> str:
    """The runs' slowest-fastest fps, e.g. ``46.90-48.10``; ``-`` for a single run."""
    span = r.get(key)
    return "-" if span is None or r.get("runs", 1) < 2 else f"{span[0]:.2f}-{span[1]:.2f}"


def table(data: dict, markdown: bool = False) -> str:
    p, env = data["params"], data["environment"]
    where = env.get("gpu") or env.get("cpu") or env["device"]
    head = [f"FlashVSR bench: {label}" for label in data["labels"]]
    head.append(f"{where}, torch {env['torch']}, triton {env['triton'] or '-'}, "
                f"sageattention {env['sageattention'] or '-'}"
                + (f", CUDA allocator {env['allocator']}" if env.get("allocator") else ""))
    head.append(f"output {p['out_h']}x{p['out_w']} (input {round(p['out_h'] / p['scale'])}x"
                f"{round(p['out_w'] / p['scale'])}, x{p['scale']:g}), {p['frames']} frames, "
                f"{p['precision']}, weights {p['version']}, "
                f"compile {'on' if p['compile'] and p['device'].startswith('cuda') else 'off'}, "
                + (f"DiT over {p['gpus']} processes (rank 0's window share {p.get('rank0_share', 1.0):g}; "
                   "peak VRAM: rank 0's), " if p.get("gpus", 1) > 1 else "")
                + (f"tiles {p['tile_size']} px (overlap {p['tile_overlap']}), " if p.get("tile_size") else "")
                + (f"VRAM budget {p['vram_budget']:g} GiB"
                   + (" (allocator capped), " if p["device"].startswith("cuda") else " (no effect off CUDA), ")
                   if p.get("vram_budget") else "")
                + ("KV values in int8 asked for (enable runs), " if p.get("kv_int8_values") else "")
                + (f"an out-of-memory error injected after chunk {p['inject_oom']} of every measured run, "
                   if p.get("inject_oom") else "")
                + f"median of {p['repeat']} run(s), range = slowest-fastest")
    cols = ["mode", "sageattention", "e2e fps", "e2e range", "steady fps", "steady range", "s/frame",
            "peak VRAM", "predicted VRAM", "peak reserved", "peak RAM", "attention ran", "plan"]
    rows = [[r["mode"], r["sageattention"], f"{r['fps']:.2f}", _spread(r, "fps_range"),
             _fps(r.get("steady_fps")), _spread(r, "steady_fps_range"),
             f"{r['seconds'] / r['frames']:.3f}", _gib(r["peak_vram_bytes"]), _gib(r.get("predicted_vram_bytes")),
             _gib(r.get("peak_reserved_bytes")), _gib(r["peak_ram_bytes"]), r["attention"] or "?", _plan(r.get("plan"), r.get("replans", 0))]
            for r in data["results"]]
    if markdown:
        lines = [f"**{h}**  " if i < len(data["labels"]) else f"{h}  " for i, h in enumerate(head)]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    return "\n".join(head + ["", fmt.format(*cols)] + [fmt.format(*r) for r in rows])


def _plan(text: str | None, replans: int = 0) -> str:
    """The tiling part of a plan's description (the prediction has its own column), and whether the
    run got there by re-planning after an out-of-memory error."""
    tiling = (text or "-").split(", predicted")[0]
    return f"{tiling} (re-planned after {replans} out-of-memory error{'s' * (replans > 1)})" if replans else tiling


def csv_choices(choices: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in items if v not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: pick from {', '.join(choices)}")
        return items
    return parse


def _gib_arg(text: str) -> float:
    try:
        value = config.budget_gib(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value is None:
        raise argparse.ArgumentTypeError("--vram-budget takes a number of GiB (leave it out for auto)")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="speed/memory benchmark on random weights",
                       description="Time every mode x sageattention setting on randomly initialised "
                                   f"networks ({LABEL_RANDOM}). Prints a table; --json writes one.")
    modes = config.MODES
    p.add_argument("--modes", type=csv_choices(modes), default=modes, help="comma list (default: all)")
    p.add_argument("--sage", type=csv_choices(config.SAGE_CHOICES), default=config.SAGE_CHOICES,
                   help="sageattention settings to compare (default: enable,disable)")
    p.add_argument("--size", type=pixels, default=(768, 1408), help="OUTPUT size HxW (768x1408)")
    p.add_argument("--scale", type=float, default=4.0,
                   help="upscale factor; the input size is --size divided by it (default 4)")
    p.add_argument("--frames", type=int, default=45, help="input frames per run (default 45)")
    p.add_argument("--warmup-frames", type=int, default=21, help="0 disables the warm-up run")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"measured runs per case; the median and the range are reported (default "
                        f"{DEFAULT_REPEAT['cuda']} on CUDA, {DEFAULT_REPEAT['cpu']} on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="run the DiT glue eagerly (no torch.compile; CUDA only)")
    p.add_argument("--tile-size", type=int, default=config.UpscaleConfig.tile_size,
                   help="spatial tiling in output pixels, multiple of 128 (0 = off; e.g. 1024 for 4K output)")
    p.add_argument("--tile-overlap", type=int, default=config.UpscaleConfig.tile_overlap)
    p.add_argument("--vram-budget", type=_gib_arg, default=None, metavar="GiB",
                   help="emulate a card of this many GiB on a larger one: the planner plans for it and "
                        "the allocator is capped there (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--inject-oom", type=int, default=0, metavar="CHUNK",
                   help="test the out-of-memory recovery: every measured run raises an out-of-memory "
                        "error once, after CHUNK chunks; the run re-plans smaller and the table says so")
    p.add_argument("--widths", choices=("full", "tiny"), default="full",
                   help="full: the real networks (default); tiny: reduced widths for a CPU smoke test")
    add_weights_argument(p)
    add_gpus_argument(p)
    add_int8_values_argument(p)
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else MPS, else CPU), cuda, "
                                                     "cuda:1, mps, cpu")
    p.add_argument("--precision", default="auto", choices=config.PRECISIONS,
                   help="auto: bf16 on GPUs that support it, fp16 on older GPUs and MPS, fp32 on CPU")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write JSON here")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    import torch
    from ..devices import torch_dtype
    from . import launch
    from .common import resolve_device
    parallel = launch.parallel_config(args.gpus, args.rank0_share)
    if parallel is None and args.gpus > 1:
        return launch.launch(args.argv, args.gpus)
    device = resolve_device(args.device)
    dtype = torch_dtype(args.precision, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    repeat = default_repeat(device) if args.repeat is None else args.repeat
    if repeat < 1 or args.frames < 1:
        raise ValueError(f"--repeat and --frames must be >= 1, got {repeat} and {args.frames}")
    params = BenchParams(modes=args.modes, sage=args.sage, out_h=args.size[0], out_w=args.size[1],
                         scale=args.scale, frames=args.frames, widths=args.widths,
                         version=args.weights, device=device, precision=precision,
                         warmup_frames=min(args.warmup_frames, args.frames), repeat=repeat,
                         compile=args.compile, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
                         vram_budget=args.vram_budget, gpus=parallel.world if parallel else 1,
                         rank0_share=args.rank0_share, inject_oom=args.inject_oom,
                         kv_int8_values=args.kv_int8_values)
    group = None
    if parallel is not None:
        from ..engine.parallel import join
        group = join(parallel, device)
        device = params.device if group.device.type == "cpu" else str(group.device)
        params = replace(params, device=device)
    try:
        if group is not None and not group.is_main:
            serve(params, _random_builder(params, group))
            return 0
        for label in labels(params):
            log.warning(label)
        results = run(params) if group is None else run(params, _random_builder(params, group))
        data = report(params, results, environment(device))
    finally:
        if group is not None:
            group.close()
    sys.stdout.write(table(data, markdown=args.markdown) + "\n")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 0
