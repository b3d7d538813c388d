"""The per-layer block-mask bookkeeping gives exactly what the previous code gave: the draft
threshold and mask, the tiled local bias, the physical (ring-slot) mask, the LUT and the kernels'
launch order. The previous implementations are copied here as ``old_*``; the Triton kernels of
``attention/mask_kernels.py`` run in Triton's interpreter (a child process, as in
test_attention_triton.py) and are compiled ahead of time for sm_80 / sm_90."""
import logging
import math
import pathlib
import textwrap

import pytest
import torch

from comfyui_flashvsr.attention import AttentionDispatcher
from comfyui_flashvsr.attention.block_sparse import build_lut
from comfyui_flashvsr.attention.dispatch import AttentionConfig
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.models import dit as dit_module
from comfyui_flashvsr.models.dit import DiTStreamState, KVRing, SparseParams
from comfyui_flashvsr.models.lcsa import (draft_block_mask, local_bias, local_block_mask, select_above_kth,
                                          topk_count, topk_ratio_for)
from flashvsr_tests_triton_child import run_interpreted

TESTS = pathlib.Path(__file__).resolve().parent
# The real layer at 768x1408: 12 heads, 2 query groups of 6 x 11 windows, 4 key groups.
HEADS, GROUPS, ROWS, COLS, KEY_GROUPS = 12, 2, 6, 11, 4


# ---- the previous implementations ----------------------------------------------------------

