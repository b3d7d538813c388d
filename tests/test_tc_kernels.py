"""The TCDecoder's fused last step (ReLU + 3x3 convolution to RGB, models/tc_kernels.py): run on the
CPU by Triton's interpreter in a child process (TRITON_INTERPRET must be set before triton is
imported), compiled ahead of time for sm_80 / sm_90, and its place in the fast tail. bfloat16
products are checked on the GPU (the interpreter multiplies bf16 dot operands as raw bits)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig

pytest.importorskip("triton")

CHILD = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    import torch.nn.functional as F
    spec = importlib.util.spec_from_file_location("tck", sys.argv[1])
    tck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tck)
    g = torch.Generator().manual_seed(0)
    results = {}
    # odd sizes: partial tiles on both axes, 1-pixel frames, channels not a multiple of 16
    for dtype, (t, c, h, w) in [("float32", (2, 32, 9, 70)), ("float16", (3, 16, 5, 33)), ("float32", (1, 64, 1, 1))]:
        x = torch.randn(t, c, h, w, generator=g).to(getattr(torch, dtype)).contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(3, c, 3, 3, generator=g) * 0.2).to(x.dtype)
        bias = torch.randn(3, generator=g).to(x.dtype)
        y = tck.relu_conv3x3_rgb(x, tck.pack_rgb_head(weight, bias), 3)
        ref = F.conv2d(F.relu(x.double()), weight.double(), bias.double(), padding=1)
        results[f"{dtype} {t}x{c}x{h}x{w}"] = {
            "max_abs": float((y.double() - ref).abs().max()), "ref_max": float(ref.abs().max()),
            "shape": list(y.shape), "channels_last": y.is_contiguous(memory_format=torch.channels_last),
            "dtype": str(y.dtype)}
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted():
    import comfyui_flashvsr.models.tc_kernels as tck
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", CHILD, tck.__file__], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fused_rgb_head_equals_relu_then_convolution(interpreted):
    assert set(interpreted) == {"float32 2x32x9x70", "float16 3x16x5x33", "float32 1x64x1x1"}
    for name, got in interpreted.items():
        t, c, h, w = map(int, name.split()[1].split("x"))
        assert got["shape"] == [t, 3, h, w] and got["channels_last"] and got["dtype"] == f"torch.{name.split()[0]}"
        # float32: summation order only; float16: the output's own rounding (~1e-3 relative)
        bound = 1e-5 if name.startswith("float32") else 2e-3
        assert got["max_abs"] <= bound * got["ref_max"] + 1e-6, (name, got)


def test_packing_puts_each_tap_and_channel_where_the_kernel_reads_it():
    from comfyui_flashvsr.models.tc_kernels import OUT_PAD, pack_rgb_head
    weight = torch.randn(3, 16, 3, 3)
    packed, bias = pack_rgb_head(weight, torch.tensor([1.0, 2.0, 3.0]))
    assert packed.shape == (9, 16, OUT_PAD) and bias.tolist()[:4] == [1.0, 2.0, 3.0, 0.0]
    assert torch.equal(packed[2 * 3 + 1, 4, 2], weight[2, 4, 2, 1])        # tap (row 2, column 1)
    assert packed[..., 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="3x3 convolution"):
        pack_rgb_head(torch.zeros(3, 16, 1, 1), None)
    with pytest.raises(ValueError, match="power-of-two"):
        pack_rgb_head(torch.zeros(3, 48, 3, 3), None)         # the caller keeps cuDNN for such a head


def test_fused_rgb_head_refuses_a_channels_first_input():
    from comfyui_flashvsr.models.tc_kernels import pack_rgb_head, relu_conv3x3_rgb
    with pytest.raises(ValueError, match="channels-last"):
        relu_conv3x3_rgb(torch.zeros(1, 16, 4, 4), pack_rgb_head(torch.zeros(3, 16, 3, 3), None), 3)


@pytest.mark.parametrize("arch, instruction", [(90, "wgmma"), (80, "mma.sync")])
def test_fused_rgb_head_compiles_with_tensor_core_products(arch, instruction):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from comfyui_flashvsr.models import tc_kernels as tck
    fn = tck._relu_conv3x3_rgb
    pointers = {"X": "*bf16", "WP": "*bf16", "BIAS": "*fp32", "Y": "*bf16"}
    constexprs = {"C": 128, "COUT": 3, "NPAD": tck.OUT_PAD, "TH": tck.TILE_H, "TW": tck.TILE_W}
    signature = {a: pointers.get(a, "constexpr" if a in constexprs else "i32") for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    ptx = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": tck.WARPS}).asm["ptx"]
    assert instruction in ptx


def test_tail_without_its_head_leaves_the_last_relu_and_convolution_to_the_caller():
    cfg = TCDecoderConfig(channels=(32, 24, 16, 12), latent_channels=20)
    torch.manual_seed(0)
    dec = TCDecoder(cfg).double()
    x = torch.randn(2, cfg.channels[2], 5, 6, dtype=torch.float64)
    weights = dec.fast_tail_weights()
    conv = dec.rgb_head()
    body = dec.run_tail_subpixel(x, weights, head=False)
    assert body.shape == (2, cfg.channels[3], 10, 12)
    full = dec.run_tail_subpixel(x, weights)
    torch.testing.assert_close(F.conv2d(F.relu(body), conv.weight, conv.bias, padding=1), full)
