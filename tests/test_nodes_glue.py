"""The ComfyUI glue, against minimal stand-ins for the three ComfyUI modules it calls.

Stand-ins are used only here, where ComfyUI itself cannot be imported in CI; the integration test
(tests/integration) runs the same code inside a real ComfyUI server.
"""
import importlib
import sys
import types

import pytest
import torch

from comfyui_flashvsr.nodes.options import NodeSettings
from comfyui_flashvsr.nodes.runner import PipelineCache


class Interrupted(BaseException):
    """Like ComfyUI's InterruptProcessingException: a BaseException, so `except Exception` misses it."""


class FakeComfy:
    def __init__(self, models_dir):
        self.calls = []
        self.interrupted = False
        self.cancel_at = None  # progress value at which the user "presses Cancel"
        self.paths = {}
        mm = types.ModuleType("comfy.model_management")
        mm.unload_all_models = lambda: self.calls.append("comfy unload_all_models")
        mm.throw_exception_if_processing_interrupted = self._check
        mm.processing_interrupted = lambda: self.interrupted
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.intermediate_device = lambda: torch.device("cpu")
        mm.intermediate_dtype = lambda: torch.float16
        mm.soft_empty_cache = lambda: self.calls.append("soft_empty_cache")
        utils = types.ModuleType("comfy.utils")
        fake = self

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.calls.append(("progress", value, total))
                if value == fake.cancel_at:
                    fake.interrupted = True

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils = mm, utils
        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(models_dir)
        fp.add_model_folder_path = lambda name, path, is_default=False: \
            self.paths.setdefault(name, []).append(path)
        fp.get_folder_paths = lambda name: list(self.paths[name])
        self.modules = {"comfy": comfy, "comfy.model_management": mm, "comfy.utils": utils,
                        "folder_paths": fp}
        self.mm = mm

    def _check(self):
        if self.interrupted:
            raise Interrupted("processing interrupted")


class FakePipe:
    """Returns frames of the contract's shape; calls on_progress once per 'chunk'."""

    def __init__(self, chunks=3):
        self.chunks, self.unloaded = chunks, False

    def upscale(self, frames, config, on_progress=None):
        n, h, w, _ = frames.shape
        for i in range(self.chunks):
            on_progress(i + 1, self.chunks)
        out = torch.zeros(n, round(h * config.scale), round(w * config.scale), 3)
        stats = types.SimpleNamespace(attention="attention: sdpa (dense) / reference (sparse)",
                                      summary=lambda: f"attention: sdpa | {n} frames in 0.1 s")
        return types.SimpleNamespace(frames=out, stats=stats)

    def unload(self):
        self.unloaded = True


@pytest.fixture
def glue(monkeypatch, tmp_path):
    fake = FakeComfy(tmp_path / "models")
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "comfyui_flashvsr.nodes.comfy_glue", raising=False)
    module = importlib.import_module("comfyui_flashvsr.nodes.comfy_glue")
    pipes = []
    def load(key, on_download=None):
        pipes.append(FakePipe())
        return pipes[-1]

    monkeypatch.setattr(module, "PIPELINES", PipelineCache(load=load))
    monkeypatch.setattr(module, "sage_status", lambda: {"installed": False, "reason": "not here"})
    module.register_models_folder()
    yield types.SimpleNamespace(module=module, fake=fake, pipes=pipes)


def test_models_folder_is_registered_under_comfy_models_dir(glue, tmp_path):
    assert glue.fake.paths == {"FlashVSR": [str(tmp_path / "models" / "FlashVSR")]}


def test_comfy_unload_all_models_also_frees_the_cached_pipeline(glue):
    glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert glue.module.PIPELINES.key is not None
    glue.module.release_with_comfy_unload(glue.module.PIPELINES)
    glue.fake.mm.unload_all_models()
    assert "comfy unload_all_models" in glue.fake.calls  # ComfyUI's own unloading still happens
    assert glue.module.PIPELINES.key is None and glue.pipes[0].unloaded


def test_the_pipeline_and_its_gpu_workers_are_released_when_the_server_exits(glue, monkeypatch):
    at_exit = []
    monkeypatch.setattr(glue.module.atexit, "register", lambda fn, *args: at_exit.append((fn, args)))
    glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    glue.module.release_at_exit(glue.module.PIPELINES)
    [(fn, args)] = at_exit
    fn(*args)
    assert glue.module.PIPELINES.key is None and glue.pipes[0].unloaded


