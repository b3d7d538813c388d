"""One node run without ComfyUI: resolve device and dtype, reuse or load the pipeline, upscale, report.

The ComfyUI side (``nodes/comfy_glue.py``) only supplies the model folders, ComfyUI's device,
progress callbacks (upscale and first-use download) that also raise on Cancel, and converts the result; everything that decides
behaviour lives here so the tests drive it directly.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..flashvsr import devices
from ..flashvsr.devices import resolve_device as _resolve_device
from ..flashvsr.devices import resolve_precision, torch_dtype
from ..flashvsr.config import SageAttention
from .options import NodeSettings, gpus_problem
from .workers import NO_CANCEL, CancelHooks

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
# Gets a weights.download.DownloadStatus several times a second while weights download; may raise
# to cancel (the download then leaves nothing behind and nothing stays loaded).
DownloadProgress = Callable[[Any], None]


@dataclass(frozen=True)
class LoadKey:
    """Everything that changes the loaded weights; runs with equal keys share one pipeline."""

    roots: tuple[str, ...]
    version: str
    mode: str
    device: str
    dtype: str
    gpus: int = 1         # processes the DiT is split over: rank 0 on ``device``, workers on other GPUs


def load_pipeline(key: LoadKey, on_download: DownloadProgress | None = None) -> Any:
    """Load (downloading missing official files first) the engine pipeline for ``key``."""
    from ..flashvsr.pipeline import FlashVSR  # the engine pulls in the networks: only on first use

    return FlashVSR.from_pretrained(list(key.roots), mode=key.mode, version=key.version,
                                    device=key.device, dtype=torch_dtype(key.dtype, key.device), download=True,
                                    progress=on_download)


def start_parallel(key: LoadKey, on_download: DownloadProgress | None = None,
                   cancel: CancelHooks = NO_CANCEL) -> Any:
    """Start the GPU workers of ``key`` (``key.gpus`` - 1 processes) and load rank 0's pipeline."""
    from . import workers
    return workers.start(key.roots, key.version, key.mode, key.device, key.dtype, key.gpus,
                         visible=devices.cuda_count(), on_download=on_download, cancel=cancel)


def switch_mode(pipe: Any, key: LoadKey) -> None:
    """Point a loaded pipeline at ``key.mode``: only the decoder differs between modes."""
    pipe.switch_mode(key.mode, list(key.roots), download=True)


class PipelineCache:
    """Holds at most one loaded pipeline: a second one would double the VRAM for a rare gain.

    ComfyUI runs prompts on one worker thread, but ``release`` is also reached from ComfyUI's
    "free memory" path, which other packs may trigger from elsewhere, hence the lock.
    """

    def __init__(self, load: Callable[[LoadKey, DownloadProgress | None], Any] = load_pipeline,
                 switch: Callable[[Any, LoadKey], None] = switch_mode,
                 start: Callable[[LoadKey, DownloadProgress | None, CancelHooks], Any] = start_parallel) -> None:
        self._load, self._switch, self._start = load, switch, start
        self._lock = threading.RLock()
        self._key: LoadKey | None = None
        self._pipe: Any = None

    @property
    def key(self) -> LoadKey | None:
        return self._key

    @property
    def pipeline(self) -> Any:
        """The loaded pipeline (None when nothing is loaded)."""
        return self._pipe

    def get(self, key: LoadKey, on_download: DownloadProgress | None = None,
            cancel: CancelHooks = NO_CANCEL) -> tuple[Any, bool]:
        """The pipeline for ``key`` and whether it was already loaded; a load that raises (a
        cancelled download) leaves nothing loaded. ``key.gpus`` > 1 starts the GPU workers too."""
        with self._lock:
            self.release_if_unusable()
            if self._key == key:
                return self._pipe, True
            if self._key is not None and replace(self._key, mode=key.mode) == key:
                log.info("[FlashVSR] switching the loaded %s from %s to %s (DiT and projector kept)",
                         key.version, self._key.mode, key.mode)
                try:
                    self._switch(self._pipe, key)
                except BaseException:
                    self.release("switching the mode failed")   # nothing half-switched stays cached
                    raise
                self._key = key
                return self._pipe, True
            self.release("different weights, device, precision or GPU count requested")
            gpus = f", the DiT on {key.gpus} processes" if key.gpus > 1 else ""
            log.info("[FlashVSR] loading %s %s on %s (%s%s)", key.version, key.mode, key.device, key.dtype, gpus)
            self._pipe = self._load(key, on_download) if key.gpus == 1 else self._start(key, on_download, cancel)
            self._key = key
            return self._pipe, False

    def release_if_unusable(self) -> bool:
        """Release a pipeline that cannot run again (its GPU workers stopped or out of step)."""
        with self._lock:
            check = getattr(self._pipe, "unusable", None)
            why = check() if check is not None else None
            return self.release(why) if why else False

    def release(self, reason: str) -> bool:
        """Free the loaded pipeline's device memory; True if one was loaded."""
        with self._lock:
            if self._pipe is None:
                return False
            pipe, key = self._pipe, self._key
            self._pipe, self._key = None, None
            log.info("[FlashVSR] unloading %s %s from %s: %s", key.version, key.mode, key.device, reason)
            pipe.unload()
            return True


