"""GPU timing table of the attention backends at FlashVSR's steady-state shapes (issues #3, #6).

    python -m comfyui_flashvsr.attention.bench [--out FILE] [--no-sweep]
    python attention/bench.py [--out FILE] [--no-sweep]

Block-sparse self-attention: 12 heads, head_dim 128, 8448 queries x 33792 keys (768x1408 output),
random per-head 128x128 block masks at densities 25 %, 45 % (the official one at this size) and
100 %; cross-attention: the same queries against 512 keys. bf16. Times are medians of
``triton.testing.do_bench`` (CUDA events, L2 flushed between calls; without Triton, medians of CUDA
events around single calls). Every block-sparse backend that imports here gets a row: FA4, our
Triton kernels, compiled flex, the gathered pure-PyTorch path (varlen and padded), cuDNN frontend's
block-sparse attention (measured only; not a backend), the masked-SDPA reference. "TFLOP/s" counts the matrix
products on the selected blocks only (4 * 128 * 128 * head_dim per selected block pair).
The sweep times each Triton kernel configuration at 45 % and checks it against the masked-SDPA
reference (bf16).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):                 # run as a script path: register the pack by path
    import importlib.util
    import pathlib

    _root = pathlib.Path(__file__).resolve().parent.parent
    _spec = importlib.util.spec_from_file_location("comfyui_flashvsr", _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    _pack = importlib.util.module_from_spec(_spec)
    sys.modules["comfyui_flashvsr"] = _pack
    _spec.loader.exec_module(_pack)
    __package__ = "comfyui_flashvsr.attention"

from .block_sparse import BLOCK, CompiledFlex, build_lut, masked_reference  # noqa: E402
from .dispatch import AttentionDispatcher  # noqa: E402
from .fa4 import fa4_block_sparse, probe_fa4  # noqa: E402
from .gathered import gathered_attention, paged_attention  # noqa: E402
from .probe import probe_sage, probe_triton  # noqa: E402

HEADS, DIM, LQ, LK, CROSS = 12, 128, 8448, 33792, 512
DENSITIES = (0.25, 0.45, 1.0)
SWEEP_BF16 = [(64, 8, 2, False), (128, 8, 2, False), (64, 4, 2, True), (64, 8, 2, True), (64, 8, 3, True),
              (128, 8, 2, True), (128, 8, 3, True)]    # 4 warps spill registers except TMA N64 (ptxas)
SWEEP_INT8 = [(64, 8, 2), (128, 8, 2), (64, 4, 2, True), (128, 8, 2, True)]


def median_ms(fn, rep_ms: int = 200) -> float:
    if probe_triton().available:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(max(5, min(50, rep_ms // 10))):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(sorted(times)[len(times) // 2])


def cudnn_bsa():
    """cuDNN frontend's block-sparse attention, or None (measured only, never dispatched)."""
    try:
        from cudnn import block_sparse_attention_forward
    except Exception:         # not installed, or its CUDA libraries do not load here
        return None

    def run(q, k, v, lut, counts):
        got = block_sparse_attention_forward(q, k, v, lut, q2k_block_nums=counts, sparse_block_size=BLOCK,
                                             allow_empty_block_nums=True)
        return got["o_tensor"] if isinstance(got, dict) else got[0]
    return run


def extra_backends(q, k, v, lut, counts) -> list:
    """(name, fn) of the backends beside our Triton kernels and flex that can run here."""
    cases = []
    fa4 = probe_fa4()
    if fa4.available and torch.cuda.get_device_capability()[0] in (9, 10, 11):
        cases.append((f"FA4 CuTe ({fa4.describe()})", lambda: fa4_block_sparse(fa4, q, k, v, lut, counts)))
    cases.append(("paged varlen (pure PyTorch, no gather)", lambda: paged_attention(q, k, v, lut, counts)))
    cases.append(("gathered, varlen (pure PyTorch)", lambda: gathered_attention(q, k, v, lut, counts, method="varlen")))
    cases.append(("gathered, varlen, 2 GiB chunks",
                  lambda: gathered_attention(q, k, v, lut, counts, method="varlen", budget_bytes=2 << 30)))
    cases.append(("gathered, padded + key mask", lambda: gathered_attention(q, k, v, lut, counts, method="padded")))
    bsa = cudnn_bsa()
    if bsa is not None:
        cases.append(("cuDNN frontend BSA (measured only)", lambda: bsa(q, k, v, lut, counts)))
    return cases


def rel_l2(out, ref) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def cosine(out, ref) -> float:
    return float(F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0))


