"""Our Triton block-sparse kernels, run on the CPU by Triton's interpreter, and compiled ahead of
time for sm_80 / sm_90 (no GPU needed: Triton bundles ptxas) to catch Triton-version breakage.

Skipped only when triton cannot be imported. The interpreter runs in a child process because
TRITON_INTERPRET must be set before triton itself is imported (its standard library is made of
jit functions). It is float16-only here: Triton's interpreter multiplies bfloat16 ``tl.dot``
operands as raw bit patterns (triton-lang/triton#11584, "we just don't support it yet"); bfloat16
is checked on the GPU (tests/gpu/test_attention_gpu.py).
"""
import json
import pathlib
import textwrap

import pytest
from flashvsr_tests_triton_child import run_interpreted

pytest.importorskip("triton")

TESTS = pathlib.Path(__file__).resolve().parent
CONFIGS = [(64, 4, 2, False), (128, 8, 2, False), (128, 8, 2, True), (64, 8, 3, True), (64, 4, 2, True, False)]

CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers comfyui_flashvsr
    import torch
    import torch.nn.functional as F
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import BLOCK, build_lut, masked_reference, quantize_tiles_reference

    def case(seed, layout, bsz=2, heads=2, nq=2, nk=3, dim=64):
        g = torch.Generator().manual_seed(seed)
        def make(length):
            if layout == "bhld":
                return torch.randn(bsz, heads, length, dim, generator=g)
            return torch.randn(bsz, length, heads, dim, generator=g).transpose(1, 2)  # (B, L, H, D) storage
        q, k, v = make(nq * BLOCK), make(nk * BLOCK), make(nk * BLOCK)
        mask = torch.rand(bsz, heads, nq, nk, generator=g) < 0.5
        mask[0, 1, 1] = False       # an empty query block
        mask[1, 0, 0] = True
        return q.half(), k.half(), v.half(), mask

    def measure(out, ref, q):
        diff = (out.double() - ref.double()).norm() / ref.double().norm()
        cos = F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
        empty = out[0, 1, BLOCK:2 * BLOCK]
        return {"rel_l2": float(diff), "cos": float(cos), "empty_row_exact_zero": bool((empty == 0).all()),
                "dtype": str(out.dtype), "same_strides": out.stride() == q.stride(),
                "nan": bool(out.isnan().any())}

    results = {}
    for layout in ("bhld", "blhd"):
        q, k, v, mask = case(0, layout)
        lut, counts = build_lut(mask)
        ref = masked_reference(q.double(), k.double(), v.double(), mask)
        for cfg in json.loads(sys.argv[2]):
            out = tk.block_sparse_attention(q, k, v, lut, counts, tk.KernelConfig(*cfg))
            results[f"bf16 {layout} {cfg}"] = measure(out, ref, q)
    int8_configs = {"ptr64": tk.KernelConfig(64, 8, 2), "ptr128": tk.KernelConfig(128, 8, 2),
                    "tma64": tk.KernelConfig(64, 4, 2, True), "tma128": tk.KernelConfig(128, 8, 2, True)}
    for name, config in int8_configs.items():
        q, k, v, mask = case(1, "blhd")
        k = (k.float() + 4.0 * torch.randn(1, 1, 1, k.shape[-1])).half()    # a common key bias
        before = k.clone()
        lut, counts = build_lut(mask)
        ref = masked_reference(q.double(), k.double(), v.double(), mask)
        out = tk.block_sparse_attention_int8(q, k, v, lut, counts, config)
        results[f"int8 {name}"] = dict(measure(out, ref, q), k_unchanged=bool(torch.equal(k, before)))
        # a caller's key mean (the DiT's window means) instead of the computed one: any vector is exact
        hint = k.float().mean(dim=2) + 0.05
        out = tk.block_sparse_attention_int8(q, k, v, lut, counts, config, key_mean=hint)
        results[f"int8 {name} key_mean"] = measure(out, ref, q)
    # the Triton quantiser against the torch reference, on the strided (B, L, H, D) layout
    q, k, _, _ = case(2, "blhd")
    k = (k.float() + 3.0).half()
    q8, qs = quantize_tiles_reference(q, BLOCK, 64 ** -0.5 * tk.LOG2E)
    k8, ks = quantize_tiles_reference(k, 64, shift=k.float().mean(dim=2))
    tq8, tqs = tk.quantize_tiles(q, BLOCK, 64 ** -0.5 * tk.LOG2E)
    tk8, tks = tk.quantize_tiles(k, 64, 1.0, k.float().mean(dim=2))
    results["quantise"] = {
        "q_step_diff": int((tq8.int() - q8.int()).abs().max()), "k_step_diff": int((tk8.int() - k8.int()).abs().max()),
        "q_scale_rel": float(((tqs - qs).abs() / qs).max()), "k_scale_rel": float(((tks - ks).abs() / ks).max()),
        "contiguous": tq8.is_contiguous() and tk8.is_contiguous(), "dtype": str(tk8.dtype),
        "shapes": [list(tqs.shape), list(tks.shape)]}
    both = tk.quantize_q_and_k(q, k, 64, 64 ** -0.5 * tk.LOG2E, k.float().mean(dim=2))
    results["quantise"]["one_launch_equal"] = all(torch.equal(a, b) for a, b in zip(both, (tq8, tqs, tk8, tks)))
    # into a KV ring's slot: (B, L, H, D) int8 storage and a slice of a wider scale tensor
    ring = torch.zeros(2, 3 * k.shape[2], 2, 64, dtype=torch.int8)
    ring_scales = torch.zeros(2, 2, 3 * k.shape[2] // 64)
    slot = slice(k.shape[2], 2 * k.shape[2])
    tk.quantize_tiles(k, 64, 1.0, k.float().mean(dim=2), out=(ring[:, slot].transpose(1, 2), ring_scales[:, :, 6:12]))
    results["quantise"]["into_slot_equal"] = (torch.equal(ring[:, slot].transpose(1, 2), tk8)
                                              and torch.equal(ring_scales[:, :, 6:12], tks)
                                              and int(ring[:, :k.shape[2]].abs().sum()) == 0 and float(ring_scales[:, :, :6].abs().sum()) == 0)
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(CHILD, str(TESTS), json.dumps(CONFIGS), timeout=300)


@pytest.mark.parametrize("layout", ["bhld", "blhd"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "tma" * c[3] + f"N{c[0]}w{c[1]}s{c[2]}" + "-grid-order" * (len(c) > 4 and not c[4]))
def test_triton_kernel_matches_reference_and_zeroes_empty_query_blocks(interpreted, layout, config):
    got = interpreted[f"bf16 {layout} {list(config)}"]
    assert got["rel_l2"] < 2e-3               # fp16 operands, fp32 softmax (fp16 SDPA vs fp32: ~5e-4)
    assert got["empty_row_exact_zero"] and not got["nan"]
    assert got["dtype"] == "torch.float16" and got["same_strides"]


@pytest.mark.parametrize("config", ["ptr64", "ptr128", "tma64", "tma128"])
def test_int8_kernel_is_as_accurate_as_sage_and_leaves_k_untouched(interpreted, config):
    got = interpreted[f"int8 {config}"]
    assert got["cos"] >= 0.999 and got["rel_l2"] <= 0.03          # the sage thresholds
    assert got["k_unchanged"] and got["empty_row_exact_zero"] and not got["nan"]
    assert got["dtype"] == "torch.float16" and got["same_strides"]
    hinted = interpreted[f"int8 {config} key_mean"]
    assert hinted["cos"] >= 0.999 and hinted["rel_l2"] <= 0.03 and hinted["empty_row_exact_zero"]


def test_triton_quantiser_matches_the_torch_reference(interpreted):
    got = interpreted["quantise"]
    # same scales; values may differ by one step only where fp16 input rounding or a .5 tie lands
    assert got["q_step_diff"] <= 1 and got["k_step_diff"] <= 1
    assert got["q_scale_rel"] < 2e-3 and got["k_scale_rel"] < 2e-3
    assert got["contiguous"] and got["dtype"] == "torch.int8"
    assert got["shapes"] == [[2, 2, 2], [2, 2, 6]]
    assert got["one_launch_equal"]          # Q and K in one launch: the same bytes as two
    assert got["into_slot_equal"]           # written into a ring slot's strided views, nothing else touched


def test_int8_quantisation_is_per_block_and_out_of_place():
    import torch

    from comfyui_flashvsr.attention.block_sparse import quantize_tiles_reference

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 256, 64, generator=g), torch.randn(2, 2, 384, 64, generator=g) + 3.0
    k_before = k.clone()
    q8, q_scales = quantize_tiles_reference(q, 128, 64 ** -0.5 * 1.4426950408889634)
    k8, k_scales = quantize_tiles_reference(k, 64, shift=k.mean(dim=2))
    assert torch.equal(k, k_before)
    assert q8.dtype == k8.dtype == torch.int8 and int(q8.abs().max()) == 127
    assert q_scales.shape == (2, 2, 2) and k_scales.shape == (2, 2, 6)
    centred = k - k.mean(dim=2, keepdim=True)
    restored = (k8.float().reshape(2, 2, 6, 64 * 64) * k_scales[..., None]).reshape(k.shape)
    assert float((restored - centred).abs().max()) <= float(k_scales.max()) / 2 + 1e-6   # half a step


def aot_compile(kernels, name, arch, config, dtype="bf16", v_int8=False):
    """triton.compile for a CUDA target on this CPU-only machine; returns the PTX. ``v_int8``: the
    INT8 kernel reading int8 values (the KV cache's, UpscaleConfig.kv_int8_values)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernels, name)
    pointers = {"Q": dtype, "K": dtype, "V": dtype, "O": dtype, "LUT": "i32", "CNT": "i32", "ORDER": "i32",
                "Q8": "i8", "K8": "i8", "QS": "fp32", "KS": "fp32", "VS": "fp32"}
    if v_int8:
        pointers["V"] = "i8"
    rows = {"q_desc": 128, "o_desc": 128, "k_desc": config.block_n, "v_desc": config.block_n}
    # the INT8 kernel's Q and K descriptors address the quantised int8 copies
    desc_dtype = {"q_desc": "i8", "k_desc": "i8"} if "int8" in name else {}
    if v_int8:
        desc_dtype["v_desc"] = "i8"
    constexprs = {"HEAD_DIM": 128, "BLOCK_N": config.block_n, "MBLOCK": 128}
    if "int8" in name:
        constexprs["V_INT8"] = v_int8
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in rows:
            signature[arg] = f"tensordesc<{desc_dtype.get(arg, dtype)}[1,1,{rows[arg]},128]>"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
            attrs[(i,)] = [["tt.divisibility", 16]]            # as the JIT specialises torch tensors
        elif arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = "fp32" if arg == "qk_scale" else "i32"
    src = ASTSource(fn=fn, signature=signature, attrs=attrs, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    return compiled.asm["ptx"]


@pytest.mark.parametrize("name, arch, instruction", [
    ("_bsa_fwd", 90, "wgmma"), ("_bsa_fwd", 80, "mma.sync"),
    ("_bsa_fwd_int8", 90, "wgmma"), ("_bsa_fwd_int8", 80, "mma.sync"),
    ("_bsa_fwd_tma", 90, "cp.async.bulk.tensor"),
    ("_bsa_fwd_int8_tma", 90, "cp.async.bulk.tensor"), ("_bsa_fwd_int8_tma", 90, "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8"),
])
def test_kernels_compile_for_ampere_and_hopper_with_tensor_core_instructions(name, arch, instruction):
    from comfyui_flashvsr.attention import triton_kernels as tk

    config = tk.default_config((arch // 10, arch % 10), int8=name.endswith("int8"))
    assert instruction in aot_compile(tk, name, arch, config)


@pytest.mark.parametrize("name, arch", [("_bsa_fwd_int8", 90), ("_bsa_fwd_int8", 80), ("_bsa_fwd_int8_tma", 90)])
def test_int8_kernel_reading_int8_values_compiles_and_still_runs_int8_qk_on_tensor_cores(name, arch):
    from comfyui_flashvsr.attention import triton_kernels as tk

    ptx = aot_compile(tk, name, arch, tk.default_config((arch // 10, arch % 10), int8=True), v_int8=True)
    assert ("wgmma" if arch == 90 else "mma.sync") in ptx
    assert "cvt.rn.f32.s32" in ptx or "cvt.rn.f32.s8" in ptx or "cvt.rn.bf16" in ptx   # int8 values turned into floats


@pytest.mark.parametrize("arch", [80, 90])
def test_quantiser_compiles_for_ampere_and_hopper(arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from comfyui_flashvsr.attention import triton_kernels as tk

    kinds = {"X": "*bf16", "Q": "*bf16", "K": "*bf16", "MEAN": "*fp32", "Y": "*i8", "Q8": "*i8", "K8": "*i8",
             "S": "*fp32", "QS": "*fp32", "KS": "*fp32", "multiplier": "fp32", "q_multiplier": "fp32"}
    constexprs = {"ROWS": 64, "HEAD_DIM": 128, "CENTRE": True, "Q_ROWS": 128, "K_ROWS": 64}
    for fn in (tk.quantize_tiles_kernel, tk.quantize_q_and_k_kernel, tk.quantize_value_tiles_kernel):
        signature = {a: kinds.get(a, "constexpr" if a in constexprs else "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature, constexprs={a: constexprs[a] for a in fn.arg_names if a in constexprs})
        ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).asm["ptx"]
        # reads bf16, rounds (floor of x + 0.5), writes bytes and one float32 scale per tile
        assert "cvt.f32.bf16" in ptx and "cvt.rmi" in ptx and "st.global.b8" in ptx and "st.global.b32" in ptx
