"""The frame/chunk schedule: the engine, the pipeline and these tests use the same functions."""
import pytest
import torch

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.engine import stream
from comfyui_flashvsr.flashvsr.engine.frames import FrameSource
from comfyui_flashvsr.flashvsr.engine.schedule import chunk, min_input_frames, plan_frames, total_chunks
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.models import dit as dit_module
from comfyui_flashvsr.models.lcsa import topk_count

LENGTHS = range(1, 220)


def _frames(n: int) -> torch.Tensor:
    return torch.zeros(n, 1, 1, 3)


@pytest.mark.parametrize("official", [True, False], ids=["official", "exact"])
def test_streaming_chunk_decision_runs_exactly_the_planned_chunks(official):
    for n in LENGTHS:
        for source in (FrameSource(_frames(n)), FrameSource(iter(_frames(n)))):   # known and unknown length
            ran = 0
            while stream.chunk_needed(ran, source, official):
                ran += 1
            assert ran == total_chunks(n, official), n


def test_official_mode_runs_no_chunk_below_21_frames_and_the_plan_refuses_them():
    assert min_input_frames(0, official=True) == 21
    assert total_chunks(20, official=True) == 0
    with pytest.raises(ValueError, match="at least 21 input frames, got 20; use preprocess='exact'"):
        plan_frames(20, official=True)


@pytest.mark.parametrize("official", [True, False], ids=["official", "exact"])
def test_the_last_chunk_ends_where_the_model_frames_end(official):
    for n in range(21 if official else 1, 220):
        plan = plan_frames(n, official)
        assert chunk(plan.chunks - 1).lq_end == plan.model_frames, n
        assert plan.output_frames == (n if not official else plan.model_frames - 4)
        assert plan.latent_frames == 6 + 2 * (plan.chunks - 1)


def test_chunk_k_reads_the_noise_the_drivers_slice():
    # chunk 0: latents 0..5; chunk k >= 1: latents 4+2k, 5+2k (the fixtures' README, noise slices)
    assert (chunk(0).latent_start, chunk(0).latent_count) == (0, 6)
    for k in range(1, 40):
        assert (chunk(k).latent_start, chunk(k).latent_count) == (4 + 2 * k, 2)


@pytest.mark.parametrize("n,official", [(25, True), (33, False), (7, False)])
def test_pipeline_returns_the_planned_frames_with_the_planned_progress(n, official):
    pipe = FlashVSR.random(mode="tiny", version="v1.1", device="cpu", dtype=torch.float32, size="micro", seed=1)
    seen = []
    cfg = UpscaleConfig(preprocess="official" if official else "exact", sageattention="disable")
    out = pipe.upscale(torch.rand(n, 32, 32, 3), cfg, on_progress=lambda d, t: seen.append((d, t)))
    chunks = total_chunks(n, official)
    assert out.frames.shape[0] == plan_frames(n, official).output_frames
    assert seen == [(i, chunks) for i in range(1, chunks + 1)]


def test_dit_takes_its_topk_from_lcsa(monkeypatch):
    calls = []

    def spy(windows, ratio):
        calls.append((windows, ratio))
        return topk_count(windows, ratio)

    monkeypatch.setattr(dit_module, "topk_count", spy)
    pipe = FlashVSR.random(mode="tiny", version="v1.1", device="cpu", dtype=torch.float32, size="micro", seed=1)
    pipe.upscale(torch.rand(21, 32, 32, 3), UpscaleConfig(sageattention="disable"))
    assert calls and all(w == 1 for w, _ in calls)       # 128x128 model frame: one window per group