def make_case(density: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, n, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for n in (LQ, LK, LK))
    mask = torch.rand(1, HEADS, LQ // BLOCK, LK // BLOCK, device="cuda", generator=g) < density
    return q, k, v, mask


def tflops(counts, ms: float) -> float:
    return 4.0 * float(counts.sum()) * BLOCK * BLOCK * DIM / (ms * 1e-3) / 1e12


def sweep(tk, rows: list, log) -> tuple:
    q, k, v, mask = make_case(0.45)
    lut, counts = build_lut(mask)
    ref = masked_reference(q, k, v, mask)
    best = {}
    for kind, configs in (("bf16", SWEEP_BF16), ("int8", SWEEP_INT8)):
        for cfg in configs:
            config = tk.KernelConfig(*cfg)
            try:
                if kind == "bf16":
                    fn = lambda: tk.block_sparse_attention(q, k, v, lut, counts, config)  # noqa: E731
                else:
                    quant = tk.quantize_q_and_k(q, k, config.block_n, DIM ** -0.5 * tk.LOG2E, k.mean(dim=2, dtype=torch.float32))
                    fn = lambda: tk.block_sparse_attention_int8(q, k, v, lut, counts, config, quantized=quant)  # noqa: E731
                err = rel_l2(fn(), ref)
                ms = median_ms(fn, rep_ms=100)
            except Exception as exc:          # a config that does not compile or launch is a result
                rows.append(f"| {kind} | {config.label()} | failed: {type(exc).__name__}: {str(exc)[:80]} | | |")
                log(rows[-1])
                continue
            rows.append(f"| {kind} | {config.label()} | {ms:.3f} | {tflops(counts, ms):.0f} | {err:.1e} |")
            log(rows[-1])
            if err < (1e-2 if kind == "bf16" else 3e-2) and ms < best.get(kind, (None, 1e9))[1]:
                best[kind] = (config, ms)
    return best.get("bf16", (None, 0))[0], best.get("int8", (None, 0))[0]


def sparse_table(tk, bf16_cfg, int8_cfg, rows: list, log, densities=DENSITIES) -> None:
    flex = CompiledFlex()
    dispatcher = AttentionDispatcher()
    for density in densities:
        q, k, v, mask = make_case(density, seed=1)
        lut, counts = build_lut(mask)
        actual = float(mask.float().mean())
        cases = extra_backends(q, k, v, lut, counts)
        if tk is not None:
            cases.append(("triton bf16 " + bf16_cfg.label(), lambda: tk.block_sparse_attention(q, k, v, lut, counts, bf16_cfg)))
        if tk is not None and int8_cfg is not None:
            quant = tk.quantize_q_and_k(q, k, int8_cfg.block_n, DIM ** -0.5 * tk.LOG2E, k.mean(dim=2, dtype=torch.float32))
            cases += [("triton int8 kernel " + int8_cfg.label(),
                       lambda: tk.block_sparse_attention_int8(q, k, v, lut, counts, int8_cfg, quantized=quant)),
                      ("triton int8 incl. quantisation",
                       lambda: tk.block_sparse_attention_int8(q, k, v, lut, counts, int8_cfg))]
        if tk is not None:
            cases.append(("compiled flex_attention", lambda: flex(q, k, v, lut, counts)))
        if density == 0.45:
            session = dispatcher.session("disable")
            cases.append(("dispatcher block_sparse (LUT + checks + kernel)",
                          lambda: session.block_sparse(q, k, v, mask)))
            enabled = dispatcher.session("enable")
            cases.append(("dispatcher block_sparse, sageattention=enable",
                          lambda: enabled.block_sparse(q, k, v, mask)))
            cases.append(("dense SDPA, no mask (speed baseline only)", lambda: F.scaled_dot_product_attention(q, k, v)))
            cases.append(("masked SDPA reference", lambda: masked_reference(q, k, v, mask)))
        for name, fn in cases:
            try:
                ms = median_ms(fn, rep_ms=100 if "reference" in name else 200)
            except Exception as exc:
                rows.append(f"| {actual:.3f} | {name} | failed: {type(exc).__name__}: {str(exc)[:100]} | |")
                log(rows[-1])
                continue
            rate = tflops(counts, ms) if "dense SDPA" not in name else 4.0 * HEADS * LQ * LK * DIM / (ms * 1e-3) / 1e12
            rows.append(f"| {actual:.3f} | {name} | {ms:.3f} | {rate:.0f} |")
            log(rows[-1])
        if density == 0.45:
            for name, session in (("disable", session), ("enable", enabled)):
                rows.append(f"| | dispatcher ran ({name}): {session.summary()} | | |")
                log(rows[-1])


def accuracy_rows(tk, bf16_cfg, int8_cfg, rows: list, log) -> None:
    q, k, v, mask = make_case(0.45, seed=2)
    lut, counts = build_lut(mask)
    ref = masked_reference(q.float(), k.float(), v.float(), mask)
    runs = dict(extra_backends(q, k, v, lut, counts))
    if tk is not None:
        runs.update({"triton bf16": lambda: tk.block_sparse_attention(q, k, v, lut, counts, bf16_cfg),
                     "triton int8": lambda: tk.block_sparse_attention_int8(q, k, v, lut, counts, int8_cfg),
                     "compiled flex_attention": lambda: CompiledFlex()(q, k, v, lut, counts)})
    runs["masked SDPA reference, bf16"] = lambda: masked_reference(q, k, v, mask)
    outs = {}
    for name, run in runs.items():
        try:
            outs[name] = run()
        except Exception as exc:
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:100]} | |")
            log(rows[-1])
    qc, kc, vc = q, k[:, :, :CROSS], v[:, :, :CROSS]
    ref_cross = F.scaled_dot_product_attention(qc.float(), kc.float(), vc.float())
    cross = {"cross: SDPA bf16": F.scaled_dot_product_attention(qc, kc, vc)}
    if probe_sage().available:
        cross["cross: sage via dispatcher"] = AttentionDispatcher().session("enable").dense(qc, kc, vc)
    for name, out in outs.items():
        rows.append(f"| {name} | {rel_l2(out, ref):.4f} | {cosine(out, ref):.5f} |")
        log(rows[-1])
    for name, out in cross.items():
        rows.append(f"| {name} | {rel_l2(out, ref_cross):.4f} | {cosine(out, ref_cross):.5f} |")
        log(rows[-1])


