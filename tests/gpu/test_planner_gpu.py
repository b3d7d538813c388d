"""GPU check of out-of-memory recovery: an out-of-memory error injected mid-run frees the run,
re-plans and gives exactly the frames of the smaller plan; the weights stay loaded and nothing of
the failed run stays allocated. Skipped without CUDA."""
import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from comfyui_flashvsr.flashvsr import pipeline as pipeline_module  # noqa: E402
from comfyui_flashvsr.flashvsr.config import UpscaleConfig  # noqa: E402
from comfyui_flashvsr.flashvsr.engine import memory  # noqa: E402
from comfyui_flashvsr.flashvsr.engine.preprocess import plan_geometry  # noqa: E402
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR  # noqa: E402


def test_out_of_memory_mid_run_replans_and_frees_the_failed_run(monkeypatch):
    pipe = FlashVSR.random(mode="tiny", device="cuda", dtype=torch.bfloat16, size="tiny")
    frames = torch.rand((29, 96, 96, 3), generator=torch.Generator().manual_seed(0))   # 384x384 output
    # eager: compiled kernels change with the shapes compiled before them, which differ here by design
    cfg = UpscaleConfig(sageattention="disable", tile_overlap=64, compile=False)
    geom = plan_geometry(96, 96, cfg.scale, False)
    retry = pipe._plan(geom, cfg, memory.shrink_budget(pipe._plan(geom, cfg, pipe._budget(cfg))))
    assert retry.tiles is not None
    with monkeypatch.context() as m:
        m.setattr(FlashVSR, "_plan", lambda self, geom, cfg, budget: retry)
        expected = pipe.upscale(frames, cfg).frames
    torch.cuda.synchronize()
    # live tensors only: the recovery collects garbage (pipeline._release), so the baseline must too
    # (without this, 1.2 MB of cyclic garbage of the first run, freed there, made "after" < "idle")
    gc.collect()
    idle = torch.cuda.memory_allocated()
    real, failures = pipeline_module.run_stream, [1]

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 1 and failures[0]:
                failures[0] -= 1
                torch.empty(1, device="cuda")          # a real allocation in flight, as in a real failure
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected mid-run)")
            yield item

    monkeypatch.setattr(pipeline_module, "run_stream", failing)
    result = pipe.upscale(frames, cfg)
    torch.cuda.synchronize()
    assert len(result.stats.replans) == 1 and result.stats.plan == retry.describe()
    assert torch.equal(result.frames, expected)
    gc.collect()
    assert torch.cuda.memory_allocated() == idle       # weights only: the failed run left nothing behind
