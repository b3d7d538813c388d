"""Wan 2.1 VAE decoder: weight subset, config inference, streaming, per-latent reference, tiling.

Tiny widths (base 8) and 4x6 latents keep every test on the CPU in well under a second.
"""
import pytest
import torch
import torch.nn.functional as F

from comfyui_flashvsr.models.wan_vae import (
    WAN_VAE_DECODER_PARAMS, WAN_VAE_DECODER_TENSORS, VAETiling, WanVAECheckpointError, WanVAEConfig,
    WanVAEDecodeOptions, WanVAEDecoder, decoder_state_dict)
from comfyui_flashvsr.models.wan_vae_blocks import FIRST_FRAME_DONE, Resample, StepRun, upsample_nearest2x

TINY = WanVAEConfig(base_dim=8)
FP32_TOL = dict(rtol=0, atol=2e-5)  # fp32 re-association of the same sums; outputs are O(1)


def random_decoder(config=TINY, seed=0, gain=1.0):
    """Decoder with seeded weights of unit-variance activations (gamma near 1, weights 1/sqrt(fan_in))."""
    torch.manual_seed(seed)
    model = WanVAEDecoder(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 16
                p.copy_(gain * torch.randn_like(p) / fan_in**0.5)
    return model


def latents(t, h=4, w=6, seed=1):
    return torch.randn(1, 16, t, h, w, generator=torch.Generator().manual_seed(seed))


def checkpoint_like(model):
    """What Wan2.1_VAE.pth holds: decoder tensors plus encoder-only ones."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["encoder.conv1.weight"] = torch.zeros(8, 3, 3, 3, 3)
    sd["encoder.head.2.bias"] = torch.zeros(32)
    sd["conv1.weight"] = torch.zeros(32, 32, 1, 1, 1)
    sd["conv1.bias"] = torch.zeros(32)
    return sd


# --- weights and config ------------------------------------------------------------------------

def test_full_size_decoder_has_the_checkpoint_tensor_names_and_counts():
    with torch.device("meta"):
        sd = WanVAEDecoder().state_dict()
    assert len(sd) == WAN_VAE_DECODER_TENSORS
    assert sum(t.numel() for t in sd.values()) == WAN_VAE_DECODER_PARAMS
    # the official Wan2.1_VAE.pth decoder shapes (docs/model.md §10.2)
    assert sd["conv2.weight"].shape == (16, 16, 1, 1, 1)
    assert sd["decoder.conv1.weight"].shape == (384, 16, 3, 3, 3)
    assert sd["decoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert sd["decoder.middle.1.to_qkv.weight"].shape == (1152, 384, 1, 1)
    assert sd["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert sd["decoder.upsamples.3.resample.1.weight"].shape == (192, 384, 3, 3)
    assert sd["decoder.upsamples.4.shortcut.weight"].shape == (384, 192, 1, 1, 1)
    assert "decoder.upsamples.11.time_conv.weight" not in sd
    assert sd["decoder.upsamples.11.resample.1.weight"].shape == (96, 192, 3, 3)
    assert sd["decoder.head.0.gamma"].shape == (96, 1, 1, 1)
    assert sd["decoder.head.2.weight"].shape == (3, 96, 3, 3, 3)


@pytest.mark.parametrize("config", [
    WanVAEConfig(),
    WanVAEConfig(base_dim=8),
    WanVAEConfig(base_dim=16, num_res_blocks=1),
    WanVAEConfig(base_dim=8, dim_mult=(1, 2, 2, 4), temporal_upsample=(True, False, False)),
])
def test_config_is_inferred_from_state_dict_shapes(config):
    with torch.device("meta"):
        sd = WanVAEDecoder(config).state_dict()
    assert WanVAEConfig.from_state_dict(sd) == config


def test_config_inference_names_the_inconsistent_key():
    sd = random_decoder().state_dict()
    sd["decoder.conv1.weight"] = torch.zeros(32, 12, 3, 3, 3)
    with pytest.raises(WanVAECheckpointError, match=r"decoder\.conv1\.weight has shape \(32, 12"):
        WanVAEConfig.from_state_dict(sd)
    sd = random_decoder().state_dict()
    del sd["decoder.upsamples.7.resample.1.weight"]
    with pytest.raises(WanVAECheckpointError, match=r"decoder\.upsamples\.7 has neither"):
        WanVAEConfig.from_state_dict(sd)


def test_loader_drops_encoder_keys_and_accepts_model_prefix_and_model_state():
    model = random_decoder()
    raw = checkpoint_like(model)
    want = model.state_dict()
    for variant in (raw, {"model." + k: v for k, v in raw.items()}, {"model_state": raw}):
        sd = decoder_state_dict(variant)
        assert sd.keys() == want.keys()
        assert all(torch.equal(sd[k], want[k]) for k in want)


def test_loader_names_missing_unexpected_and_wrong_shape_keys():
    raw = checkpoint_like(random_decoder())
    del raw["decoder.head.2.bias"]
    raw["decoder.middle.1.extra"] = torch.zeros(1)
    raw["decoder.middle.0.residual.0.gamma"] = torch.ones(32, 1, 1)
    with pytest.raises(WanVAECheckpointError) as err:
        decoder_state_dict(raw)
    msg = str(err.value)
    assert "1 missing ['decoder.head.2.bias']" in msg
    assert "1 unexpected ['decoder.middle.1.extra']" in msg
    assert "decoder.middle.0.residual.0.gamma: file (32, 1, 1) vs model (32, 1, 1, 1)" in msg


def test_loader_rejects_a_non_wan21_file_with_a_hint():
    with pytest.raises(WanVAECheckpointError, match=r"conv2\.weight is missing; is this the Wan 2\.1 VAE"):
        decoder_state_dict({"decoder.conv1.weight": torch.zeros(1)})


def test_from_state_dict_loads_weights_and_casts():
    model = random_decoder()
    loaded = WanVAEDecoder.from_state_dict(checkpoint_like(model), dtype=torch.float32)
    assert loaded.config == TINY
    z = latents(2)
    torch.testing.assert_close(loaded.decode(z), model.decode(z), rtol=0, atol=0)
    assert WanVAEDecoder.from_state_dict(checkpoint_like(model)).conv2.weight.dtype == torch.bfloat16


# --- decoding rules ----------------------------------------------------------------------------

@pytest.mark.parametrize("t", [1, 2, 3, 5])
def test_whole_decode_gives_one_plus_four_frames_per_later_latent(t):
    out = random_decoder().decode(latents(t))
    assert out.shape == (1, 3, 1 + 4 * (t - 1), 32, 48)


def test_first_latent_gives_one_frame_and_each_later_latent_four():
    model = random_decoder()
    state = model.new_state()
    counts = [model.decode_chunk(z, state).shape[2] for z in latents(4).split(1, dim=2)]
    assert counts == [1, 4, 4, 4]


def test_temporal_upsampler_passes_first_frame_and_zero_pads_the_second():
    """Independent check of the official 'Rep' rule on one Resample, with plain F.conv3d/F.conv2d."""
    torch.manual_seed(0)
    layer = Resample(4, temporal=True).eval()
    layer.time_conv.slot = 0
    frames = torch.randn(1, 4, 3, 2, 3)
    caches = [None]
    run = StepRun(torch.contiguous_format)
    with torch.no_grad():
        outs = [layer.step(frames[:, :, :1], caches, run)]
        assert caches[0] is FIRST_FRAME_DONE  # the time conv has not run yet
        outs += [layer.step(frames[:, :, i:i + 1], caches, run) for i in (1, 2)]
        assert [o.shape[2] for o in outs] == [1, 2, 2]

        def spatial(x):  # nearest x2 then the 3x3 conv, per frame
            up = x.repeat_interleave(2, dim=-1).repeat_interleave(2, dim=-2)
            return F.conv2d(up, layer.resample[1].weight, layer.resample[1].bias, padding=1)

        torch.testing.assert_close(outs[0][:, :, 0], spatial(frames[:, :, 0]), **FP32_TOL)
        # frames 1.. form their own causal sequence, preceded by two zero frames (not by frame 0)
        seq = torch.cat([torch.zeros(1, 4, 2, 2, 3), frames[:, :, 1:]], dim=2)
        tc = F.conv3d(seq, layer.time_conv.weight, layer.time_conv.bias)  # (1, 8, 2, 2, 3)
        for i in (1, 2):
            for half in (0, 1):
                want = spatial(tc[:, 4 * half:4 * half + 4, i - 1])
                torch.testing.assert_close(outs[i][:, :, half], want, **FP32_TOL)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nearest_upsample_is_bit_identical_to_interpolate_nearest_exact(fmt, dtype):
    x = torch.randn(3, 5, 4, 7).to(dtype).contiguous(memory_format=fmt)
    out = upsample_nearest2x(x, fmt)
    assert out.is_contiguous(memory_format=fmt)
    # the official path: nearest-exact in fp32, cast back
    assert torch.equal(out, F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(dtype))


def test_compiled_norms_are_refused_off_cuda():
    model = random_decoder()
    with pytest.raises(ValueError, match="compiled_norms is for CUDA latents"):
        model.decode(latents(1), WanVAEDecodeOptions(compiled_norms=True))


def test_chunked_stream_equals_whole_decode():
    model = random_decoder()
    z = latents(10)
    whole = model.decode(z)
    state = model.new_state()
    parts = [model.decode_chunk(c, state) for c in z.split([6, 2, 2], dim=2)]
    assert [p.shape[2] for p in parts] == [21, 8, 8]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, **FP32_TOL)


def test_batched_chunk_equals_per_latent_reference():
    model = random_decoder()
    z = latents(5)
    state_a, state_b = model.new_state(), model.new_state()
    for chunk in z.split([3, 2], dim=2):
        torch.testing.assert_close(model.decode_chunk(chunk, state_a),
                                   model.decode_chunk(chunk, state_b, per_latent=True), **FP32_TOL)


def test_time_split_under_a_small_pass_budget_equals_one_pass():
    model = random_decoder()
    z = latents(4)
    tight = WanVAEDecodeOptions(max_pass_elements=3 * 8 * 32 * 48)
    torch.testing.assert_close(model.decode(z, tight), model.decode(z), **FP32_TOL)


def test_channels_last_run_equals_contiguous_run():
    model = random_decoder()
    z = latents(3)
    cl = model.decode(z, WanVAEDecodeOptions(channels_last=True))
    torch.testing.assert_close(cl, model.decode(z, WanVAEDecodeOptions(channels_last=False)), **FP32_TOL)
    model.to_channels_last()
    torch.testing.assert_close(model.decode(z, WanVAEDecodeOptions(channels_last=True)), cl, **FP32_TOL)


def test_output_is_clamped_to_unit_range():
    model = random_decoder(gain=3.0)
    out = model.decode(latents(2))
    assert out.min() == -1 and out.max() == 1  # saturates at both ends, never beyond


def test_bf16_decode_is_finite_and_near_fp32():
    model = random_decoder()
    z = latents(3)
    ref = model.decode(z)
    out = model.to(torch.bfloat16).decode(z)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.05


def test_chunk_with_wrong_channels_or_changed_size_is_refused():
    model = random_decoder()
    state = model.new_state()
    with pytest.raises(ValueError, match=r"latents must be \(B, 16, t >= 1, h, w\), got \(1, 4, 2, 4, 6\)"):
        model.decode_chunk(torch.zeros(1, 4, 2, 4, 6), state)
    model.decode_chunk(latents(1), state)
    with pytest.raises(ValueError, match=r"chunk latents are \(4, 8\) but this stream started at \(4, 6\)"):
        model.decode_chunk(latents(1, w=8), state)


# --- tiling ------------------------------------------------------------------------------------

def test_tile_boxes_follow_the_official_start_rule():
    # starts every 2 rows; the start 6 is dropped because the tile at 4 already reaches row 8
    assert VAETiling(tile=(4, 5), stride=(2, 5)).boxes(8, 5) == [(0, 4, 0, 5), (2, 6, 0, 5), (4, 8, 0, 5)]
    assert VAETiling(tile=(3, 3), stride=(2, 2)).boxes(4, 2) == [(0, 3, 0, 2), (2, 4, 0, 2)]
    with pytest.raises(ValueError, match="no gaps"):
        VAETiling(tile=(4, 4), stride=(5, 2))


def test_tile_blend_reassembles_an_image_that_every_tile_agrees_on(monkeypatch):
    """With a stand-in decoder whose output depends only on absolute position, any tiling must
    reproduce the untiled image: this pins the boxes, pixel offsets and the weight normalisation."""
    model = random_decoder()

    def position_decoder(lat, state, caches, run, per_latent):
        frames = model.output_frames(lat.shape[2], first_chunk=state.latents_done == 0)
        img = lat[:, :3, :1].repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)
        return img.expand(-1, -1, frames, -1, -1).clone()

    monkeypatch.setattr(model, "_decode_frames", position_decoder)
    h, w = 7, 11
    ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
    z = torch.zeros(1, 16, 3, h, w)
    z[:, 0], z[:, 1], z[:, 2] = ys, xs, ys * xs
    plain = model.decode(z)
    for tile, stride in [((4, 5), (2, 3)), ((3, 4), (3, 4)), ((5, 6), (1, 2))]:
        tiled = model.decode(z, WanVAEDecodeOptions(tiling=VAETiling(tile=tile, stride=stride)))
        torch.testing.assert_close(tiled, plain, rtol=0, atol=1e-6)


def test_blend_ramps_rise_linearly_over_the_overlap_on_inner_sides_only():
    from comfyui_flashvsr.models.wan_vae import blend_ramp
    inner_start = blend_ramp(8, 4, at_start=False, at_end=True, device="cpu")
    assert inner_start.tolist() == [0.25, 0.5, 0.75, 1, 1, 1, 1, 1]
    both = blend_ramp(8, 4, at_start=False, at_end=False, device="cpu")
    assert both.tolist() == [0.25, 0.5, 0.75, 1, 1, 0.75, 0.5, 0.25]
    assert blend_ramp(5, 4, at_start=True, at_end=True, device="cpu").tolist() == [1] * 5


def test_tiled_decode_with_one_covering_tile_equals_untiled_exactly():
    model = random_decoder()
    z = latents(3)
    tiled = model.decode(z, WanVAEDecodeOptions(tiling=VAETiling(tile=(60, 104), stride=(30, 52))))
    assert torch.equal(tiled, model.decode(z))


def test_tiled_decode_is_close_to_untiled_and_streams():
    model = random_decoder()
    z = latents(6, h=6, w=8)
    tiling = WanVAEDecodeOptions(tiling=VAETiling(tile=(4, 6), stride=(2, 3)))
    whole_tiled = model.decode(z, tiling)
    diff = (whole_tiled - model.decode(z)).abs()
    # Measured 0.088 mean / 0.93 max (24 dB): random tiny weights see the whole 6x8 latent, so tile
    # borders matter far more than with trained weights and 60x104 tiles.
    assert diff.mean() < 0.15
    state = model.new_state(tiling)
    parts = [model.decode_chunk(c, state) for c in z.split([4, 2], dim=2)]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole_tiled, **FP32_TOL)
