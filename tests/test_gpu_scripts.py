"""The GPU scripts' hooks (scripts/gpu_dit_breakdown.py, gpu_profile.py) still see the calls the
engine makes: run on the CPU with CUDA's events, syncs and memory counters stood in for."""
from __future__ import annotations

import importlib
import pathlib
import sys
import time

import pytest
import torch

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR

SCRIPTS = pathlib.Path(__file__).resolve().parents[1] / "scripts"


class _Event:
    def __init__(self, **_):
        self.t = None

    def record(self, *_):
        self.t = time.perf_counter()

    def elapsed_time(self, later: "_Event") -> float:
        return (later.t - self.t) * 1000.0


@pytest.fixture
def scripts(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    for name, value in (("Event", _Event), ("synchronize", lambda *a: None), ("max_memory_allocated", lambda *a: 0),
                        ("memory_allocated", lambda *a: 0), ("reset_peak_memory_stats", lambda *a: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    mods = {name: importlib.import_module(name) for name in ("gpu_dit_breakdown", "gpu_profile", "gpu_fastpath_check")}
    yield mods
    for name in mods:
        sys.modules.pop(name, None)


def test_gpu_scripts_hook_the_dit_and_attention_calls_of_a_run(scripts):
    bd = scripts["gpu_dit_breakdown"]
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    frames = torch.rand((25, 32, 32, 3), generator=torch.Generator().manual_seed(0))
    cfg = UpscaleConfig(scale=4.0, sageattention="disable")
    # stage_memory wraps what steady_kernels, chunk_period and gpu_profile's StageTimer wrap too
    stages = bd.stage_memory(pipe, cfg, frames)
    chunks = stages["dit"]["calls"]
    assert chunks >= 2 and stages["decoder"]["calls"] == chunks and stages["lq_projector"]["calls"] > 0
    assert stages["decoder body pass"]["calls"] >= chunks and stages["decoder tail pass"]["calls"] >= chunks
    cap = bd.capture_layer(pipe, cfg, frames, chunk=1, layer=0)
    assert cap["q"].shape[:2] == (1, pipe.dit.cfg.num_heads) and cap["mask"].dtype == torch.bool
