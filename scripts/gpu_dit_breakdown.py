"""Where a steady chunk's time and memory go at 768x1408 output (speed only: random full-size weights).

Run on a GPU from the repository root (sections can be left out with --skip NAME ...):
    python scripts/gpu_dit_breakdown.py [--mode tiny|tiny-long|full] [--frames N] --json $OUT/breakdown.json
- kernels: the CUDA kernels of three steady DiT chunks, grouped (attention / GEMM / compiled glue /
  other), per chunk, and the DiT's GPU and host time per chunk with and without the profiler;
- period: the whole pipeline's GPU period per steady chunk (all streams, idle time included);
- syncs: every call of a run that makes the host wait for the GPU, with the line that made it;
- host: a cProfile of one run;
- attention: the block-sparse kernel on the q, k, v and mask of one real layer, per configuration;
- memory: Tiny-Long peak VRAM per decoder pass size, per stage, and what is alive when it decodes.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import pathlib
import time
from dataclasses import replace

import torch
from _pack import ROOT, import_pack


def _group(name: str) -> str:
    low = name.lower()
    if "bsa_fwd" in low or "flash" in low or "fmha" in low or "attention" in low:
        return "attention"
    if any(s in low for s in ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_")):
        return "gemm"
    if low.startswith("triton_"):
        return "compiled glue"
    return "other"


def _run_with_dit(pipe, cfg, frames, forward_chunk) -> None:
    """One run with the DiT's ``forward_chunk`` replaced (a wrapper around the original)."""
    orig = pipe.dit.forward_chunk
    pipe.dit.forward_chunk = forward_chunk
    try:
        pipe.upscale(frames, cfg)
        torch.cuda.synchronize()
    finally:
        pipe.dit.forward_chunk = orig


def _device_ms(event) -> float:
    return (getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)) / 1000.0


def _tally(prof, n: int) -> tuple[collections.Counter, list[tuple[str, float, float]], float]:
    """Kernel time per unit (chunk or period) of a profile over ``n`` units: by group, per kernel
    (name, calls, ms; longest first) and in memory copies."""
    groups, rows, copies = collections.Counter(), [], 0.0
    for ev in prof.key_averages():
        t = _device_ms(ev) / n
        if t <= 0:
            continue
        if "Memcpy" in ev.key:
            copies += t
        rows.append((ev.key, ev.count / n, t))
        groups[_group(ev.key)] += t
    rows.sort(key=lambda r: -r[2])
    return groups, rows, copies


