"""Predicted vs measured peak VRAM for a few runs on random full-size Tiny weights (one process).

    python scripts/gpu_vram_calibrate.py [--quick]

Each case: the planner's plan for its budget (the allocator capped there, as `bench --vram-budget`),
one run, then measured ``max_memory_allocated`` next to the prediction.
"""
import sys
import time

import torch

sys.path.insert(0, ".")
import importlib.util, pathlib  # noqa: E402
spec = importlib.util.spec_from_file_location("comfyui_flashvsr", pathlib.Path("__init__.py"),
                                              submodule_search_locations=["."])
mod = importlib.util.module_from_spec(spec); sys.modules["comfyui_flashvsr"] = mod; spec.loader.exec_module(mod)

from comfyui_flashvsr.flashvsr.config import UpscaleConfig  # noqa: E402
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR  # noqa: E402

CASES = [  # (out h, out w, scale, frames, sage, budget GiB or "auto")
    (768, 1408, 4.0, 25, "enable", "auto"),
    (768, 1408, 4.0, 25, "enable", 8.0),
    (768, 1408, 4.0, 25, "disable", 8.0),
    (2160, 3840, 3.0, 25, "enable", 24.0),
    (2160, 3840, 3.0, 25, "enable", 12.0),
]

pipe = FlashVSR.random(mode="tiny", device="cuda", dtype=torch.bfloat16)
total = torch.cuda.get_device_properties(0).total_memory
print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
for h, w, scale, n, sage, budget in CASES:
    frames = torch.rand((n, round(h / scale), round(w / scale), 3))
    cfg = UpscaleConfig(scale=scale, sageattention=sage, vram_budget=budget)
    torch.cuda.set_per_process_memory_fraction(1.0 if budget == "auto" else budget * 2**30 / total)
    t0 = time.perf_counter()
    r = pipe.upscale(frames, cfg)
    s = r.stats
    print(f"{h}x{w} x{scale:g} {sage} budget {budget}: measured {s.peak_vram_bytes / 2**30:.2f} GiB, "
          f"predicted {s.predicted_peak_bytes / 2**30:.2f} GiB ({s.predicted_peak_bytes / s.peak_vram_bytes - 1:+.1%}); "
          f"{s.plan}; replans {len(s.replans)}; {n / (time.perf_counter() - t0):.2f} fps e2e", flush=True)
    del r
