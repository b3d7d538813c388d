"""A node run on the real engine with small generated weights in a temporary models folder."""
import pytest
import torch

from flashvsr_tests_tiny_weights import write_tiny_weights
from comfyui_flashvsr.nodes.options import NodeSettings, basic_settings
from comfyui_flashvsr.nodes.runner import (LoadKey, PipelineCache, load_pipeline, resolve_device,
                                           resolve_precision, run_upscale, sage_not_used_reason)

NO_SAGE = {"installed": False, "version": None, "flavour": None, "reason": "No module named 'sageattention'"}


class UserCancel(BaseException):
    """Stands for ComfyUI's InterruptProcessingException, which is a BaseException."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "FlashVSR"
    write_tiny_weights(root, "v1.1")
    return [str(root)]


@pytest.fixture
def counting_cache():
    loads = []

    def load(key, on_download=None):
        loads.append(key)
        return load_pipeline(key, on_download)

    return PipelineCache(load), loads


def _run(frames, settings, cache, models, on_progress=lambda done, total: None):
    return run_upscale(frames, settings, cache=cache, roots=models, auto_device="cpu",
                       on_progress=on_progress, sage_status=lambda: NO_SAGE)


def test_run_returns_every_frame_at_exactly_scale_times_the_size_with_a_report(models, counting_cache):
    cache, loads = counting_cache
    progress = []
    frames = torch.rand(3, 8, 12, 3)
    outcome = _run(frames, basic_settings("Tiny", 2.0, 0), cache, models,
                   lambda done, total: progress.append((done, total)))
    assert outcome.frames.shape == (3, 16, 24, 3) and outcome.frames.dtype == torch.float32
    assert 0.0 <= outcome.frames.min() and outcome.frames.max() <= 1.0
    assert progress and progress[-1][0] == progress[-1][1]
    summary, *rest = outcome.lines
    assert summary.startswith("attention: ") and "3 frames in" in summary and "fps" in summary
    assert any("sage" in line.lower() and "not" in line.lower() for line in outcome.lines)
    assert "v1.1 tiny x2: 3x12x8 -> 3x24x16 frames, fp32 on cpu" in rest
    assert rest[-1].startswith("weights: loaded in")
    assert loads == [LoadKey(tuple(models), "v1.1", "tiny", "cpu", "fp32")]


def test_second_run_with_the_same_weights_reuses_the_loaded_pipeline(models, counting_cache):
    cache, loads = counting_cache
    frames = torch.rand(2, 8, 8, 3)
    _run(frames, NodeSettings(scale=2.0), cache, models)
    again = _run(frames, NodeSettings(scale=1.5, seed=3, sageattention="disable"), cache, models)
    assert len(loads) == 1 and again.lines[-1] == "weights: already loaded"
    assert not any("requested but not used" in line for line in again.lines)


def test_cancel_from_the_progress_callback_stops_the_run_and_keeps_the_model(models, counting_cache):
    cache, loads = counting_cache

    def cancel(done, total):
        raise UserCancel()

    with pytest.raises(UserCancel):
        _run(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0), cache, models, cancel)
    assert cache.key is not None
    after = _run(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0), cache, models)
    assert after.frames.shape == (2, 16, 16, 3) and len(loads) == 1


def test_keep_model_loaded_off_frees_the_pipeline_after_the_run(models, counting_cache):
    cache, _ = counting_cache
    outcome = _run(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0, keep_model_loaded=False), cache, models)
    assert cache.key is None and outcome.lines[-1].endswith("; unloaded after the run")


class Loaded:
    def __init__(self, key, on_download=None):
        self.key, self.unloaded = key, False

    def unload(self):
        self.unloaded = True


def test_cache_holds_one_pipeline_and_unloads_it_before_loading_other_weights():
    cache = PipelineCache(Loaded)
    a = LoadKey(("m",), "v1.1", "tiny", "cpu", "fp32")
    b = LoadKey(("m",), "v1", "tiny", "cpu", "fp32")
    first, reused = cache.get(a)
    assert not reused and cache.get(a) == (first, True)
    second, reused = cache.get(b)
    assert first.unloaded and not reused and second.key == b and cache.key == b
    assert cache.release("test") and second.unloaded and not cache.release("again")


def test_auto_device_is_comfyuis_and_a_missing_gpu_is_named_with_the_alternatives():
    assert resolve_device("auto", "cuda:0") == "cuda:0"
    assert resolve_device("cpu", "cuda:0") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"FlashVSR ⚡: device cuda:1: no CUDA GPU is visible \(.*\); "
                                             r"use device cpu"):
            resolve_device("cuda:1", "cpu")


def test_auto_precision_is_fp32_on_cpu_and_explicit_choices_win():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp16", "cpu") == "fp16"


def test_sage_explanation_only_when_requested_and_not_already_explained():
    assert sage_not_used_reason("disable", "attention: sdpa (dense)", lambda: NO_SAGE) is None
    ran = "attention: sage (dense) / triton (sparse)"
    assert sage_not_used_reason("enable", ran, lambda: NO_SAGE) is None
    assert sage_not_used_reason("enable", "attention: sdpa (dense)", lambda: NO_SAGE) == (
        "SageAttention requested but not used: not installed (No module named 'sageattention')")
    installed = {"installed": True, "version": "1.0.6", "flavour": "1.x", "reason": None}
    assert "installed (1.0.6) but no attention call here was eligible" in sage_not_used_reason(
        "enable", "attention: sdpa (dense)", lambda: installed)


def test_offline_with_no_weights_names_the_exact_files_to_put_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "FlashVSR"
    with pytest.raises(ValueError) as err:
        _run(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0), PipelineCache(), [str(empty)])
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text
    assert str(empty / "v1.1" / "diffusion_pytorch_model_streaming_dmd.safetensors") in text
    assert str(empty / "v1.1" / "LQ_proj_in.ckpt") in text


def test_frames_that_are_not_an_image_batch_are_refused_before_loading(models, counting_cache):
    cache, loads = counting_cache
    with pytest.raises(ValueError, match=r"needs video frames as an IMAGE batch .* got \(8, 8, 3\)"):
        _run(torch.rand(8, 8, 3), NodeSettings(scale=2.0), cache, models)
    assert loads == []


def test_switching_only_the_mode_keeps_the_dit_and_projector(models, counting_cache):
    cache, loads = counting_cache
    frames = torch.rand(3, 16, 16, 3)
    _run(frames, basic_settings("Tiny", 2.0, 0), cache, models)
    pipe, _ = cache.get(cache.key)
    dit, projector, tc = pipe.dit, pipe.projector, pipe.decoder
    long_run = _run(frames, basic_settings("Tiny-Long", 2.0, 0), cache, models)
    assert pipe.decoder is tc and pipe.mode.value == "tiny-long"          # same TCDecoder
    assert "weights: already loaded" in long_run.lines
    full = _run(frames, basic_settings("Full", 2.0, 0), cache, models)
    assert len(loads) == 1 and cache.key.mode == "full"                    # no second full load
    assert pipe.dit is dit and pipe.projector is projector and pipe.decoder is not tc
    assert full.frames.shape == (3, 32, 32, 3)
    assert _run(frames, basic_settings("Tiny", 2.0, 0), cache, models).frames.shape == (3, 32, 32, 3)
    assert len(loads) == 1 and pipe.dit is dit


def test_a_failed_mode_switch_frees_the_pipeline_instead_of_keeping_it_half_switched():
    def broken_switch(pipe, key):
        raise RuntimeError("disk full")

    cache = PipelineCache(Loaded, broken_switch)
    first, _ = cache.get(LoadKey(("m",), "v1.1", "tiny", "cpu", "fp32"))
    with pytest.raises(RuntimeError, match="disk full"):
        cache.get(LoadKey(("m",), "v1.1", "full", "cpu", "fp32"))
    assert first.unloaded and cache.key is None


def test_badge_says_enable_runs_pytorch_attention_on_the_cpu():
    from comfyui_flashvsr.nodes.runner import enable_plan
    plan = enable_plan("cpu")
    assert plan["enable"] == "CPU: PyTorch attention" and plan["sage"] == "none"
    assert plan["disable"] == "sageattention off: PyTorch attention"


def test_badge_says_our_int8_kernel_runs_on_hopper_without_the_sageattention_package(monkeypatch):
    from comfyui_flashvsr.attention import AttentionDispatcher, probe
    from comfyui_flashvsr.nodes.runner import enable_plan
    missing = probe.SageProbe(available=False, flavour=None, version=None, reason="No module named 'sageattention'")
    d = AttentionDispatcher(sage=missing)
    monkeypatch.setattr(d, "capability", lambda device: (9, 0))
    monkeypatch.setattr(probe, "probe_triton", lambda: probe.TritonProbe(True, "3.5", None))
    plan = enable_plan("cuda:0", dispatcher=d)
    assert plan["enable"] == "⚡ INT8 sparse kernel; dense: PyTorch (SageAttention not installed)"
    monkeypatch.setattr(d, "capability", lambda device: (8, 9))
    assert enable_plan("cuda:0", dispatcher=d)["enable"] == "PyTorch attention: SageAttention not installed"