def resolve_device(choice: str, auto_device: str) -> str:
    """``auto`` means ComfyUI's device; an explicit device must exist on this machine."""
    try:
        return _resolve_device(choice, auto=auto_device, flag="device")
    except ValueError as err:
        raise ValueError(f"FlashVSR ⚡: {err}") from None


@dataclass(frozen=True)
class RunOutcome:
    frames: torch.Tensor
    lines: tuple[str, ...]  # the UI text shown on the node


def run_upscale(frames: torch.Tensor, settings: NodeSettings, *, cache: PipelineCache,
                roots: Sequence[str], auto_device: str, on_progress: Progress,
                sage_status: Callable[[], dict], on_download: DownloadProgress | None = None,
                cancel: CancelHooks = NO_CANCEL) -> RunOutcome:
    """Upscale ``frames`` (N, H, W, 3) with ``settings``; ``on_progress`` and ``on_download`` may
    raise to cancel; ``cancel`` also reaches the GPU workers of ``settings.gpus`` > 1."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[0] == 0:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError("FlashVSR ⚡ needs video frames as an IMAGE batch (frames, height, width, "
                         f"channels) with at least one frame; got {shape}")
    device = resolve_device(settings.device, auto_device)
    problem = gpus_problem(settings.gpus, device, devices.cuda_count())
    if problem:
        raise ValueError(f"FlashVSR ⚡: {problem}")
    key = LoadKey(tuple(str(r) for r in roots), settings.version, settings.mode, device,
                  resolve_precision(settings.precision, device), settings.gpus)
    config = settings.upscale_config()
    from ..flashvsr.engine.frames import BadFrames
    from ..flashvsr.engine.loader import CheckpointMismatch
    from ..flashvsr.engine.stream import NonFiniteOutput
    t0 = time.perf_counter()
    try:
        pipe, reused = cache.get(key, on_download, cancel)
        load_line = "weights: already loaded" if reused else \
            f"weights: loaded in {time.perf_counter() - t0:.1f} s"
        # the GPU workers' watchdog also needs Cancel (see workers.py)
        extra = {"cancel": cancel} if key.gpus > 1 else {}
        result = pipe.upscale(frames, config, on_progress=on_progress, **extra)
    except (BadFrames, CheckpointMismatch, NonFiniteOutput) as err:
        raise ValueError(f"FlashVSR ⚡: {err}") from None     # the whole story: no engine traceback
    finally:
        # With keep_model_loaded on, a cancelled or failed run keeps the model as well: the engine
        # frees only the run's own tensors, so the next run needs no reload. GPU workers that
        # stopped or fell out of step are released now, so none is left running.
        if not settings.keep_model_loaded:
            cache.release("keep_model_loaded is off")
        else:
            cache.release_if_unusable()
    out = result.frames
    n, h, w = frames.shape[:3]
    if settings.preprocess == "exact":
        expected = (n, round(h * settings.scale), round(w * settings.scale), 3)
        if tuple(out.shape) != expected:
            raise RuntimeError(f"FlashVSR ⚡: the engine returned frames of shape {tuple(out.shape)} "
                               f"instead of {expected}; please report this with your input size")
    lines = [
        result.stats.summary(),
        f"{settings.version} {settings.mode} x{settings.scale:g}: {n}x{w}x{h} -> "
        f"{out.shape[0]}x{out.shape[2]}x{out.shape[1]} frames, {key.dtype} on {device}" + dit_split(key),
        load_line + ("; unloaded after the run" if not settings.keep_model_loaded else ""),
    ]
    why_not = sage_not_used_reason(settings.sageattention, result.stats.attention, sage_status)
    if why_not:
        lines.insert(1, why_not)
    return RunOutcome(out, tuple(lines))


def dit_split(key: LoadKey) -> str:
    """The report's note on how many GPUs ran the DiT (nothing for one)."""
    if key.gpus == 1:
        return ""
    what = "GPUs" if key.device.startswith("cuda") else "CPU processes"
    return f"; the DiT on {key.gpus} {what}"