def old_draft_block_mask(pooled_q, pooled_k, num_heads, query_groups, local_mask, topk, return_details=False):
    nq, channels = pooled_q.shape
    nk = pooled_k.shape[0]
    s1 = local_mask.shape[0]
    head_dim = channels // num_heads
    q = pooled_q.view(nq, num_heads, head_dim).transpose(0, 1)
    k = pooled_k.view(nk, num_heads, head_dim).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) / math.sqrt(head_dim)
    bias = torch.zeros(local_mask.shape, dtype=torch.float32, device=local_mask.device)
    bias = bias.masked_fill(~local_mask, float("-inf"))
    bias = bias.repeat(nq // s1, nk // s1)
    scores = scores.to(torch.float32) + bias
    probs = torch.softmax(scores, dim=-1)
    flat = probs.reshape(num_heads * query_groups, s1 * nk)
    kept = min(flat.shape[1] - 1, topk)
    thresholds = torch.sort(flat, dim=1, descending=True).values[:, kept:kept + 1]
    mask = (flat > thresholds).reshape(num_heads, nq, nk).unsqueeze(0)
    if not return_details:
        return mask
    return mask, {"scores": scores, "probs": probs, "thresholds": thresholds.squeeze(1)}


def old_threshold(flat, kept):
    return torch.sort(flat, dim=1, descending=True).values[:, kept:kept + 1]


def old_physical_mask(ring, mask, cols):
    out = mask.new_zeros(mask.shape[:-1] + (ring.k.shape[0],))
    out[..., cols] = mask
    return out


def same_bits(a, b):
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def adversarial_rows(n=600, seed=0):
    """Rows that stress a selection: ties, many zeros (softmax of -inf), -0.0, +-inf, constant rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, n, generator=g)
    x[1] = torch.randint(0, 4, (n,), generator=g).float() / 4              # four values, heavy ties
    x[2, : n // 2] = 0.0                                                   # half zeros
    x[3] = 0.0                                                             # all zeros
    x[3, 7] = 1.0
    x[4, ::2] = -0.0                                                       # -0.0 and +0.0 mixed, tied
    x[4, 1::2] = 0.0
    x[4, :5] = 0.25
    x[5] = torch.randn(n, generator=g)                                     # negative values
    x[6, ::3] = float("-inf")
    x[6, 1::3] = float("inf")
    x[7] = 0.5                                                             # constant
    x[8] = torch.randn(n, generator=g) * 1e-38                             # subnormals around zero
    x[9, : n // 3] = float("-inf")
    return x


def real_draft_inputs(seed=0, dtype=torch.bfloat16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s1 = ROWS * COLS
    pooled_q = (torch.randn(GROUPS * s1, HEADS * 128, generator=g) * scale).to(dtype)
    pooled_k = (torch.randn(KEY_GROUPS * s1, HEADS * 128, generator=g) * scale).to(dtype)
    local = local_block_mask(ROWS, COLS, 11)
    topk = topk_count(s1, topk_ratio_for(2.0, 768, 1408))
    return pooled_q, pooled_k, local, topk


# ---- torch paths (every device) --------------------------------------------------------------

@pytest.mark.parametrize("kept", [0, 1, 37, 299, 300, 598, 599])
def test_select_above_kth_gives_the_sort_threshold_with_ties_zeros_and_infinities(kept):
    x = adversarial_rows()
    mask, thresholds = select_above_kth(x, kept)
    want = old_threshold(x, kept)
    assert same_bits(thresholds.abs(), want.abs())          # -0.0 vs +0.0 in a tie of zeros is the sort's pick
    assert torch.equal(thresholds, want) and torch.equal(mask, x > want)


def test_select_above_kth_counts_nan_as_the_largest_value_like_the_sort():
    x = adversarial_rows()
    x[0, :50] = float("nan")
    for kept in (10, 49, 50, 51, 300):
        mask, thresholds = select_above_kth(x, kept)
        want = old_threshold(x, kept)
        assert torch.equal(thresholds.isnan(), want.isnan())
        assert torch.equal(thresholds.nan_to_num(), want.nan_to_num()) and torch.equal(mask, x > want)


def test_select_above_kth_rejects_a_rank_outside_the_row():
    with pytest.raises(ValueError, match=r"kept must be in \[0, 600\)"):
        select_above_kth(adversarial_rows(), 600)


@pytest.mark.parametrize("dtype, scale", [(torch.bfloat16, 1.0), (torch.float32, 1.0), (torch.float32, 30.0),
                                          (torch.float16, 0.01), (torch.float64, 1.0)])
def test_draft_block_mask_equals_the_previous_code_at_the_real_shape(dtype, scale):
    pooled_q, pooled_k, local, topk = real_draft_inputs(dtype=dtype, scale=scale)
    mask, details = draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk, return_details=True)
    old_mask, old_details = old_draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk, return_details=True)
    assert mask.shape == (1, HEADS, GROUPS * ROWS * COLS, KEY_GROUPS * ROWS * COLS)
    assert torch.equal(mask, old_mask)
    for name in ("scores", "probs", "thresholds"):
        assert details[name].dtype == old_details[name].dtype == torch.float32
        assert same_bits(details[name], old_details[name]), name
    shared = draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk,
                              bias=local_bias(local, GROUPS, KEY_GROUPS))
    assert torch.equal(shared, old_mask)


@pytest.mark.parametrize("topk", [0, 5, 10 ** 6])
def test_draft_block_mask_equals_the_previous_code_with_a_narrow_window_and_extreme_budgets(topk):
    pooled_q, pooled_k, _, _ = real_draft_inputs(seed=3, dtype=torch.float32)
    local = local_block_mask(ROWS, COLS, 3)                  # most candidates -inf: many zero probabilities
    assert torch.equal(draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk),
                       old_draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk))


def test_draft_block_mask_uses_a_given_selection_and_falls_back_when_it_declines():
    pooled_q, pooled_k, local, topk = real_draft_inputs(seed=1, dtype=torch.float32)
    want = old_draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk)
    seen = []

    def declines(flat, kept):
        seen.append((tuple(flat.shape), kept))
        return None

    assert torch.equal(draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk, select=declines), want)
    assert seen == [((HEADS * GROUPS, ROWS * COLS * KEY_GROUPS * ROWS * COLS), topk)]
    everything = draft_block_mask(pooled_q, pooled_k, HEADS, GROUPS, local, topk,
                                  select=lambda flat, kept: (torch.ones_like(flat, dtype=torch.bool), flat[:, :1]))
    assert everything.all()


def test_local_bias_is_built_once_per_shape_and_renewed_with_the_local_mask():
    state = DiTStreamState(local_mask=local_block_mask(ROWS, COLS, 11))
    bias = state.draft_bias(GROUPS, KEY_GROUPS)
    assert state.draft_bias(GROUPS, KEY_GROUPS) is bias
    assert state.draft_bias(1, 3).shape == (ROWS * COLS, 3 * ROWS * COLS)
    assert torch.equal(bias, local_bias(state.local_mask, GROUPS, KEY_GROUPS))
    assert bias.dtype == torch.float32 and set(bias.unique().tolist()) == {0.0, float("-inf")}


@pytest.mark.parametrize("groups", [[0, 1, 2], [1, 2, 0], [0, 1, 2, 3], [3, 0, 1, 2], [2, 3, 0, 1], [1], [2, 0]])
def test_physical_mask_equals_the_previous_scatter(groups):
    s1 = 5
    g = torch.Generator().manual_seed(len(groups))
    ring = KVRing.allocate(torch.zeros(s1, 128, 8), torch.zeros(s1, 8), s1, kv_groups=3)     # 4 slots
    mask = torch.rand(1, 3, 2 * s1, len(groups) * s1, generator=g) < 0.5
    got = ring.physical_mask(mask, groups, s1)
    assert got.shape == (1, 3, 2 * s1, 4 * s1)
    assert torch.equal(got, old_physical_mask(ring, mask, ring.columns(groups, s1)))


def test_dit_chunks_are_unchanged_by_the_new_mask_bookkeeping(monkeypatch):
    """Five streaming chunks (chunk 0, the first full ring, eviction into permuted slot orders):
    bitwise the same latents and masks as with the previous draft and physical-mask code."""
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    sparse = SparseParams(topk_ratio=0.5, kv_groups=3, local_range=3)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 16, 6 if k == 0 else 2, 32, 48, generator=g) for k in range(5)]

    def run():
        state, masks = DiTStreamState(), []
        state.observe = lambda layer, name, t: masks.append(t.clone()) if name == "block_mask" else None
        session = AttentionDispatcher().session("disable")
        outs = [pipe.dit.forward_chunk(x, None, pipe.consts, state, sparse, session) for x in xs]
        return outs, masks

    new_outs, new_masks = run()
    monkeypatch.setattr(dit_module, "draft_block_mask",
                        lambda *a, bias=None, select=None, **kw: old_draft_block_mask(*a, **kw))
    monkeypatch.setattr(KVRing, "physical_mask",
                        lambda self, mask, groups, s1: old_physical_mask(self, mask, self.columns(groups, s1)))
    old_outs, old_masks = run()
    assert len(new_masks) == len(old_masks) == 5 * len(pipe.dit.blocks)
    assert all(torch.equal(a, b) for a, b in zip(new_masks, old_masks))
    assert not all(m.all() for m in new_masks) and any(m.any() for m in new_masks)   # a real selection
    assert all(torch.equal(a, b) for a, b in zip(new_outs, old_outs))


def test_mask_kernels_are_not_used_off_cuda():
    dispatcher = AttentionDispatcher()
    x = adversarial_rows()
    assert dispatcher.select_blocks(x, 10) is None
    assert dispatcher.launch_order(torch.tensor([3, 1], dtype=torch.int32)) is None
    mask = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    assert all(torch.equal(a, b) for a, b in zip(dispatcher.block_lut(mask), build_lut(mask)))


def test_a_failing_mask_kernel_falls_back_logs_once_and_is_not_retried(monkeypatch, caplog):
    pytest.importorskip("triton")
    from comfyui_flashvsr.attention import mask_kernels

    calls = []

    def broken(*args):
        calls.append(len(args))
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(mask_kernels, "select_above_kth", broken)
    dispatcher = AttentionDispatcher()
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert dispatcher.mask_kernel("select_above_kth", cuda, adversarial_rows(), 3) is None
    assert calls == [2]
    assert len([r for r in caplog.records if "PassManager" in r.getMessage()]) == 1
    off = AttentionDispatcher(AttentionConfig(triton_masks=False))
    assert off.mask_kernel("select_above_kth", cuda, adversarial_rows(), 3) is None and calls == [2]


# ---- the Triton kernels, interpreted on the CPU -------------------------------------------------

CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers comfyui_flashvsr
    import torch
    from comfyui_flashvsr.attention import mask_kernels as mk
    from comfyui_flashvsr.attention.block_sparse import build_lut
    import test_mask_bookkeeping as t

    out = {}
    def check(name, x, kept):
        for radix in (False, True):         # one program per row, and the multi-program radix passes
            mask, thr = mk.select_above_kth(x, kept, radix=radix)
            want = t.old_threshold(x, kept)
            nan = want.isnan()
            # bit for bit, but for the sign of a zero threshold (a tie of -0.0 and +0.0: the sort's pick)
            bits = t.same_bits(thr[~nan].abs(), want[~nan].abs()) and torch.equal(thr[~nan], want[~nan])
            out[name + (" radix" if radix else "")] = {
                "threshold_bits": bits, "nan": torch.equal(thr.isnan(), nan), "nan_bits": t.same_bits(thr[nan], torch.full_like(thr[nan], float("nan"))),
                "mask": torch.equal(mask, x > want), "shapes": [list(mask.shape), list(thr.shape)]}

    x = t.adversarial_rows()
    for kept in (0, 37, 300, 599):
        check(f"adversarial {kept}", x, kept)
    y = x.clone()
    y[0, :50] = float("nan")
    y[1, :] = float("nan")
    for kept in (49, 50):
        check(f"nan {kept}", y, kept)
    pooled_q, pooled_k, local, topk = t.real_draft_inputs(seed=2)
    _, details = t.old_draft_block_mask(pooled_q, pooled_k, t.HEADS, t.GROUPS, local, topk, return_details=True)
    flat = details["probs"].reshape(t.HEADS * t.GROUPS, -1)[:4]          # real rows of 17424 candidates
    check("real rows", flat, topk)
    check("real rows, strided", torch.cat([flat, flat], 1)[:, ::2], topk)
    # a row long enough for the radix passes by default, spanning several programs (and a part one)
    g = torch.Generator().manual_seed(3)
    wide = torch.rand(2, mk.WIDE_ROW + 1000, generator=g)
    wide[1, ::7] = 0.0
    mask, thr = mk.select_above_kth(wide, 5000)
    want = t.old_threshold(wide, 5000)
    out["wide default"] = {"threshold_bits": t.same_bits(thr, want), "mask": torch.equal(mask, wide > want)}

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(1, t.HEADS, t.GROUPS * 66, t.KEY_GROUPS * 66, generator=g) < 0.45
    mask[0, 0, 0] = False                   # an empty row
    mask[0, 0, 1] = True                    # an all-selected row
    small = torch.rand(2, 3, 4, 5, generator=g) < 0.5
    for name, m in (("lut real", mask), ("lut small", small), ("lut transposed", small.transpose(2, 3)),
                    ("lut empty", torch.zeros(1, 1, 2, 0, dtype=torch.bool))):
        lut, counts = mk.lut_from_mask(m)
        want_lut, want_counts = build_lut(m)
        out[name] = {"lut": torch.equal(lut, want_lut), "counts": torch.equal(counts, want_counts),
                     "dtypes": [str(lut.dtype), str(counts.dtype)], "contiguous": lut.is_contiguous()}
    for name, counts in (("order real", build_lut(mask)[1]), ("order ties", torch.randint(0, 3, (2, 3, 50), generator=g)),
                         ("order one", torch.tensor([4])), ("order none", torch.zeros(0))):
        counts = counts.to(torch.int32)
        got = mk.longest_first_order(counts)
        want = torch.argsort(counts.reshape(-1), descending=True, stable=True).to(torch.int32)
        out[name] = {"order": torch.equal(got, want), "dtype": str(got.dtype)}
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(CHILD, str(TESTS), timeout=600)


def test_triton_selection_gives_the_sort_threshold_and_mask_bit_for_bit(interpreted):
    cases = {k: v for k, v in interpreted.items() if k.startswith(("adversarial", "nan", "real"))}
    assert len(cases) == 16 and sum(k.endswith(" radix") for k in cases) == 8
    for name, got in cases.items():
        assert got["threshold_bits"] and got["nan"] and got["nan_bits"] and got["mask"], (name, got)
    assert interpreted["real rows"]["shapes"] == interpreted["real rows radix"]["shapes"] == [[4, 17424], [4, 1]]
    assert interpreted["wide default"] == {"threshold_bits": True, "mask": True}


def test_triton_lut_equals_build_lut_with_empty_and_full_rows(interpreted):
    for name in ("lut real", "lut small", "lut transposed", "lut empty"):
        got = interpreted[name]
        assert got["lut"] and got["counts"] and got["contiguous"], (name, got)
        assert got["dtypes"] == ["torch.int32", "torch.int32"]


def test_triton_launch_order_equals_the_stable_descending_argsort(interpreted):
    for name in ("order real", "order ties", "order one", "order none"):
        assert interpreted[name] == {"order": True, "dtype": "torch.int32"}, name


def aot_ptx(fn, pointers, scalars, constexprs, num_warps, arch):
    """triton.compile for a CUDA target on this CPU-only machine (Triton bundles ptxas); returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in pointers:
            signature[arg] = "*" + pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        else:
            assert arg in scalars, arg
            signature[arg] = "i32"
    src = ASTSource(fn=fn, signature=signature, attrs=attrs, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}).asm["ptx"]


