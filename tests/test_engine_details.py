"""Engine details that the fixtures do not reach: long clips, colour fixes, schedule, error paths."""
from __future__ import annotations

import pytest
import torch

from comfyui_flashvsr.attention import AttentionDispatcher
from comfyui_flashvsr.flashvsr import pipeline as pipeline_module
from comfyui_flashvsr.flashvsr.engine.color import adain, color_fix, wavelet
from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.flashvsr.engine.schedule import chunk, plan_frames
from comfyui_flashvsr.models.dit import DiTStreamState, SparseParams, rope_angles
from comfyui_flashvsr.models.lcsa import local_block_mask


def test_rope_is_computed_past_the_official_4093_frame_table():
    pos = torch.tensor([4200, 4201])
    angles = rope_angles(128, pos, 2, 3)
    # temporal axis: the first 22 complex pairs, frequency 10000^(-2j/44)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 44, 2).double() / 44))
    expected = torch.polar(torch.ones(22, dtype=torch.float64), 4201 * inv)
    assert torch.equal(angles[6, 0, :22], expected)      # token 6 = second frame, row 0, col 0


def test_dit_runs_a_chunk_at_frame_16800():
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    state = DiTStreamState(chunk_index=4198)             # temporal positions 8400, 8401
    x = torch.randn(1, 16, 2, 16, 16)
    out = pipe.dit.forward_chunk(x, None, pipe.consts, state, SparseParams(2.0, 3, 11),
                                 AttentionDispatcher().session("disable"))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_chunk_schedule_covers_every_model_frame_once():
    plan = plan_frames(203, official=False)
    covered = []
    for k in range(plan.chunks):
        ck = chunk(k)
        covered += list(range(ck.out_start, ck.out_end))
        assert ck.lq_end == ck.out_end + 4            # four frames of look-ahead
    assert covered == list(range(plan.model_frames - 4))
    assert plan.model_frames - 4 >= 203


def test_local_window_is_not_clamped_at_the_border():
    m = local_block_mask(1, 12, 11)
    assert m[0].sum().item() == 6          # column 0 sees columns 0..5 only
    assert m[6].sum().item() == 11


def test_adain_matches_the_reference_statistics():
    g = torch.Generator().manual_seed(0)
    hq, lq = torch.randn(2, 3, 8, 8, generator=g) * 3 + 1, torch.randn(2, 3, 8, 8, generator=g) * 0.5
    out = adain(hq, lq)
    assert torch.allclose(out.mean((2, 3)), lq.mean((2, 3)), atol=1e-5)
    std_out = out.var((2, 3), unbiased=False).sqrt()
    std_lq = (lq.var((2, 3), unbiased=False) + 1e-5).sqrt()
    std_hq = (hq.var((2, 3), unbiased=False) + 1e-5).sqrt()
    expected = hq.var((2, 3), unbiased=False).sqrt() / std_hq * std_lq
    assert torch.allclose(std_out, expected, atol=1e-5)


def test_wavelet_takes_low_frequencies_from_lq_and_details_from_hq():
    hq = torch.zeros(1, 3, 32, 32)
    hq[..., ::2, ::2] = 0.5                       # pure high frequency around a 0.125 mean
    lq = torch.full((1, 3, 32, 32), -0.4)        # flat colour
    out = wavelet(hq, lq)
    assert abs(out.mean().item() - (-0.4)) < 0.02
    assert (out.max() - out.min()).item() > 0.3


def test_none_colour_fix_returns_frames_unchanged_and_others_clamp():
    hq = torch.randn(2, 3, 8, 8) * 5
    assert color_fix(hq, hq, "none") is hq
    for method in ("adain", "wavelet"):
        out = color_fix(hq, torch.rand(2, 3, 8, 8), method)
        assert out.min() >= -1 and out.max() <= 1