def sage_not_used_reason(requested: str, attention_line: str,
                         sage_status: Callable[[], dict]) -> str | None:
    """Why SageAttention did not run although it was requested; None when it ran or was not asked."""
    if requested != SageAttention.ENABLE or "sage" in attention_line.lower():
        return None
    status = sage_status()
    if not status.get("installed"):
        why = status.get("reason") or "import failed"
        return f"SageAttention requested but not used: not installed ({why})"
    return ("SageAttention requested but not used: installed "
            f"({status.get('version') or 'unknown version'}) but no attention call here was eligible "
            "(it needs a CUDA GPU and fp16/bf16); see the server log")



def enable_plan(device: str, dispatcher: Any = None) -> dict[str, str]:
    """What ``sageattention`` will run on ``device`` (a resolved device), as the badge says it.

    ``enable`` is more than the SageAttention package: on Hopper it also runs our INT8 block-sparse
    Triton kernel, which needs only triton. The dispatcher answers, so the badge and the run agree.
    """
    from ..attention import AttentionDispatcher
    from ..attention.probe import probe_triton

    dev = torch.device(device)
    d = dispatcher or AttentionDispatcher()
    disable = "sageattention off: PyTorch attention"
    if dev.type != "cuda":
        return {"enable": f"{dev.type.upper()}: PyTorch attention", "disable": disable, "sage": "none"}
    d.capability(dev)  # remembered, so the speed rule below knows this GPU
    sage = d.sage
    int8 = d.uses_int8(SageAttention.ENABLE.value, dev) and probe_triton().available
    dense = sage.available and (d.sage_slower_than_sdpa() is None or d.config.dense_sage_where_slower)
    name = f"SageAttention {sage.version or sage.flavour}" if sage.available else ""
    if int8 and dense:
        text = f"⚡ INT8 sparse kernel + {name}"
    elif int8:
        text = "⚡ INT8 sparse kernel; dense: PyTorch" + ("" if sage.available else " (SageAttention not installed)")
    elif dense:
        text = f"⚡ {name} for dense attention; sparse: PyTorch"
    else:
        text = "PyTorch attention: " + ("SageAttention not installed" if not sage.available
                                        else "no Sage kernel is faster on this GPU")
    return {"enable": text, "disable": disable, "sage": "full" if int8 and dense else
            "partial" if int8 or dense else "none"}