def test_the_run_reaches_the_gpu_workers_cancel_through_comfys_interrupt_flag(glue):
    hooks = glue.module.cancel_hooks()
    assert not hooks.requested()
    hooks.raise_if_requested()                  # nothing pressed: nothing raised
    glue.fake.interrupted = True
    assert hooks.requested() and hooks.requested()     # reading it leaves it set
    with pytest.raises(Interrupted):
        hooks.raise_if_requested()


def test_unload_hook_is_chained_only_once(glue):
    glue.module.release_with_comfy_unload(glue.module.PIPELINES)
    first = glue.fake.mm.unload_all_models
    glue.module.release_with_comfy_unload(glue.module.PIPELINES)
    assert glue.fake.mm.unload_all_models is first
    glue.fake.mm.unload_all_models()
    assert glue.fake.calls.count("comfy unload_all_models") == 1


def test_progress_moves_per_chunk_and_output_follows_comfy_intermediate_dtype(glue):
    out, lines = glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert [c for c in glue.fake.calls if c[0] == "progress"] == [("progress", i, 3) for i in (1, 2, 3)]
    assert out.shape == (2, 16, 16, 3) and out.dtype == torch.float16
    assert any("SageAttention requested but not used: not installed (not here)" in line for line in lines)


def test_cancel_stops_the_run_within_one_chunk_and_keeps_the_model_loaded(glue):
    glue.fake.cancel_at = 1
    with pytest.raises(Interrupted):
        glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert [c for c in glue.fake.calls if c[0] == "progress"] == [("progress", 1, 3)]
    assert "soft_empty_cache" in glue.fake.calls
    assert glue.module.PIPELINES.key is not None and not glue.pipes[0].unloaded
    glue.fake.interrupted, glue.fake.cancel_at = False, None
    out, lines = glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert out.shape == (2, 16, 16, 3) and len(glue.pipes) == 1
    assert "weights: already loaded" in lines


def test_a_cancel_pressed_before_the_run_loads_nothing(glue):
    glue.fake.interrupted = True
    with pytest.raises(Interrupted):
        glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert glue.pipes == []


def test_a_first_use_download_moves_the_bar_per_file_logs_and_stops_on_cancel(glue, monkeypatch, caplog):
    from comfyui_flashvsr.flashvsr.weights.download import DownloadStatus
    mib = 2**20

    def load(key, on_download=None):          # what ensure_weights does while it downloads
        on_download(DownloadStatus("dit.safetensors", 0, 30 * mib, 0.0, 1, 2))
        on_download(DownloadStatus("dit.safetensors", 10 * mib, 30 * mib, 5e6, 1, 2))
        on_download(DownloadStatus("dit.safetensors", 30 * mib, 30 * mib, 5e6, 1, 2, finished=True))
        glue.fake.interrupted = True           # the user presses Cancel during the second file
        on_download(DownloadStatus("proj.ckpt", 0, 4 * mib, 0.0, 2, 2))
        raise AssertionError("Cancel did not stop the download")

    monkeypatch.setattr(glue.module, "PIPELINES", PipelineCache(load=load))
    caplog.set_level("INFO")
    with pytest.raises(Interrupted):
        glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    assert [c for c in glue.fake.calls if c[0] == "progress"] == [
        ("progress", 0, 30 * mib), ("progress", 10 * mib, 30 * mib), ("progress", 30 * mib, 30 * mib)]
    assert glue.module.PIPELINES.key is None   # nothing half-loaded
    logged = [r.getMessage() for r in caplog.records if "downloading" in r.getMessage()]
    assert logged == ["[FlashVSR] downloading dit.safetensors (1/2): 0 B of 31.46 MB (0%), 0 B/s"]


def test_sample_clip_is_placed_for_the_example_workflows_and_a_users_file_is_never_replaced(glue, tmp_path):
    inputs = tmp_path / "input"
    inputs.mkdir()
    assert glue.module.place_sample(str(inputs))
    placed = inputs / glue.module.SAMPLE_NAME
    assert placed.read_bytes() == open(glue.module.SAMPLE, "rb").read()
    placed.write_bytes(b"the user's own clip")
    assert not glue.module.place_sample(str(inputs))
    assert placed.read_bytes() == b"the user's own clip"


def test_the_run_summary_is_logged_once_per_run(glue, caplog):
    import logging
    caplog.set_level(logging.INFO)
    glue.module.upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0))
    ours = [r.getMessage() for r in caplog.records if r.name.endswith("comfy_glue")]
    assert not any("frames in" in m for m in ours)  # the engine logs the summary; the glue logs the rest
    assert any("x2: 2x8x8 -> 2x16x16 frames" in m for m in ours)
