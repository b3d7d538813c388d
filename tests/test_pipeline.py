"""Behaviour of the public pipeline on small random networks (CPU, float32)."""
from __future__ import annotations

import pytest
import torch

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.engine.noise import latent_noise
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.flashvsr.engine.schedule import plan_frames


@pytest.fixture(scope="module")
def tiny():
    return FlashVSR.random(mode="tiny", version="v1.1", device="cpu", dtype=torch.float32, size="micro", seed=1)


@pytest.fixture(scope="module")
def tiny_long():
    return FlashVSR.random(mode="tiny-long", version="v1.1", device="cpu", dtype=torch.float32, size="micro", seed=1)


def clip(n, h=20, w=24, seed=0):
    return torch.rand((n, h, w, 3), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 4, 21, 26, 30])
def test_output_frame_count_equals_input(tiny, n):
    out = tiny.upscale(clip(n)).frames
    assert out.shape == (n, 80, 96, 3)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_output_size_is_exactly_scale_times_input_for_odd_sizes(tiny):
    out = tiny.upscale(clip(3, h=17, w=35), UpscaleConfig(scale=3.5)).frames
    assert out.shape == (3, round(17 * 3.5), round(35 * 3.5), 3)


def test_tiny_long_gives_the_same_frames_as_tiny(tiny, tiny_long):
    frames = clip(30)
    assert torch.equal(tiny.upscale(frames).frames, tiny_long.upscale(frames).frames)


def test_decoder_passes_of_any_size_give_the_same_frames(tiny):
    from comfyui_flashvsr.flashvsr.engine.decoders import TinyDecoder
    from comfyui_flashvsr.models.tcdecoder import TCDecoderPasses
    g = torch.Generator().manual_seed(3)
    latents, cond = torch.randn(1, 16, 6, 4, 4, generator=g), torch.rand(1, 3, 21, 32, 32, generator=g) * 2 - 1
    outs = []
    for per_pass, tail in ((6, 24), (1, 1), (2, 8), (2, 3), (1, 2)):
        dec = TinyDecoder(tiny.decoder, TCDecoderPasses(latents=per_pass, tail_frames=tail))
        state = dec.new_state()
        # a second chunk too: the MemBlock memory must carry over between chunks whatever the cut
        outs.append(torch.cat([dec.decode(latents, cond, state), dec.decode(latents[:, :, :2], cond[:, :, :8], state)], 2))
    assert outs[0].shape == (1, 3, 29, 32, 32)
    for out in outs[1:]:
        assert (out - outs[0]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="passes must be >= 1"):
        TCDecoderPasses(latents=0)


def test_streaming_input_gives_the_same_frames_as_a_tensor(tiny):
    frames = clip(27)
    whole = tiny.upscale(frames).frames
    streamed = torch.cat(list(tiny.upscale_stream(iter(frames))), dim=0)
    assert streamed.shape[0] == 27
    assert torch.equal(streamed, (whole * 255).round().to(torch.uint8))


def test_noise_of_a_latent_frame_depends_only_on_seed_and_index():
    whole = latent_noise(7, 0, 10, 4, 6, device="cpu", dtype=torch.float32)
    part = latent_noise(7, 4, 3, 4, 6, device="cpu", dtype=torch.float32)
    assert torch.equal(whole[:, :, 4:7], part)
    assert not torch.equal(latent_noise(8, 4, 3, 4, 6, device="cpu", dtype=torch.float32), part)


def test_seed_changes_the_output(tiny):
    frames = clip(5)
    a = tiny.upscale(frames, UpscaleConfig(seed=1)).frames
    b = tiny.upscale(frames, UpscaleConfig(seed=2)).frames
    assert not torch.equal(a, b)
    assert torch.equal(a, tiny.upscale(frames, UpscaleConfig(seed=1)).frames)


def test_cancelled_run_leaves_the_model_usable(tiny):
    frames = clip(30)
    expected = tiny.upscale(frames).frames

    class Stop(Exception):
        pass

    def cancel(done, total):
        if done == 1:
            raise Stop()

    with pytest.raises(Stop):
        tiny.upscale(frames, on_progress=cancel)
    assert torch.equal(tiny.upscale(frames).frames, expected)


def test_progress_reports_every_chunk(tiny):
    seen = []
    tiny.upscale(clip(30), on_progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]      # 30 frames: outputs 0-20, 21-28, 29


def test_official_mode_reproduces_driver_frame_count(tiny):
    out = tiny.upscale(clip(33, h=32, w=32), UpscaleConfig(preprocess="official")).frames
    assert out.shape == (plan_frames(33, official=True).output_frames, 128, 128, 3)
    assert out.shape[0] == 29


def test_official_mode_refuses_short_clips(tiny):
    with pytest.raises(ValueError, match="at least 21 input frames"):
        tiny.upscale(clip(20, h=32, w=32), UpscaleConfig(preprocess="official"))


def test_spatial_tiling_keeps_size_and_one_tile_equals_untiled(tiny):
    frames = clip(5, h=72, w=72)           # 288x288 output -> 384x384 model frame
    plain = tiny.upscale(frames).frames
    one_tile = tiny.upscale(frames, UpscaleConfig(tile_size=384)).frames
    assert torch.equal(one_tile, plain)
    tiled = tiny.upscale(frames, UpscaleConfig(tile_size=256, tile_overlap=64)).frames
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()


@pytest.mark.parametrize("bad, message", [
    (torch.rand(4, 8, 8), "expected frames as an"),
    (torch.rand(0, 8, 8, 3), "no input frames"),
    (torch.rand(2, 8, 8, 5), "1, 3 or 4 channels"),
])
def test_bad_frames_get_a_clear_error(tiny, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny.upscale(bad)


def test_bad_options_get_a_clear_error():
    with pytest.raises(ValueError, match="scale must be between 1 and 4"):
        UpscaleConfig(scale=5)
    with pytest.raises(ValueError, match="tile_size is 200; use 0 .off. or a multiple of 128"):
        UpscaleConfig(tile_size=200)
    with pytest.raises(ValueError, match="color_fix"):
        UpscaleConfig(color_fix="lab")


def test_rgba_and_gray_inputs_are_accepted(tiny):
    assert tiny.upscale(clip(2).repeat(1, 1, 1, 1)[..., :1]).frames.shape == (2, 80, 96, 3)
    rgba = torch.cat([clip(2), torch.ones(2, 20, 24, 1)], dim=-1)
    assert tiny.upscale(rgba).frames.shape == (2, 80, 96, 3)
