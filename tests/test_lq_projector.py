"""LQ projector: the per-tap 2-D convolution path (used on CUDA) equals the 3-D convolution."""
import pytest
import torch

from comfyui_flashvsr.models.lq_projector import LQProjector, LQProjectorConfig, ProjectorState

CFG = LQProjectorConfig(hidden1=64, hidden2=96, out_dim=32)


@pytest.mark.parametrize("causal", [True, False])
def test_conv_taps_give_the_same_tokens_and_keep_the_state_dict(causal):
    torch.manual_seed(0)
    plain = LQProjector(CFG, causal=causal)
    taps = LQProjector(CFG, causal=causal)
    taps.load_state_dict(plain.state_dict())
    taps.use_conv_taps()
    sd_plain, sd_taps = plain.state_dict(), taps.state_dict()
    assert sd_plain.keys() == sd_taps.keys() and all(torch.equal(sd_plain[k], sd_taps[k]) for k in sd_plain)
    s_plain, s_taps = ProjectorState(), ProjectorState()
    outputs = 0
    for k in range(4):
        clip = torch.randn(1, 3, 1 if k == 0 else 4, 64, 96)
        a, b = plain.stream(clip, s_plain), taps.stream(clip, s_taps)
        assert (a is None) == (b is None) == (k == 0)
        if a is not None:
            outputs += 1
            assert a.shape == b.shape == (1, 4 * 6, CFG.out_dim)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert outputs == 3
    torch.testing.assert_close(s_taps.cache2, s_plain.cache2, rtol=1e-5, atol=1e-5)


def test_stacked_tap_weight_is_a_channels_last_view_of_the_parameter():
    proj = LQProjector(CFG, causal=True).use_conv_taps()
    for conv in (proj.conv1, proj.conv2):
        out_ch, in_ch, taps = conv.weight.shape[:3]
        stacked = conv.weight.permute(0, 2, 1, 3, 4).reshape(out_ch, taps * in_ch, 3, 3)
        assert stacked.data_ptr() == conv.weight.data_ptr()           # a view: no second copy of the weight
        assert stacked.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(stacked[:, in_ch:2 * in_ch], conv.weight[:, :, 1])    # channel i*C + c is tap i
