"""The TCDecoder's fast tail: nearest 2x upsampling folded into the following 3x3 convolution."""
import pytest
import torch
import torch.nn as nn

from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig

CFG = TCDecoderConfig(channels=(32, 24, 16, 12), latent_channels=20)


def net(dtype=torch.float32):
    torch.manual_seed(0)
    return TCDecoder(CFG).to(dtype)


@pytest.mark.parametrize("h, w", [(7, 9), (1, 1), (4, 6)])
def test_subpixel_tail_equals_upsample_then_convolutions(h, w):
    dec = net(torch.float64)
    x = torch.randn(3, CFG.channels[2], h, w, dtype=torch.float64)
    ref = dec.run_tail(x)
    got = dec.run_tail_subpixel(x, dec.fast_tail_weights())
    assert got.shape == ref.shape == (3, 3, 2 * h, 2 * w)
    assert got.is_contiguous(memory_format=torch.channels_last)
    # the merged weights are summed in float32: agreement to float32 rounding, borders included
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_subpixel_tail_in_bf16_stays_within_bf16_rounding_of_the_reference():
    dec32 = net(torch.float32)
    dec = net(torch.bfloat16)
    x = torch.randn(2, CFG.channels[2], 8, 10).bfloat16()
    exact = dec32.run_tail(x.float())
    plain = dec.run_tail(x).float()
    fast = dec.run_tail_subpixel(x, dec.fast_tail_weights()).float()
    err_plain = float((plain - exact).norm() / exact.norm())
    err_fast = float((fast - exact).norm() / exact.norm())
    assert err_fast < 2e-2 and err_fast < 2 * err_plain + 1e-3


def test_subpixel_weight_merges_rows_and_columns_per_phase():
    dec = net(torch.float64)
    w = dec.decoder[dec.tail_start + 2].weight
    sub = dec.subpixel_weight().view(2, 2, *w.shape[:2], 2, 2)         # (a, b, out, in, 2, 2)
    assert torch.allclose(sub[0, 0, ..., 0, 0], w[..., 0, 0].float().double(), atol=1e-6)
    assert torch.allclose(sub[1, 1, ..., 1, 1], w[..., 2, 2].float().double(), atol=1e-6)
    assert torch.allclose(sub[0, 1, ..., 1, 0], (w[..., 1, 0] + w[..., 2, 0] + w[..., 1, 1] + w[..., 2, 1]), atol=1e-6)
    assert torch.allclose(sub.sum((0, 1, 4, 5)), 4 * w.sum((2, 3)), atol=1e-5)   # each tap in every phase once


def test_subpixel_tail_refuses_a_tail_it_cannot_fold():
    dec = net()
    dec.decoder[dec.tail_start] = nn.Identity()
    with pytest.raises(ValueError, match="nearest 2x upsampling"):
        dec.run_tail_subpixel(torch.zeros(1, CFG.channels[2], 2, 2), dec.fast_tail_weights())
