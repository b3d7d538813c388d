"""The KV cache's values in int8 (``UpscaleConfig.kv_int8_values``, issue #14 item 3): the quantiser
(Triton in the interpreter, and torch), the INT8 kernel reading int8 values, the ring keeping them,
the dispatcher's other backends dequantising them, the option ignored where the INT8 kernel does
not run, and the memory model. The interpreter runs in a child process as in
test_attention_triton.py (TRITON_INTERPRET must be set before triton is imported), float16 only.
"""
import logging
import pathlib
import textwrap

import pytest
import torch

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher
from comfyui_flashvsr.attention.block_sparse import (QuantizedValues, masked_reference,
                                                      quantize_value_tiles_reference)
from comfyui_flashvsr.flashvsr import config
from comfyui_flashvsr.flashvsr.engine import memory
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.models.dit import DiTStreamState, KVRing, SparseParams
from flashvsr_tests_triton_child import run_interpreted

TESTS = pathlib.Path(__file__).resolve().parent

CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers comfyui_flashvsr
    import torch
    import torch.nn.functional as F
    from comfyui_flashvsr.attention import triton_kernels as tk
    from comfyui_flashvsr.attention.block_sparse import (BLOCK, QuantizedKeys, QuantizedValues, build_lut,
                                                          masked_reference, quantize_value_tiles_reference)

    g = torch.Generator().manual_seed(3)
    heads, nq, nk, dim = 2, 2, 3, 64
    def make(length):            # (B, L, H, D) storage like the DiT's KV ring
        return torch.randn(1, length, heads, dim, generator=g).transpose(1, 2)
    q, k, v = make(nq * BLOCK), make(nk * BLOCK), make(nk * BLOCK)
    v = v * torch.linspace(0.2, 4.0, dim)            # channels of different ranges
    q, k, v = q.half(), k.half(), v.half()
    mask = torch.rand(1, heads, nq, nk, generator=g) < 0.6
    mask[0, 0, 0] = True
    mask[0, 1, 1] = False                            # an empty query block
    ref = masked_reference(q.double(), k.double(), v.double(), mask)
    lut, counts = build_lut(mask)

    def measure(out, ref):
        diff = (out.double() - ref.double()).norm() / ref.double().norm()
        cos = F.cosine_similarity(out.double().flatten(), ref.double().flatten(), dim=0)
        return {"rel_l2": float(diff), "cos": float(cos), "nan": bool(out.isnan().any()),
                "empty_row_exact_zero": bool((out[0, 1, BLOCK:2 * BLOCK] == 0).all()),
                "same_strides": out.stride() == q.stride()}

    results = {}
    for name, config in {"ptr64": tk.KernelConfig(64, 8, 2), "tma64": tk.KernelConfig(64, 4, 2, True),
                         "ptr128": tk.KernelConfig(128, 8, 2)}.items():
        rows = config.block_n
        # values quantised into a ring's storage: (1, L, H, D) int8, (1, H, L / rows, D) scales
        ring = torch.zeros(1, nk * BLOCK, heads, dim, dtype=torch.int8).transpose(1, 2)
        scales = torch.zeros(1, heads, nk * BLOCK // rows, dim)
        tk.quantize_value_tiles(v, rows, out=(ring, scales))
        values = QuantizedValues(ring, scales, rows, v.dtype)
        before = v.clone()
        out = tk.block_sparse_attention_int8(q, k, values, lut, counts, config)
        plain_v = tk.block_sparse_attention_int8(q, k, v, lut, counts, config)     # the same kernel, fp16 values
        results[name] = dict(measure(out, ref), v_unchanged=bool(torch.equal(v, before)),
                             plain_v=measure(plain_v, ref))
        # both from the ring: int8 keys and int8 values
        k8 = torch.zeros(1, nk * BLOCK, heads, dim, dtype=torch.int8).transpose(1, 2)
        ks = torch.zeros(1, heads, nk * BLOCK // rows)
        shift = k.float().mean(dim=2)
        tk.quantize_tiles(k, rows, 1.0, shift, out=(k8, ks))
        keys = QuantizedKeys(k8, ks, rows, k.dtype, shift=shift)
        results[name + " int8 keys"] = measure(tk.block_sparse_attention_int8(q, keys, values, lut, counts, config), ref)
    # the Triton quantiser against the torch one, into the middle slot of a wider ring
    t8, ts = quantize_value_tiles_reference(v, 64)
    ring = torch.zeros(1, 3 * v.shape[2], heads, dim, dtype=torch.int8)
    ring_scales = torch.zeros(1, heads, 3 * v.shape[2] // 64, dim)
    slot = slice(v.shape[2], 2 * v.shape[2])
    tiles = v.shape[2] // 64
    tk.quantize_value_tiles(v, 64, out=(ring[:, slot].transpose(1, 2), ring_scales[:, :, tiles:2 * tiles]))
    results["quantise"] = {
        "step_diff": int((ring[:, slot].transpose(1, 2).int() - t8.int()).abs().max()),
        "scale_rel": float(((ring_scales[:, :, tiles:2 * tiles] - ts).abs() / ts).max()),
        "others_untouched": int(ring[:, :v.shape[2]].abs().sum() + ring[:, 2 * v.shape[2]:].abs().sum()) == 0
                            and float(ring_scales[:, :, :tiles].abs().sum() + ring_scales[:, :, 2 * tiles:].abs().sum()) == 0}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_interpreted(CHILD, str(TESTS), timeout=300)


@pytest.mark.parametrize("config", ["ptr64", "tma64", "ptr128"])
def test_int8_kernel_reading_int8_values_is_as_accurate_as_sage(interpreted, config):
    got = interpreted[config]
    assert got["cos"] >= 0.999 and got["rel_l2"] <= 0.03            # the sage thresholds
    # int8 values add little to the int8 Q·K error of the same kernel with fp16 values
    assert got["rel_l2"] <= got["plain_v"]["rel_l2"] + 0.005, (got["rel_l2"], got["plain_v"]["rel_l2"])
    assert got["v_unchanged"] and got["empty_row_exact_zero"] and not got["nan"] and got["same_strides"]
    both = interpreted[config + " int8 keys"]
    assert both["cos"] >= 0.999 and both["rel_l2"] <= 0.03 and both["empty_row_exact_zero"]


def test_triton_value_quantiser_matches_torch_and_writes_only_its_slot(interpreted):
    got = interpreted["quantise"]
    assert got["step_diff"] <= 1 and got["scale_rel"] < 2e-3      # a .5 tie may round either way
    assert got["others_untouched"]


def test_value_round_trip_is_within_half_a_step_per_channel_of_each_tile():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 256, 64, generator=g) * torch.linspace(0.01, 8.0, 64)     # channel ranges differ 800x
    v8, scales = quantize_value_tiles_reference(v, 64)
    assert v8.dtype == torch.int8 and scales.shape == (1, 2, 4, 64)
    assert int(v8.abs().amax(dim=2).min()) == 127          # every channel of every tile uses the full range
    back = QuantizedValues(v8, scales, 64, torch.float32).dequantize()
    step = scales.repeat_interleave(64, dim=2)
    assert bool(((back - v).abs() <= step / 2 + 1e-6).all())
    # per channel: even the smallest channel keeps ~1/254 of its own range
    small = v[..., 0]
    assert float((back[..., 0] - small).abs().max()) <= float(small.abs().max()) / 254 + 1e-6


def test_quantized_values_stand_in_holds_no_memory():
    values = QuantizedValues(torch.zeros(1, 2, 256, 64, dtype=torch.int8), torch.ones(1, 2, 4, 64), 64,
                             torch.bfloat16)
    like = values.like()
    assert like.shape == values.shape and like.dtype == torch.bfloat16 and like.stride(-1) == 1
    assert like.untyped_storage().nbytes() == 64 * 2


def test_other_backends_dequantise_int8_values():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 64, generator=g) for n in (256, 384, 384))
    mask = torch.rand(1, 2, 2, 3, generator=g) < 0.6
    mask[0, 0, 0] = True
    values = QuantizedValues(*quantize_value_tiles_reference(v, 64), 64, torch.float32)
    want = masked_reference(q, k, values.dequantize(), mask)
    for backends in (AttentionConfig().sparse_backends, ("reference",)):        # CPU: gather, then reference
        session = AttentionDispatcher(AttentionConfig(sparse_backends=backends)).session("enable")
        got = session.block_sparse(q, k, values, mask)
        assert torch.allclose(got, want, atol=1e-5), backends


