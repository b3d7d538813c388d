"""Experiments on the block-sparse kernel's inner loop (not used by the pack until measured faster).

Variants of attention/triton_kernels.py's TMA kernel: Triton's automatic warp specialisation of the
key loop, and lazy rescaling of the accumulator (rescale only when a row maximum grew by more than
2**8, as FlashAttention-4 does; exact up to rounding). Times on the steady-state shapes at 768x1408
(8448 x 33792, 12 heads, d 128, bf16, (L, H, D) storage as in the DiT, random 45 % block masks).
Also: the draft mask's threshold by topk vs by sort.
    python scripts/gpu_attention_variants.py
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import torch
import triton
import triton.language as tl
import triton.testing

ROOT = pathlib.Path(__file__).resolve().parents[1]


@triton.jit
def _variant(
    q_desc, k_desc, v_desc, o_desc, LUT, CNT, qk_scale, slb, slh, slm, scb, sch, H,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MBLOCK: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr,
):
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    SUB: tl.constexpr = MBLOCK // BLOCK_N
    q = q_desc.load([b, h, qblk * MBLOCK, 0]).reshape(MBLOCK, HEAD_DIM)
    lut = LUT + b.to(tl.int64) * slb + h * slh + qblk * slm
    n_steps = tl.load(CNT + b.to(tl.int64) * scb + h * sch + qblk) * SUB
    m_i = tl.full([MBLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([MBLOCK], tl.float32)
    acc = tl.zeros([MBLOCK, HEAD_DIM], tl.float32)
    for j in tl.range(0, n_steps, warp_specialize=WS):
        start = tl.load(lut + j // SUB) * MBLOCK + (j % SUB) * BLOCK_N
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, k.T)
        m_blk = tl.max(qk, 1) * qk_scale
        if LAZY:
            # keep the stale maximum unless some row grew by more than 8 (p stays <= 2**8)
            grow = tl.max(m_blk - m_i, 0)
            if grow > 8.0:
                m_new = tl.maximum(m_i, m_blk)
                alpha = tl.math.exp2(m_i - m_new)
                acc = acc * alpha[:, None]
                l_i = l_i * alpha
                m_i = m_new
            p = tl.math.exp2(qk * qk_scale - m_i[:, None])
            l_i = l_i + tl.sum(p, 1)
            v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v, acc)
        else:
            m_new = tl.maximum(m_i, m_blk)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_desc.store([b, h, qblk * MBLOCK, 0], out.to(q.dtype).reshape(1, 1, MBLOCK, HEAD_DIM))


@triton.jit
def _half_rows(
    q_desc, k_desc, v_desc, o_desc, LUT, CNT, ORDER, NQ, qk_scale, slb, slh, slm, scb, sch, H,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    # ROWS (64) query rows per program: half the accumulator registers, so more programs per SM hide
    # each other's softmax; every program still walks its 128-row block's key list.
    pid = tl.program_id(0)
    task = tl.load(ORDER + pid // 2)
    qblk = task % NQ
    bh = task // NQ
    part = pid % 2
    b = bh // H
    h = bh % H
    SUB: tl.constexpr = 128 // BLOCK_N
    row0 = qblk * 128 + part * ROWS
    q = q_desc.load([b, h, row0, 0]).reshape(ROWS, HEAD_DIM)
    lut = LUT + b.to(tl.int64) * slb + h * slh + qblk * slm
    n_steps = tl.load(CNT + b.to(tl.int64) * scb + h * sch + qblk) * SUB
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for j in range(0, n_steps):
        start = tl.load(lut + j // SUB) * 128 + (j % SUB) * BLOCK_N
        k = k_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, k.T)
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, h, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_desc.store([b, h, row0, 0], out.to(q.dtype).reshape(1, 1, ROWS, HEAD_DIM))


def run_half_rows(q, k, v, lut, counts, block_n, warps, stages):
    from comfyui_flashvsr.attention.triton_kernels import LOG2E, _descriptor, task_order
    out = torch.empty_like(q)
    descs = (_descriptor(q, 64), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, 64))
    order = task_order(counts, True)
    _half_rows[(2 * order.numel(),)](*descs, lut, counts, order, q.shape[2] // 128, q.shape[-1] ** -0.5 * LOG2E,
                                     lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1),
                                     q.shape[1], HEAD_DIM=q.shape[-1], BLOCK_N=block_n, ROWS=64,
                                     num_warps=warps, num_stages=stages)
    return out


def _import_pack():
    spec = importlib.util.spec_from_file_location("comfyui_flashvsr", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_flashvsr"] = mod
    spec.loader.exec_module(mod)


def run_variant(q, k, v, lut, counts, block_n, warps, stages, ws, lazy):
    from comfyui_flashvsr.attention.triton_kernels import LOG2E, _descriptor
    out = torch.empty_like(q)
    descs = (_descriptor(q, 128), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, 128))
    grid = (q.shape[2] // 128, q.shape[0] * q.shape[1])
    _variant[grid](*descs, lut, counts, q.shape[-1] ** -0.5 * LOG2E,
                   lut.stride(0), lut.stride(1), lut.stride(2), counts.stride(0), counts.stride(1), q.shape[1],
                   HEAD_DIM=q.shape[-1], BLOCK_N=block_n, MBLOCK=128, WS=ws, LAZY=lazy,
                   num_warps=warps, num_stages=stages)
    return out


def main():
    _import_pack()
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import build_lut
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), flush=True)
    heads, d, lq, lk = 12, 128, 8448, 33792
    g = torch.Generator(device="cuda").manual_seed(0)
    # (L, H, D) storage viewed as (1, H, L, D), as the DiT passes them
    q = torch.randn(1, lq, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k = torch.randn(1, lk, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    v = torch.randn(1, lk, heads, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    mask = torch.rand(1, heads, lq // 128, lk // 128, device="cuda", generator=g) < 0.45
    # real masks vary 20..164 key blocks per query block: give the rows different densities too
    mask &= torch.rand(1, heads, lq // 128, 1, device="cuda", generator=g) < 0.9
    lut, counts = build_lut(mask)
    sel = counts.sum().item()
    ref = tk.block_sparse_attention(q, k, v, lut, counts, tk.SM90_CONFIG).float()

    def tflops(ms):
        return 4 * 128 ** 3 * sel / ms / 1e9

    base = triton.testing.do_bench(lambda: tk.block_sparse_attention(q, k, v, lut, counts, tk.SM90_CONFIG), warmup=25, rep=300)
    print(f"| package default {tk.SM90_CONFIG.label()} | {base:.3f} ms | {tflops(base):.0f} TFLOP/s | - |", flush=True)
    for block_n, warps, stages in ((64, 4, 2), (128, 4, 2), (64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 2)):
        label = f"64-row programs N{block_n} w{warps} s{stages}"
        try:
            out = run_half_rows(q, k, v, lut, counts, block_n, warps, stages)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(lambda: run_half_rows(q, k, v, lut, counts, block_n, warps, stages),
                                         warmup=25, rep=300)
            print(f"| {label} | {ms:.3f} ms | {tflops(ms):.0f} TFLOP/s | relL2 vs default {rel:.1e} |", flush=True)
        except Exception as exc:           # an experiment: report and go on
            print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:160]} |", flush=True)
    for block_n, warps, stages in ((64, 4, 2),):
        for ws in (False,):
            for lazy in (False,):
                label = f"N{block_n} w{warps} s{stages} ws={int(ws)} lazy={int(lazy)}"
                try:
                    out = run_variant(q, k, v, lut, counts, block_n, warps, stages, ws, lazy)
                    rel = ((out.float() - ref).norm() / ref.norm()).item()
                    ms = triton.testing.do_bench(lambda: run_variant(q, k, v, lut, counts, block_n, warps, stages, ws, lazy),
                                                 warmup=25, rep=300)
                    print(f"| {label} | {ms:.3f} ms | {tflops(ms):.0f} TFLOP/s | relL2 vs default {rel:.1e} |", flush=True)
                except Exception as exc:           # an experiment: report and go on
                    print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:160]} |", flush=True)

    flat = torch.rand(12, 66 * 264, device="cuda", generator=g).softmax(-1)
    kept = 7919
    a = torch.topk(flat, kept + 1, dim=1).values[:, -1:]
    b = torch.sort(flat, dim=1, descending=True).values[:, kept:kept + 1]
    t1 = triton.testing.do_bench(lambda: torch.topk(flat, kept + 1, dim=1), warmup=10, rep=100)
    t2 = triton.testing.do_bench(lambda: torch.sort(flat, dim=1, descending=True), warmup=10, rep=100)
    print(f"threshold: topk {t1 * 1000:.0f} us, sort {t2 * 1000:.0f} us, equal {torch.equal(a, b)}", flush=True)


if __name__ == "__main__":
    main()
