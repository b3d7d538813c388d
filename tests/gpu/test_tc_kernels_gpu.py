"""The fused ReLU + 3x3 convolution to RGB (models/tc_kernels.py) in bfloat16 on the GPU: as close
to the float32 result as cuDNN's bf16 convolution is. Skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from comfyui_flashvsr.models.tc_kernels import pack_rgb_head, relu_conv3x3_rgb  # noqa: E402


@pytest.mark.parametrize("t, h, w", [(2, 96, 176), (1, 37, 70)])
def test_fused_rgb_head_in_bf16_is_as_close_to_float32_as_cudnn(t, h, w):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(t, 128, h, w, device="cuda", generator=g).bfloat16().contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(3, 128, 3, 3, device="cuda", generator=g) * 0.03).bfloat16()
    bias = torch.randn(3, device="cuda", generator=g).bfloat16()
    exact = F.conv2d(F.relu(x.float()), weight.float(), bias.float(), padding=1)
    cudnn = F.conv2d(F.relu(x), weight, bias, padding=1).float()
    fused = relu_conv3x3_rgb(x, pack_rgb_head(weight, bias), 3)
    assert fused.dtype == torch.bfloat16 and fused.is_contiguous(memory_format=torch.channels_last)
    err = float((fused.float() - exact).norm() / exact.norm())
    err_cudnn = float((cudnn - exact).norm() / exact.norm())
    assert err < 4e-3 and err <= 1.5 * err_cudnn + 1e-4, (err, err_cudnn)
