"""The CUDA fast path's DiT step functions against the eager (official-arithmetic) ones. Skipped
without CUDA."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from comfyui_flashvsr.models import dit_ops  # noqa: E402


def test_gemm_epilogue_gelu_is_the_tanh_approximation_in_bf16():
    # x @ I + 0 is exact, so the epilogue applies GELU to exactly x. In the negative tail the tanh
    # approximation (the official one) and the erf GELU differ by up to 4.7e-4, far more than bf16
    # steps there; measured on H100: |epilogue - tanh GELU| <= 2.6e-5, |epilogue - erf GELU| 4.9e-4
    x = torch.linspace(-6.0, -2.5, 512 * 64, device="cuda").view(512, 64).to(torch.bfloat16)
    eye = torch.eye(64, device="cuda", dtype=torch.bfloat16)
    got = torch._addmm_activation(torch.zeros(64, device="cuda", dtype=torch.bfloat16), x, eye, use_gelu=True).double()
    tanh, erf = F.gelu(x.double(), approximate="tanh"), F.gelu(x.double())
    assert float((got - tanh).abs().max()) <= 1e-4
    assert float((got - erf).abs().max()) >= 3e-4


def test_fast_post_cross_attention_matches_eager_within_bf16_rounding():
    g = torch.Generator(device="cuda").manual_seed(0)
    dim, ffn, length = 1536, 8960, 2048

    def r(*shape, s=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * s).to(torch.bfloat16)

    def args(cast=lambda t: t):
        return (cast(x), cast(o), dit_ops.Affine(cast(ow), cast(ob)), tuple(cast(m) for m in ffn_mod),
                dit_ops.Affine(cast(f0w), cast(f0b)), dit_ops.Affine(cast(f2w), cast(f2b)))

    x, o, ow, ob = r(1, length, dim), r(1, length, dim), r(dim, dim, s=dim ** -0.5), r(dim, s=0.1)
    ffn_mod = (r(1, 1, dim, s=0.1), r(1, 1, dim, s=0.1), r(1, 1, dim, s=0.5))      # shift, scale, gate
    f0w, f0b, f2w, f2b = r(ffn, dim, s=dim ** -0.5), r(ffn, s=0.1), r(dim, ffn, s=ffn ** -0.5), r(dim, s=0.1)
    eager = dit_ops.post_cross_attention(*args())
    fast = dit_ops.FAST.post_cross_attention(*args())
    ref = dit_ops.post_cross_attention(*args(torch.Tensor.double))
    err_fast = float((fast.double() - ref).norm() / ref.norm())
    err_eager = float((eager.double() - ref).norm() / ref.norm())
    assert err_fast <= 1e-2 and err_fast <= 1.5 * err_eager          # no worse than the official rounding