def cross_table(rows: list, log) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, HEADS, LQ, DIM, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, HEADS, CROSS, DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    plain = AttentionDispatcher().session("disable")
    cases = [("SDPA", lambda: F.scaled_dot_product_attention(q, k, v)),
             ("SDPA via dispatcher (mode disable)", lambda: plain.dense(q, k, v))]
    probe = probe_sage()
    if probe.available:
        session = AttentionDispatcher().session("enable")
        cases.append((f"sage {probe.version} via dispatcher (K cloned for 1.x)", lambda: session.dense(q, k, v)))
        scratch = k.clone()
        cases.append((f"sage {probe.version} raw, no clone", lambda: probe.fn(q, scratch, v, tensor_layout="HND")))
        session.dense(q, k, v)
        log(f"dispatcher with sage enabled: {session.summary()}")
    for name, fn in cases:
        try:
            ms = median_ms(fn)
        except Exception as exc:
            rows.append(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:100]} | |")
            log(rows[-1])
            continue
        rows.append(f"| {name} | {ms:.4f} | {4.0 * HEADS * LQ * CROSS * DIM / (ms * 1e-3) / 1e12:.0f} |")
        log(rows[-1])


def versions() -> str:
    def ver(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    props = torch.cuda.get_device_properties(0)
    return (f"GPU: {props.name} (sm{props.major}{props.minor}, {props.multi_processor_count} SMs); "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {ver('triton')}, "
            f"sageattention {ver('sageattention')}, flash-attn-4 {ver('flash-attn-4')}, "
            f"nvidia-cudnn-frontend {ver('nvidia-cudnn-frontend')}; {datetime.date.today().isoformat()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown tables to this file")
    parser.add_argument("--no-sweep", action="store_true", help="time only the default Triton configs")
    parser.add_argument("--densities", type=lambda text: tuple(float(x) for x in text.split(",")),
                        default=DENSITIES, help="block densities of the sparse table (default 0.25,0.45,1.0)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention bench needs a CUDA GPU", file=sys.stderr)
        return 2
    tk = None
    if probe_triton().available:
        from . import triton_kernels as tk

    log = lambda line: print(line, flush=True)  # noqa: E731
    cc = torch.cuda.get_device_capability()
    lines = [versions(), "", f"Command: `{' '.join(sys.argv)}`", ""]
    bf16_cfg, int8_cfg = (tk.default_config(cc), tk.default_config(cc, int8=True)) if tk else (None, None)
    if not args.no_sweep and tk is not None:
        lines += ["Sweep at density 0.45 (kernel only; error vs the bf16 masked-SDPA reference):", "",
                  "| kernel | config | ms | TFLOP/s | relL2 vs reference |", "|---|---|---|---|---|"]
        best_bf16, best_int8 = sweep(tk, lines, log)
        lines += ["", f"Fastest accurate configs: bf16 {best_bf16 and best_bf16.label()}, "
                      f"int8 {best_int8 and best_int8.label()}; defaults: {bf16_cfg.label()}, {int8_cfg.label()}", ""]
    lines += ["Block-sparse self-attention, 8448 x 33792, 12 heads, d 128, bf16 (default configs):", "",
              "| density | backend | ms | TFLOP/s (selected blocks) |", "|---|---|---|---|"]
    sparse_table(tk, bf16_cfg, int8_cfg, lines, log, args.densities)
    lines += ["", "Cross-attention, 8448 x 512, 12 heads, d 128, bf16:", "",
              "| backend | ms | TFLOP/s |", "|---|---|---|"]
    cross_table(lines, log)
    lines += ["", "Accuracy vs an fp32 reference (density 0.45; cross-attention vs fp32 SDPA):", "",
              "| output | relL2 | cosine |", "|---|---|---|"]
    accuracy_rows(tk, bf16_cfg, int8_cfg, lines, log)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