def test_ring_quantises_each_slot_of_values_once():
    s1, heads, c = 2, 2, 2 * 64
    calls = []

    def quantize_values(values, rows, out):
        calls.append(values.shape[2])
        v8, scales = quantize_value_tiles_reference(values, rows)
        out[0].copy_(v8)
        out[1].copy_(scales)

    g = torch.Generator().manual_seed(2)
    k_w = torch.randn(3 * s1, 128, c, generator=g)
    ring = KVRing.allocate(k_w, k_w.mean(1), s1, kv_groups=3, heads=heads, value_rows=64)
    assert ring.v.dtype == torch.int8 and ring.k.dtype == torch.float32
    assert ring.v_scales.shape == (1, heads, 4 * s1 * 128 // 64, 64)           # 4 slots
    chunks = [torch.randn(3 * s1, 128, c, generator=g)] + [torch.randn(s1, 128, c, generator=g) for _ in range(3)]
    for v_w in chunks:
        groups = ring.add(v_w * 0, v_w, v_w.mean(1), s1, heads, quantize_values=quantize_values)
        ring.evict(groups, 3)
    assert calls == [s1 * 128] * 6          # each group's values once, as they enter (3 + 1 + 1 + 1)
    # the slot of the last group holds its values to within half a step
    values = ring.values(heads)
    assert isinstance(values, QuantizedValues) and values.dtype == torch.float32
    last = groups[-1]
    rows = slice(last * s1 * 128, (last + 1) * s1 * 128)
    want = chunks[-1].reshape(1, s1 * 128, heads, 64).transpose(1, 2)
    got = values.dequantize()[:, :, rows]
    assert float((got - want).abs().max()) <= float(values.scales.max()) / 2 + 1e-6


def test_dit_streams_with_int8_values_like_the_bf16_ring_within_int8_rounding():
    # The INT8 kernel does not run on the CPU; forcing it (sparse_int8_with_sage) keeps the int8 rings
    # there, and the CPU's gathered backend dequantises them: the same streaming code as on Hopper.
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 16, 6, 16, 16, generator=g)] + [torch.randn(1, 16, 2, 16, 16, generator=g) for _ in range(3)]
    outs, states = {}, {}
    forced = AttentionConfig(sparse_int8_with_sage=True)
    for name, int8_values in (("keys", False), ("both", True)):
        session = AttentionDispatcher(forced).session("enable", int8_values=int8_values)
        state = DiTStreamState()
        outs[name] = [pipe.dit.forward_chunk(x, None, pipe.consts, state, SparseParams(2.0, 3, 11), session)
                      for x in chunks]
        states[name] = state
        assert ("KV cache values in int8" in session.summary()) == int8_values
    assert all(r.v.dtype == torch.int8 and r.value_rows == 64 for r in states["both"].kv)
    assert all(r.v.dtype == torch.float32 and not r.value_rows for r in states["keys"].kv)
    for a, b in zip(outs["keys"], outs["both"]):
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.02, rel


