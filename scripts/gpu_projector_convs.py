"""The LQ projector's two 3-D convolutions (kernel 4x3x3, stride 2 in time) at 768x1408, three ways.

cuDNN picks an sm80 kernel for the channels-last 3-D convolution on the H100 (3.2 ms per call in the
profile). The same convolution is a sum over the 4 temporal taps of 2-D 3x3 convolutions, for which
cuDNN has Hopper kernels. Prints ms per call and the error against the 3-D convolution.
    python scripts/gpu_projector_convs.py
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.testing


def conv3d_as_2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (1, C, T, H+2, W+2) padded, w (O, C, 4, 3, 3), stride (2, 1, 1) -> (1, O, T_out, H, W)."""
    t_out = (x.shape[2] - w.shape[2]) // 2 + 1
    y = None
    for i in range(w.shape[2]):
        frames = x[0, :, i:i + 2 * (t_out - 1) + 1:2].transpose(0, 1)           # (T_out, C, H+2, W+2)
        frames = frames.contiguous(memory_format=torch.channels_last)
        part = F.conv2d(frames, w[:, :, i], b if i == 0 else None)
        y = part if y is None else y + part
    return y.transpose(0, 1)[None]


def conv3d_as_stacked_2d(x: torch.Tensor, w_cat: torch.Tensor, b: torch.Tensor, taps: int = 4) -> torch.Tensor:
    """The same as one 2-D convolution: the 4 input frames of each output frame stacked on the channel
    axis (tap-major), w_cat (O, 4*C, 3, 3). One fp32 accumulation inside cuDNN, no partial sums."""
    c, t, h, w = x.shape[1:]
    t_out = (t - taps) // 2 + 1
    cols = x[0].unfold(1, taps, 2).permute(1, 2, 3, 4, 0).reshape(t_out, h, w, taps * c)
    return F.conv2d(cols.permute(0, 3, 1, 2), w_cat, b).transpose(0, 1)[None]


def main():
    torch.backends.cudnn.benchmark = True
    print(torch.__version__, torch.backends.cudnn.version(), torch.cuda.get_device_name(), flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    dt = torch.bfloat16
    for cin, cout, frames in ((768, 2048, 6), (2048, 3072, 4)):
        x = torch.randn(1, cin, frames, 50, 90, device="cuda", dtype=dt, generator=g)
        w = torch.randn(cout, cin, 4, 3, 3, device="cuda", dtype=dt, generator=g) * (cin * 36) ** -0.5
        b = torch.randn(cout, device="cuda", dtype=dt, generator=g)
        ref = F.conv3d(x.float(), w.float(), b.float(), stride=(2, 1, 1))
        xl, wl = x.contiguous(memory_format=torch.channels_last_3d), w.contiguous(memory_format=torch.channels_last_3d)
        w2 = [w[:, :, i].contiguous(memory_format=torch.channels_last) for i in range(4)]
        wl2 = torch.stack(w2, 2)
        w_cat = w.permute(0, 2, 1, 3, 4).reshape(cout, 4 * cin, 3, 3).contiguous(memory_format=torch.channels_last)
        cases = {
            "conv3d channels-last": lambda xl=xl, wl=wl, b=b: F.conv3d(xl, wl, b, stride=(2, 1, 1)),
            "conv3d NCDHW": lambda x=x, w=w, b=b: F.conv3d(x, w, b, stride=(2, 1, 1)),
            "4 x conv2d channels-last, summed": lambda x=x, wl2=wl2, b=b: conv3d_as_2d(x, wl2, b),
            "1 x conv2d, taps stacked on channels": lambda x=x, w_cat=w_cat, b=b: conv3d_as_stacked_2d(x, w_cat, b),
        }
        flops = 2 * cin * 36 * cout * ((frames - 4) // 2 + 1) * 48 * 88
        for name, fn in cases.items():
            out = fn().float()
            rel = ((out - ref).norm() / ref.norm()).item()
            ms = triton.testing.do_bench(fn, warmup=10, rep=100)
            print(f"| {cin}->{cout}, {frames} frames | {name} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s | relL2 {rel:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
