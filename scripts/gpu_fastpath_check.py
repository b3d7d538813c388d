"""GPU check that the fast path computes the same thing as the plain path (bf16 noise only).

Full-size random Tiny networks, 768x1408 output: compiled glue + compiled TCDecoder vs eager, and
sageattention enable vs disable; prints PSNR (peak 1) and max |diff| of the output frames.
    python scripts/gpu_fastpath_check.py
"""
from __future__ import annotations

import math

import torch
from _pack import import_pack


def main() -> None:
    import_pack()
    from comfyui_flashvsr.flashvsr.config import UpscaleConfig
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    pipe = FlashVSR.random(mode="tiny", device="cuda", dtype=torch.bfloat16, size="full")
    frames = torch.rand((25, 192, 352, 3), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name, cfg in {"plain": UpscaleConfig(compile=False, sageattention="disable"),
                      "fast": UpscaleConfig(compile=True, sageattention="disable"),
                      "fast+sage": UpscaleConfig(compile=True, sageattention="enable")}.items():
        res = pipe.upscale(frames, cfg)
        runs[name] = res.frames
        print(f"{name:10s} {res.stats.summary()}", flush=True)
    for a, b in (("plain", "fast"), ("fast", "fast+sage")):
        d = (runs[a] - runs[b]).double()
        mse = d.pow(2).mean().item()
        psnr = math.inf if mse == 0 else 10 * math.log10(1 / mse)
        print(f"{a} vs {b}: PSNR {psnr:.1f} dB, max |diff| {d.abs().max().item():.4f}, NaN {bool(torch.isnan(runs[b]).any())}")


if __name__ == "__main__":
    main()
