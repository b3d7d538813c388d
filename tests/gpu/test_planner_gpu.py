"""GPU check of out-of-memory recovery: an out-of-memory error injected mid-run frees the run,
re-plans and gives exactly the frames of the smaller plan; the weights stay loaded and nothing of
the failed run stays allocated. Skipped without CUDA."""
import gc
from dataclasses import replace

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
    # both plans' shapes once before the baseline: what a run keeps per shape (not per run) is then
    # in it, and the check below sees only what the failed run itself would leave behind
    pipe.upscale(frames, cfg)
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


def test_a_budget_that_only_an_int8_cache_fits_runs_untiled_on_the_int8_kernel():
    """Hopper with ``enable``: a budget between the int8 cache's predicted peak and the bf16 one gives an
    untiled run with int8 keys and values (the INT8 kernel, FA4 set aside where installed), and frames
    within int8 rounding of the roomy run's."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the INT8 kernel runs on Hopper only")
    pipe = FlashVSR.random(mode="tiny", device="cuda", dtype=torch.bfloat16, size="tiny")
    frames = torch.rand((29, 96, 160, 3), generator=torch.Generator().manual_seed(0))   # 384x640 output
    roomy_cfg = UpscaleConfig(sageattention="enable", compile=False)
    inputs = pipe._memory_inputs(roomy_cfg)
    assert inputs.int8_values_allowed
    geom = plan_geometry(96, 160, roomy_cfg.scale, False)
    smallest = memory.predict_peak(replace(inputs, int8_keys=True, int8_values=True), geom.model_h, geom.model_w)
    budget_gib = (smallest / inputs.usable_share + 2**20) / memory.GiB
    tight_cfg = UpscaleConfig(sageattention="enable", compile=False, vram_budget=budget_gib)
    plan = pipe.plan(96, 160, tight_cfg)
    assert plan.tiles is None and plan.int8_values and plan.predicted_peak == smallest, plan.describe()
    roomy = pipe.upscale(frames, roomy_cfg)
    tight = pipe.upscale(frames, tight_cfg)
    assert "KV cache values in int8" in tight.stats.attention and "triton-int8" in tight.stats.attention
    assert "KV cache values in int8" not in roomy.stats.attention
    mse = torch.mean((tight.frames.double() - roomy.frames.double()) ** 2).item()
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-20))).item()
    print(f"int8 cache vs bf16 values: {psnr:.1f} dB; {tight.stats.plan}")
    assert psnr > 30, psnr