def test_out_of_gpu_memory_is_reported_with_what_to_do(monkeypatch):
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        yield

    monkeypatch.setattr(pipeline_module, "run_stream", boom)
    with pytest.raises(RuntimeError, match="out of GPU memory.*tiny-long.*tile_size"):
        pipe.upscale(torch.rand(3, 16, 16, 3))



def test_fast_dit_step_keeps_the_tanh_gelu_off_cuda():
    # torch's CPU _addmm_activation applies the erf GELU; the fast step must not use it there
    from comfyui_flashvsr.models import dit_ops

    g = torch.Generator().manual_seed(0)
    dim, ffn = 16, 40
    x, o, ow, ob, shift, scale, gate, f0w, f0b, f2w, f2b = (
        torch.randn(s, generator=g) for s in ((1, 8, dim), (1, 8, dim), (dim, dim), (dim,), (1, 1, dim),
                                              (1, 1, dim), (1, 1, dim), (ffn, dim), (ffn,), (dim, ffn), (dim,)))
    args = (x, o, dit_ops.Affine(ow, ob), (shift, scale, gate), dit_ops.Affine(f0w, f0b), dit_ops.Affine(f2w, f2b))
    assert torch.equal(dit_ops.FAST.post_cross_attention(*args), dit_ops.post_cross_attention(*args))
    erf = torch._addmm_activation(f0b, o.view(-1, dim), f0w.t(), use_gelu=True)
    tanh = torch.nn.functional.gelu(torch.nn.functional.linear(o.view(-1, dim), f0w, f0b), approximate="tanh")
    assert not torch.allclose(erf, tanh, atol=1e-6)            # the trap is real on this torch


@pytest.mark.parametrize("order, groups, expect_slots", [
    ([], 3, [0, 1, 2]),            # chunk 0: three adjacent free slots
    ([0, 1, 2], 1, [3]),           # a steady chunk: one free slot
    ([1, 2], 2, [0, 3]),           # free slots apart: the indexed path
])
def test_kv_ring_puts_new_groups_into_free_slots(order, groups, expect_slots):
    from comfyui_flashvsr.models.dit import KVRing

    s1, c = 2, 4
    ring = KVRing(torch.zeros(4 * s1, 3, c), torch.zeros(4 * s1, 3, c), torch.zeros(4 * s1, c), list(order))
    k = torch.arange(groups * s1 * 3 * c, dtype=torch.float32).view(groups * s1, 3, c) + 1
    got = ring.add(k, -k, k[:, 0], s1)
    assert got == order + expect_slots
    for i, slot in enumerate(expect_slots):
        rows = slice(slot * s1, (slot + 1) * s1)
        assert torch.equal(ring.k[rows], k[i * s1:(i + 1) * s1]) and torch.equal(ring.v[rows], -k[i * s1:(i + 1) * s1])
        assert torch.equal(ring.pooled[rows], k[i * s1:(i + 1) * s1, 0])
    untouched = [s for s in range(4) if s not in expect_slots]
    assert all(float(ring.k[s * s1:(s + 1) * s1].abs().sum()) == 0 for s in untouched)


def test_float32_rope_of_the_fast_step_differs_from_float64_by_rare_single_bf16_steps():
    from comfyui_flashvsr.models import dit_ops

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1024, 1536, generator=g).bfloat16()
    angles = torch.rand(1024, 1, 64, generator=g, dtype=torch.float64) * 100
    exact = dit_ops.rope(x, angles.cos(), angles.sin(), 12)
    fast = dit_ops.rope(x, angles.cos(), angles.sin(), 12, torch.float32)
    differ = exact != fast
    assert float(differ.float().mean()) < 1e-3
    # one bf16 step at the value, or float32's error on the unit-size inputs where the sum cancels
    bound = (exact.float().abs() * 2 ** -7).clamp_min(1e-6)
    assert bool(((exact.float() - fast.float()).abs() <= bound)[differ].all())
    assert dit_ops.FAST.pre_attention is dit_ops.pre_attention_fp32_rope