def steady_kernels(pipe, cfg, frames, chunks=(2, 3, 4)) -> dict:
    """Profile the DiT of the given steady chunks only (CUDA kernels, summed, per chunk)."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA])
    dit = pipe.dit
    orig = dit.forward_chunk
    events = []
    cpu_ms = {}

    def wrapped(latents, lq, consts, state, *a, **kw):
        idx = state.chunk_index
        if chunks and idx == chunks[0]:
            torch.cuda.synchronize()
            prof.start()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        out = orig(latents, lq, consts, state, *a, **kw)
        cpu_ms[idx] = round((time.perf_counter() - t0) * 1000, 2)
        e.record()
        events.append((idx, s, e))
        if chunks and idx == chunks[-1]:
            torch.cuda.synchronize()
            prof.stop()
        return out

    _run_with_dit(pipe, cfg, frames, wrapped)
    per_chunk_ms = {i: s.elapsed_time(e) for i, s, e in events}
    n = len(chunks)
    if not n:
        return {"dit_ms_per_chunk": per_chunk_ms, "dit_host_enqueue_ms": cpu_ms}
    groups, rows, _ = _tally(prof, n)
    return {"dit_ms_per_chunk": per_chunk_ms, "dit_host_enqueue_ms": cpu_ms,
            "groups_ms_per_chunk": {k: round(v, 2) for k, v in groups.items()},
            "kernel_sum_ms_per_chunk": round(sum(groups.values()), 2),
            "top_kernels": [{"name": k[:110], "calls_per_chunk": c, "ms_per_chunk": round(t, 3)} for k, c, t in rows[:35]]}


def host_profile(pipe, cfg, frames, top: int = 45) -> str:
    """cProfile of one whole run: where the host spends its time enqueueing the GPU work."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    pipe.upscale(frames, cfg)
    torch.cuda.synchronize()
    prof.disable()
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def chunk_period(pipe, cfg, frames, window=(2, 4)) -> dict:
    """The whole pipeline's period per steady chunk: GPU time between the starts of consecutive DiT
    chunks (everything the GPU does per chunk, idle gaps included), the host's time for the same,
    and the kernels of every stream over ``window`` (whole periods) grouped like ``steady_kernels``."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA])
    dit = pipe.dit
    orig = dit.forward_chunk
    starts, host = {}, {}

    def wrapped(latents, lq, consts, state, *a, **kw):
        idx = state.chunk_index
        if idx in window:
            torch.cuda.synchronize()     # only at the window's edges
            (prof.start if idx == window[0] else prof.stop)()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        starts[idx], host[idx] = ev, time.perf_counter()
        return orig(latents, lq, consts, state, *a, **kw)

    _run_with_dit(pipe, cfg, frames, wrapped)
    idx = sorted(starts)
    gpu = {i: round(starts[i].elapsed_time(starts[j]), 2) for i, j in itertools.pairwise(idx)
           if not (window[0] <= i < window[1]) and not (i < window[0] < j)}
    hst = {i: round((host[j] - host[i]) * 1000, 2) for i, j in itertools.pairwise(idx)}
    n = window[1] - window[0]
    groups, rows, copies = _tally(prof, n)
    return {"gpu_period_ms": gpu, "host_period_ms": hst,
            "kernels_ms_per_period": {k: round(v, 2) for k, v in groups.items()},
            "kernel_sum_ms_per_period": round(sum(groups.values()), 2), "memcpy_ms_per_period": round(copies, 2),
            "top_kernels": [{"name": k[:110], "calls_per_period": c, "ms_per_period": round(t, 3)} for k, c, t in rows[:45]]}


def host_syncs(pipe, cfg, frames) -> list[dict]:
    """Every operation of one run that makes the host wait for the GPU, with our innermost caller."""
    import traceback
    import warnings
    seen = collections.Counter()
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        ours = [f for f in traceback.extract_stack()[:-1] if str(ROOT) in f.filename and "gpu_dit_breakdown" not in f.filename]
        where = f"{ours[-1].filename.replace(str(ROOT) + '/', '')}:{ours[-1].lineno} {ours[-1].line}" if ours else filename
        seen[(str(message)[:80], where)] += 1

    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            pipe.upscale(frames, cfg)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old_show
    return [{"what": m, "where": w, "calls": n} for (m, w), n in seen.most_common()]


def capture_layer(pipe, cfg, frames, chunk=2, layer=15) -> dict:
    """q, k, v, block_mask of one steady layer, and the mask density of every steady layer."""
    disp = pipe.attention
    orig = disp.run_block_sparse
    calls = {"n": 0}
    got = {}
    dens = []

    layers = pipe.dit.cfg.num_layers

    def wrapped(report, mode, q, k, v, block_mask, *rest):
        i = calls["n"]
        calls["n"] += 1
        if i >= layers:                 # chunk >= 1: steady
            dens.append(block_mask.float().mean())
        if i == layers * chunk + layer:
            got.update(q=q.clone(), k=k.clone(), v=v.clone(), mask=block_mask.clone())
        return orig(report, mode, q, k, v, block_mask, *rest)

    disp.run_block_sparse = wrapped
    try:
        pipe.upscale(frames, cfg)
    finally:
        disp.run_block_sparse = orig
    d = torch.stack(dens).cpu()
    got["density"] = {"min": d.min().item(), "median": d.median().item(), "max": d.max().item()}
    return got


def kernel_on_real_inputs(cap: dict) -> list[dict]:
    import triton.testing
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import build_lut
    q, k, v, mask = cap["q"], cap["k"], cap["v"], cap["mask"]
    lut, counts = build_lut(mask)
    selected = counts.sum().item()
    flops = 4 * 128 * 128 * 128 * selected
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = torch.rand(mask.shape, generator=gen, device="cuda") < mask.float().mean()
    rlut, rcounts = build_lut(rnd)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    ref = tk.block_sparse_attention(qc, kc, vc, lut, counts, tk.SM90_CONFIG)
    configs = [tk.SM90_CONFIG, tk.KernelConfig(64, 4, 2, True, longest_first=False),
               tk.KernelConfig(128, 8, 2, True), tk.KernelConfig(128, 8, 2, True, longest_first=False),
               tk.KernelConfig(64, 4, 2, False), tk.KernelConfig(64, 4, 2, False, longest_first=False)]
    rows = []

    def add(label, fn, nsel):
        ms = triton.testing.do_bench(fn, warmup=25, rep=200)
        rows.append({"case": label, "ms": round(ms, 4),
                     "tflops_selected": round(4 * 128 ** 3 * nsel / ms / 1e9, 1)})
        print(rows[-1], flush=True)

    for c in configs:
        add(f"real layout, real mask, {c.label()}", lambda c=c: tk.block_sparse_attention(q, k, v, lut, counts, c), selected)
    add("contiguous, real mask, default", lambda: tk.block_sparse_attention(qc, kc, vc, lut, counts, tk.SM90_CONFIG), selected)
    add("real layout, random mask same density", lambda: tk.block_sparse_attention(q, k, v, rlut, rcounts, tk.SM90_CONFIG),
        rcounts.sum().item())
    add("build_lut", lambda: build_lut(mask), selected)
    out = tk.block_sparse_attention(q, k, v, lut, counts, tk.SM90_CONFIG)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    per_q = counts.float()
    rows.append({"case": "mask stats", "selected_blocks": selected, "gflop": flops / 1e9,
                 "blocks_per_qblock_min": per_q.min().item(), "max": per_q.max().item(),
                 "mean": per_q.mean().item(), "relL2_real_vs_contiguous": rel,
                 "q_strides": list(q.stride()), "k_strides": list(k.stride())})
    print(rows[-1], flush=True)
    return rows


def stage_memory(pipe, cfg, frames) -> dict:
    """Peak allocated GiB inside each stage call (and what was allocated before it), per stage."""
    out = {}
    active: list[list] = []          # [label, running peak, allocated before] of the calls in progress

    def wrap(obj, name, label):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            cur = torch.cuda.max_memory_allocated()
            for frame in active:         # nested calls reset the peak: fold it into the outer ones first
                frame[1] = max(frame[1], cur)
            torch.cuda.reset_peak_memory_stats()
            active.append([label, 0, torch.cuda.memory_allocated()])
            r = fn(*a, **kw)
            cur = torch.cuda.max_memory_allocated()
            for frame in active:
                frame[1] = max(frame[1], cur)
            _, peak, before = active.pop()
            row = out.setdefault(label, {"peak_gib": 0.0, "calls": 0})
            if peak / 2 ** 30 > row["peak_gib"]:
                row.update(peak_gib=round(peak / 2 ** 30, 2), before_gib=round(before / 2 ** 30, 2), call=row["calls"])
            row["calls"] += 1
            return r
        setattr(obj, name, timed)
        return fn

    d0 = wrap(pipe.dit, "forward_chunk", "dit")
    p0 = wrap(pipe.projector, "stream", "lq_projector")
    orig = pipe._decoder_for

    class Fn:                       # compiled callables cannot take attributes; wrap a holder
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, *a, **kw):
            return self.fn(*a, **kw)

    def decoder_for(c):
        d = orig(c)
        wrap(d, "decode", "decoder")
        if hasattr(d, "passes"):
            body, tail = Fn(d.passes.body or d.net.run_body), Fn(d.passes.tail or d.net.run_tail)
            wrap(body, "fn", "decoder body pass")
            wrap(tail, "fn", "decoder tail pass")
            d.passes = replace(d.passes, body=body, tail=tail)
        return d
    pipe._decoder_for = decoder_for
    try:
        pipe.upscale(frames, cfg)
    finally:
        pipe.dit.forward_chunk, pipe.projector.stream, pipe._decoder_for = d0, p0, orig
    return out


def live_memory(pipe, cfg, frames, at_call: int = 2) -> list[dict]:
    """What is allocated when the decoder starts its ``at_call``-th chunk: live blocks grouped by
    the innermost line of this repository that allocated them (torch's memory history)."""
    torch.cuda.memory._record_memory_history(max_entries=500000)
    orig = pipe._decoder_for
    snap = {}

    def decoder_for(c):
        d = orig(c)
        fn = d.decode
        calls = [0]

        def decode(*a, **kw):
            if calls[0] == at_call:
                snap["s"] = torch.cuda.memory._snapshot()
            calls[0] += 1
            return fn(*a, **kw)
        d.decode = decode
        return d
    pipe._decoder_for = decoder_for
    try:
        pipe.upscale(frames, cfg)
    finally:
        pipe._decoder_for = orig
        torch.cuda.memory._record_memory_history(enabled=None)
    groups = collections.Counter()
    for seg in snap["s"]["segments"]:
        for blk in seg["blocks"]:
            if blk["state"] != "active_allocated":
                continue
            ours = [f for f in blk.get("frames", []) if str(ROOT) in f["filename"]
                    and "gpu_dit_breakdown" not in f["filename"]]
            where = f"{ours[0]['filename'].replace(str(ROOT) + '/', '')}:{ours[0]['line']} {ours[0]['name']}" if ours else "?"
            groups[where] += blk["size"]
    return [{"where": w, "gib": round(n / 2 ** 30, 3)} for w, n in groups.most_common(25)]


def tiny_long_memory(frames, cfg) -> list[dict]:
    from comfyui_flashvsr.flashvsr.engine.decoders import TinyDecoder
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    pipe = FlashVSR.random(mode="tiny-long", device="cuda", dtype=torch.bfloat16, size="full")
    orig = pipe._decoder_for
    rows = []
    for per_pass, tail in ((2, 8), (1, 2), (1, 1)):
        def decoder_for(c, per_pass=per_pass, tail=tail):
            d = orig(c)
            return TinyDecoder(d.net, replace(d.passes, latents=per_pass, tail_frames=tail))
        pipe._decoder_for = decoder_for
        pipe.upscale(frames[:25], cfg)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        res = pipe.upscale(frames, cfg)
        rows.append({"latents_per_pass": per_pass, "tail_frames": tail, "fps": round(res.stats.fps, 2),
                     "peak_vram_gib": round(res.stats.peak_vram_bytes / 2 ** 30, 2),
                     "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2 ** 30, 2)})
        print(rows[-1], flush=True)
    pipe._decoder_for = orig
    rows.append({"stage_memory_default_decoder": stage_memory(pipe, cfg, frames)})
    print(rows[-1], flush=True)
    rows.append({"live_at_decoder_start": live_memory(pipe, cfg, frames)})
    print(json.dumps(rows[-1], indent=0), flush=True)
    rows.append({"tiny_long_host_syncs": host_syncs(pipe, cfg, frames)})
    print(rows[-1], flush=True)
    del pipe
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=57)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--mode", default="tiny")
    ap.add_argument("--sage", nargs="+", default=["disable"], choices=("enable", "disable"),
                    help="sageattention settings for the kernels and period sections (the others use the first)")
    args = ap.parse_args()
    import_pack()
    from comfyui_flashvsr.flashvsr.config import UpscaleConfig
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand((args.frames, 192, 352, 3), generator=gen)
    results = {}
    pipe = FlashVSR.random(mode=args.mode, device="cuda", dtype=torch.bfloat16, size="full")
    for sage in args.sage:
        cfg = UpscaleConfig(scale=4.0, sageattention=sage)
        pipe.upscale(frames[:25], cfg)
        print(f"--- sageattention={sage}", flush=True)
        if "kernels" not in args.skip:
            plain = steady_kernels(pipe, cfg, frames, chunks=())      # no profiler: DiT time and host time per chunk
            results[f"steady_{sage}"] = steady_kernels(pipe, cfg, frames)
            results[f"steady_{sage}"]["without_profiler"] = {k: plain[k] for k in ("dit_ms_per_chunk", "dit_host_enqueue_ms")}
            print(json.dumps(results[f"steady_{sage}"], indent=1), flush=True)
        if "period" not in args.skip:
            results[f"period_{sage}"] = chunk_period(pipe, cfg, frames)
            print(json.dumps(results[f"period_{sage}"]), flush=True)
    cfg = UpscaleConfig(scale=4.0, sageattention=args.sage[0])
    if "syncs" not in args.skip:
        results["host_syncs"] = host_syncs(pipe, cfg, frames)
        print(json.dumps(results["host_syncs"], indent=1), flush=True)
    if "host" not in args.skip:
        text = host_profile(pipe, cfg, frames)
        print(text, flush=True)
        results["host_profile"] = text
    if "attention" not in args.skip:
        cap = capture_layer(pipe, cfg, frames)
        results["mask_density"] = cap["density"]
        print("steady mask density", cap["density"], flush=True)
        results["attention_real_inputs"] = kernel_on_real_inputs(cap)
    del pipe
    torch.cuda.empty_cache()
    if "memory" not in args.skip:
        results["tiny_long_memory"] = tiny_long_memory(frames, cfg)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