def test_option_is_ignored_with_a_logged_reason_where_the_int8_kernel_does_not_run(caplog):
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    frames = torch.rand(9, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    base = config.UpscaleConfig(scale=2.0, compile=False)
    plain = pipe.upscale(frames, base).frames
    with caplog.at_level(logging.INFO):
        asked = pipe.upscale(frames, config.UpscaleConfig(scale=2.0, compile=False, kv_int8_values=True))
    assert torch.equal(asked.frames, plain)                         # nothing changed on the CPU
    reasons = [r.getMessage() for r in caplog.records if "kv_int8_values ignored" in r.getMessage()]
    assert len(reasons) == 1 and "here: device cpu" in reasons[0]   # once per dispatcher, not per layer
    assert "KV cache values in int8" not in asked.stats.attention
    assert pipe._memory_inputs(config.UpscaleConfig(kv_int8_values=True)).int8_values is False


def test_config_refuses_int8_values_without_enable_or_as_a_non_bool():
    with pytest.raises(ValueError, match="kv_int8_values needs sageattention='enable'"):
        config.UpscaleConfig(sageattention="disable", kv_int8_values=True)
    with pytest.raises(ValueError, match="kv_int8_values must be True or False"):
        config.UpscaleConfig(kv_int8_values="yes")
    assert config.UpscaleConfig().kv_int8_values is False           # opt-in


def test_memory_model_counts_one_byte_and_a_scale_per_64_values():
    inputs = memory.MemoryInputs(0, config.Mode.TINY, 2, True, 3)
    on = memory.MemoryInputs(0, config.Mode.TINY, 2, True, 3, int8_values=True)
    # 720p -> 4K untiled (model 2176x3840): 4 slots of 2 x 136 x 240 tokens, 30 layers, width 1536
    rows, layers, dim = 4 * 2 * 136 * 240, 30, 1536
    saved = layers * rows * dim * (2 - 1 - 4 / 64)
    assert memory.kv_cache_bytes(inputs, 2176, 3840) - memory.kv_cache_bytes(on, 2176, 3840) == saved
    assert round(memory.kv_cache_bytes(inputs, 2176, 3840) / memory.GiB, 2) == 33.79
    assert round(memory.kv_cache_bytes(on, 2176, 3840) / memory.GiB, 2) == 23.29
    # the ring allocates exactly what the model counts (a small layer, one head of 64 channels)
    k_w = torch.zeros(3 * 4, 128, 64, dtype=torch.bfloat16)
    ring = KVRing.allocate(k_w, k_w[:, 0], 4, kv_groups=3, heads=1, key_rows=64, value_rows=64)
    held = sum(t.numel() * t.element_size() for t in (ring.v, ring.v_scales))
    assert held == 4 * 4 * 128 * 64 + 4 * 4 * 128 // 64 * 64 * 4


def test_cli_flag_reaches_the_config():
    import argparse

    from comfyui_flashvsr.flashvsr.cli import bench, main

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    main._add_upscale_parser(sub)
    bench.add_parser(sub)
    args = parser.parse_args(["upscale", "in.mp4", "out.mp4", "--int8-kv-values"])
    assert main.job_from_args(args).upscale.kv_int8_values is True
    assert main.job_from_args(parser.parse_args(["upscale", "in.mp4", "out.mp4"])).upscale.kv_int8_values is False
    args = parser.parse_args(["bench", "--modes", "tiny", "--sage", "enable", "--int8-kv-values"])
    assert args.kv_int8_values is True