def test_output_conversion_equals_the_plain_formula_bit_for_bit():
    from comfyui_flashvsr.flashvsr.engine.stream import to_unit_hwc

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        frames = (torch.randn(3, 3, 17, 23, generator=g) * 1.2).to(dtype)
        frames[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, -3.0, 3.0]).to(dtype)     # exact ends and clamping
        want = ((frames.float() + 1) * 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        got = to_unit_hwc(frames)
        assert got.is_contiguous() and got.dtype == torch.float32 and torch.equal(got, want)


def test_int8_key_ring_streams_like_the_bf16_ring_within_int8_rounding():
    from comfyui_flashvsr.attention import AttentionConfig

    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(1, 16, 6, 16, 16, generator=g)] + [torch.randn(1, 16, 2, 16, 16, generator=g) for _ in range(4)]
    outs, states = {}, {}
    for name, config in (("plain", AttentionConfig()), ("int8", AttentionConfig(sparse_int8_with_sage=True))):
        session = AttentionDispatcher(config).session("enable")
        state = DiTStreamState()
        outs[name] = [pipe.dit.forward_chunk(x, None, pipe.consts, state, SparseParams(2.0, 3, 11), session)
                      for x in chunks]
        states[name] = state
    rings = states["int8"].kv
    assert all(r.k.dtype == torch.int8 and r.key_rows == 64 for r in rings)
    assert all(r.k.dtype == torch.float32 and not r.key_rows for r in states["plain"].kv)
    first = rings[0]
    assert first.k_shift.shape == (1, pipe.dit.cfg.num_heads, 128)
    # each ring's keys dequantise to the plain ring's keys within half an int8 step per tile
    plain = states["plain"].kv[0]
    keys = first.keys(pipe.dit.cfg.num_heads).dequantize()
    ref = plain.keys(pipe.dit.cfg.num_heads)
    step = first.k_scales.repeat_interleave(64, dim=2)[..., None]
    assert bool(((keys - ref).abs() <= step / 2 + 1e-6).all())
    for a, b in zip(outs["int8"], outs["plain"]):
        assert float((a - b).norm() / b.norm()) < 2e-2


class _FakeEvent:
    """Stands in for a CUDA timing event recorded at a known time (ms)."""

    def __init__(self, t: float):
        self.t = t

    def elapsed_time(self, later: "_FakeEvent") -> float:
        return later.t - self.t


def test_steady_period_is_the_median_gap_between_dit_starts_from_chunk_2():
    from comfyui_flashvsr.flashvsr.engine.stream import steady_period_ms
    # chunk 0 (400 ms) and 1 (200 ms) are not steady; then gaps 130, 150, 140, 900 (a stall) -> 140
    times = [0, 400, 600, 730, 880, 1020, 1920]
    assert steady_period_ms([_FakeEvent(t) for t in times]) == 140
    assert steady_period_ms([_FakeEvent(t) for t in times[:4]]) == 130
    assert steady_period_ms([_FakeEvent(t) for t in times[:3]]) is None      # fewer than 4 chunks
    assert steady_period_ms([None] * 6) is None                               # CPU: no events


def test_run_stats_report_the_steady_rate_over_all_tiles():
    from comfyui_flashvsr.flashvsr.pipeline import RunStats, steady_fps
    # two tiles with a steady period of 100 ms each: 8 frames per 2 x 100 ms = 40 fps
    tile = [_FakeEvent(t) for t in (0, 300, 400, 500, 600)]
    steady = steady_fps([tile, tile])
    assert steady == pytest.approx(40.0)
    assert "steady 40.0 fps" in RunStats(10, 1.0, 0, "sdpa", 10, "tiny", "cuda", steady).summary()
    assert steady_fps([[None] * 5]) is None                                   # CPU: no events
    plain = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro").upscale(
        torch.rand(3, 32, 32, 3), UpscaleConfig(sageattention="disable"))
    assert plain.stats.steady_fps is None and "steady" not in plain.stats.summary()