@pytest.mark.parametrize("arch", [80, 90])
def test_mask_kernels_compile_for_ampere_and_hopper(arch):
    pytest.importorskip("triton")
    from comfyui_flashvsr.attention import mask_kernels as mk

    ptx = [
        aot_ptx(mk.select_above_kth_kernel, {"X": "fp32", "T": "fp32", "M": "u8"}, ("N", "stride_x", "stride_m", "NEED"),
                {"BLOCK": mk.SELECT_BLOCK}, mk.SELECT_WARPS, arch),
        aot_ptx(mk.radix_histogram_kernel, {"X": "fp32", "HIST": "i32", "PREFIX": "i32"}, ("N", "stride_x"),
                {"SHIFT": 16, "SPAN": mk.RADIX_SPAN, "BLOCK": mk.RADIX_BLOCK}, 8, arch),
        aot_ptx(mk.radix_pick_kernel, {"HIST": "i32", "PREFIX": "i32", "NEED": "i32", "T": "fp32"}, (), {}, 4, arch),
        aot_ptx(mk.above_threshold_kernel, {"X": "fp32", "T": "fp32", "M": "u8"}, ("N", "stride_x", "stride_m"),
                {"SPAN": mk.RADIX_SPAN, "BLOCK": mk.RADIX_BLOCK}, 8, arch),
        aot_ptx(mk.lut_rows_kernel, {"MASK": "u8", "LUT": "i32", "CNT": "i32"}, ("NK",), {"BLOCK": 512}, 2, arch),
        aot_ptx(mk.rank_longest_first_kernel, {"CNT": "i32", "ORDER": "i32"}, ("N",), {"BLOCK_I": 16, "BLOCK_J": 256}, 4, arch),
    ]
    assert all(f".target sm_{arch}" in p for p in ptx)
