"""Where the time goes: per-stage CUDA timings and the top kernels of a steady FlashVSR chunk.

Speed only (random full-size weights). Run on a GPU:
    python scripts/gpu_profile.py --modes tiny full --frames 57 --height 192 --width 352
Also checks the golden fixtures on the GPU (bf16 masks and PSNR vs the float32 reference).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time

import torch
from _pack import ROOT, import_pack


class StageTimer:
    """Wraps methods with CUDA events; sums per stage and per chunk (no sync inside the run)."""

    def __init__(self):
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def wrap(self, obj, name: str, label: str):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn(*a, **kw)
            e.record()
            self.events.append((label, s, e))
            return out
        setattr(obj, name, timed)

    def totals(self):
        torch.cuda.synchronize()
        out: dict[str, list[float]] = {}
        for label, s, e in self.events:
            out.setdefault(label, []).append(s.elapsed_time(e))
        return out


def profile_mode(mode: str, args) -> dict:
    from comfyui_flashvsr.flashvsr.engine import stream as eng
    from comfyui_flashvsr.flashvsr.config import UpscaleConfig
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    pipe = FlashVSR.random(mode=mode, device="cuda", dtype=torch.bfloat16, size="full")
    cfg = UpscaleConfig(scale=4.0, sageattention=args.sage)
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand((args.frames, args.height, args.width, 3), generator=gen)
    pipe.upscale(frames[:25], cfg)                  # warm-up: kernels, autotune, compile
    torch.cuda.synchronize()
    res = pipe.upscale(frames, cfg)
    out = {"mode": mode, "frames": res.frames.shape[0], "shape": list(res.frames.shape),
           "nan": bool(torch.isnan(res.frames).any()), "seconds": res.stats.seconds, "fps": res.stats.fps,
           "peak_vram_gib": res.stats.peak_vram_bytes / 2 ** 30, "attention": res.stats.attention}
    # per-stage timings of a second run
    timer = StageTimer()
    timer.wrap(pipe.projector, "stream", "lq_projector")
    timer.wrap(pipe.dit, "forward_chunk", "dit")
    orig_decoder_for = pipe._decoder_for

    def decoder_for(c):
        d = orig_decoder_for(c)
        timer.wrap(d, "decode", "decoder")
        return d
    pipe._decoder_for = decoder_for
    orig_fix = eng.color_fix

    def fix(*a, **kw):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        r = orig_fix(*a, **kw)
        e.record()
        timer.events.append(("color_fix", s, e))
        return r
    eng.color_fix = fix
    t0 = time.perf_counter()
    pipe.upscale(frames, cfg)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    eng.color_fix = orig_fix
    tot = timer.totals()
    out["stages_ms_total"] = {k: round(sum(v), 1) for k, v in tot.items()}
    dit = tot.get("dit", [])
    if len(dit) > 2:
        steady_dit = statistics.median(dit[1:])
        dec = statistics.median(tot["decoder"][1:])
        proj = statistics.median([sum(tot["lq_projector"][i:i + 2]) for i in range(7, len(tot["lq_projector"]) - 1, 2)])
        cf = statistics.median(tot["color_fix"][1:])
        chunk_ms = steady_dit + dec + proj + cf
        out["steady_chunk_ms"] = {"dit": round(steady_dit, 2), "decoder": round(dec, 2), "lq_projector": round(proj, 2),
                                  "color_fix": round(cf, 2), "sum": round(chunk_ms, 2)}
        out["steady_fps_from_stages"] = round(8000.0 / chunk_ms, 1)
    out["wall_second_run_s"] = round(wall, 3)
    if args.kernels and mode == args.modes[0]:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            pipe.upscale(frames[:33], cfg)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.kernels))
    if args.long_frames and mode == "tiny-long":
        long = torch.rand((args.long_frames, args.height, args.width, 3), generator=gen)
        r2 = pipe.upscale(long, cfg)
        out["long"] = {"frames": r2.frames.shape[0], "fps": r2.stats.fps, "peak_vram_gib": r2.stats.peak_vram_bytes / 2 ** 30}
    del pipe
    torch.cuda.empty_cache()
    return out


def fixture_check() -> list[dict]:
    import importlib.util
    spec = importlib.util.spec_from_file_location("flashvsr_tests_conftest", ROOT / "tests" / "conftest.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))     # registers the test helpers
    from flashvsr_tests_fixture_run import case_files, load_case, run_case
    rows = []
    for path in case_files():          # the shipped cases plus those in $FLASHVSR_FIXTURES
        case = load_case(path.with_suffix(".safetensors"), json.loads(path.read_text()))
        for sage, fast in (("disable", False), ("enable", False), ("disable", True), ("enable", True)):
            r = run_case(case, torch.bfloat16, device="cuda", sageattention=sage, fast=fast)
            ref = case.tensors["fp32/frames_final_s2"]
            ours = r.final.float()[..., ::2, ::2]
            mse = torch.mean((ours.double() - ref.double()) ** 2).item()
            masks_equal = all(torch.equal(r.masks[(int(n.split('/')[1][5:]), int(n.split('/')[2][5:]))],
                                          case.tensors[n]) for n in case.tensors
                              if n.startswith("bf16/") and n.endswith("block_mask"))
            rows.append({"case": path.stem, "sage": sage, "fast_path": fast, "psnr_vs_fp32": round(10 * math.log10(4 / mse), 2),
                         "bf16_masks_equal": masks_equal, "nan": bool(torch.isnan(r.final).any())})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["tiny", "tiny-long", "full"])
    ap.add_argument("--frames", type=int, default=57)
    ap.add_argument("--height", type=int, default=192)
    ap.add_argument("--width", type=int, default=352)
    ap.add_argument("--sage", default="enable")
    ap.add_argument("--kernels", type=int, default=30)
    ap.add_argument("--long-frames", type=int, default=201)
    ap.add_argument("--skip-fixtures", action="store_true")
    args = ap.parse_args()
    import_pack()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    results = {}
    if not args.skip_fixtures:
        results["fixtures"] = fixture_check()
        print(json.dumps(results["fixtures"], indent=1), flush=True)
    for m in args.modes:
        results[m] = profile_mode(m, args)
        print(json.dumps(results[m], indent=1), flush=True)
    import os
    out = os.environ.get("OUT")
    if out:
        pathlib.Path(out, "profile.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
