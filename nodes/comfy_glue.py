"""Where the nodes meet ComfyUI: model folders, progress and Cancel, freeing memory, the info route.

Imported only inside ComfyUI (through ``comfy_entrypoint``); the behaviour itself is in
``runner.py`` and ``options.py``.
"""
from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import time
from typing import Any, Callable

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

from ..flashvsr import devices
from .options import MODELS_FOLDER, NodeSettings, tile_overlap_limits
from .runner import PipelineCache, enable_plan, run_upscale
from .workers import CancelHooks

log = logging.getLogger(__name__)

# The one process-wide piece of state: ComfyUI clones V3 node classes before every execution, so a
# pipeline stored on a class would be lost, and the two nodes should share one loaded model.
PIPELINES = PipelineCache()

_CHAINED_MARK = "_flashvsr_releases_pipeline"


SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "sample.mp4")
SAMPLE_NAME = "flashvsr_sample.mp4"  # what the example workflows' Load Video nodes open


def place_sample(input_dir: str | None = None, sample: str = SAMPLE) -> bool:
    """Put the bundled sample clip into ComfyUI's input folder, so the example workflows run as
    shipped; True if it was placed. A file of that name that is already there (the user's, or ours
    from an earlier start) is never touched."""
    target = os.path.join(input_dir or folder_paths.get_input_directory(), SAMPLE_NAME)
    if os.path.exists(target):
        return False
    with open(sample, "rb") as src:
        data = src.read()
    try:
        with open(target, "xb") as dst:  # exclusive: never replaces a file created meanwhile
            try:
                dst.write(data)
            except BaseException:
                dst.close()
                os.remove(target)
                raise
    except FileExistsError:
        return False
    except OSError as err:  # a read-only input folder must not stop the pack from loading
        log.warning("[FlashVSR] could not place the example clip %s: %s", target, err)
        return False
    log.info("[FlashVSR] placed the example workflows' clip at %s", target)
    return True


def register_models_folder() -> None:
    """Make ``models/FlashVSR`` a model folder, so ``extra_model_paths.yaml`` can add others."""
    folder_paths.add_model_folder_path(MODELS_FOLDER, os.path.join(folder_paths.models_dir, MODELS_FOLDER))


def release_with_comfy_unload(cache: PipelineCache = PIPELINES) -> None:
    """Free our pipeline whenever ComfyUI unloads all of its own models.

    ComfyUI 0.33 has no hook for packs here. The front end's "Unload models" and "Free model and
    node cache" buttons (``POST /free``), the out-of-memory recovery after a failed node and
    ``--disable-smart-memory`` all end in ``comfy.model_management.unload_all_models()``, which
    every caller looks up on the module at call time (main.py, execution.py). Chaining a release
    after it catches all of them without changing what ComfyUI does. Registering the pipeline as a
    ComfyUI-managed model instead would mean wrapping it in a ModelPatcher, whose weight patching
    and partial offloading would fight the engine's own device handling.
    """
    original = mm.unload_all_models
    if getattr(original, _CHAINED_MARK, False):
        return

    @functools.wraps(original)
    def unload_all_models(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        finally:
            cache.release("ComfyUI unloaded all models")

    setattr(unload_all_models, _CHAINED_MARK, True)
    mm.unload_all_models = unload_all_models


def release_at_exit(cache: PipelineCache = PIPELINES) -> None:
    """Free the pipeline when the server exits: the GPU workers of ``gpus`` > 1 are processes.
    (A worker whose server was killed exits by itself, see ``workers.py``.)"""
    atexit.register(cache.release, "ComfyUI is exiting")


def cancel_hooks() -> CancelHooks:
    """ComfyUI's Cancel for the GPU workers' watchdog: read without clearing it, and raised as
    ComfyUI's own interrupt."""
    return CancelHooks(mm.processing_interrupted, mm.throw_exception_if_processing_interrupted)


def progress_and_cancel() -> Callable[[int, int], None]:
    """A per-chunk callback: moves the node's progress bar and raises when the user pressed Cancel."""
    bar = comfy.utils.ProgressBar(1)

    def on_progress(done: int, total: int) -> None:
        # The progress hook only checks Cancel when an update is actually sent (they are
        # throttled), so check explicitly: Cancel then always stops within one chunk.
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)

    return on_progress


DOWNLOAD_LOG_EVERY_S = 10.0  # a download's log line; the progress bar moves several times a second


def download_progress_and_cancel() -> Callable[[Any], None]:
    """First-use download progress: the node's bar (bytes of the current file) and a log line every
    few seconds; raises when the user pressed Cancel, which stops the download."""
    state: dict[str, Any] = {"file": None, "bar": None, "logged": float("-inf")}

    def on_download(status: Any) -> None:
        mm.throw_exception_if_processing_interrupted()
        total = status.total or max(status.done, 1)
        if status.filename != state["file"]:
            state["file"], state["bar"] = status.filename, comfy.utils.ProgressBar(total)
        state["bar"].update_absolute(min(status.done, total), total)
        now = time.monotonic()
        if not status.finished and now - state["logged"] >= DOWNLOAD_LOG_EVERY_S:
            state["logged"] = now
            log.info("[FlashVSR] downloading %s", status.line())

    return on_download


def sage_status() -> dict:
    from ..flashvsr.pipeline import FlashVSR

    return FlashVSR.sage_status()


def upscale(frames: torch.Tensor, settings: NodeSettings) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Run one node execution; returns frames where ComfyUI keeps images, and the UI lines."""
    mm.throw_exception_if_processing_interrupted()
    try:
        outcome = run_upscale(frames, settings, cache=PIPELINES,
                              roots=folder_paths.get_folder_paths(MODELS_FOLDER),
                              auto_device=str(mm.get_torch_device()),
                              on_progress=progress_and_cancel(), sage_status=sage_status,
                              on_download=download_progress_and_cancel(), cancel=cancel_hooks())
    finally:
        mm.soft_empty_cache()
    for line in outcome.lines[1:]:  # the first line (the run summary) the engine has logged already
        log.info("[FlashVSR] %s", line)
    out = outcome.frames.to(device=mm.intermediate_device(), dtype=mm.intermediate_dtype())
    return out, outcome.lines


def register_routes() -> None:
    """``GET /flashvsr/info`` (also ``/api/flashvsr/info``): what the node badges show."""
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/flashvsr/info")
    async def flashvsr_info(request: web.Request) -> web.Response:
        # The first probe imports sageattention and triton (seconds): keep the event loop free.
        try:
            status = await asyncio.to_thread(sage_status)
        except Exception as err:  # a broken optional install must not take the badge route down
            log.warning("[FlashVSR] SageAttention probe failed: %s", err)
            status = {"installed": None, "version": None, "flavour": None,
                      "reason": f"probe failed: {type(err).__name__}: {err}"}
        loaded = PIPELINES.key
        try:
            badge = await asyncio.to_thread(enable_plan, str(mm.get_torch_device()))
        except Exception as err:  # as above: the badge says it could not tell, the route stays up
            log.warning("[FlashVSR] attention plan failed: %s", err)
            badge = {"enable": "attention: unknown (see the server log)", "disable": "sageattention off",
                     "sage": "none"}
        return web.json_response({
            "sageattention": status,
            "badge": badge,
            "tile_overlap_max": tile_overlap_limits(),
            "gpus": devices.cuda_count(),     # the front end shows the Advanced node's gpus above 1
            "loaded": None if loaded is None else {
                "version": loaded.version, "mode": loaded.mode,
                "device": loaded.device, "dtype": loaded.dtype, "gpus": loaded.gpus},
        })
