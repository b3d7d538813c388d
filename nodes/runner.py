"""One node run without ComfyUI: resolve device and dtype, reuse or load the pipeline, upscale, report.

The ComfyUI side (``nodes/comfy_glue.py``) only supplies the model folders, ComfyUI's device,
progress callbacks (upscale and first-use download) that also raise on Cancel, and converts the result; everything that decides
behaviour lives here so the tests drive it directly.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .options import NodeSettings

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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


def load_pipeline(key: LoadKey, on_download: DownloadProgress | None = None) -> Any:
    """Load (downloading missing official files first) the engine pipeline for ``key``."""
    from ..flashvsr.pipeline import FlashVSR  # the engine pulls in the networks: only on first use

    return FlashVSR.from_pretrained(list(key.roots), mode=key.mode, version=key.version,
                                    device=key.device, dtype=DTYPES[key.dtype], download=True,
                                    progress=on_download)


class PipelineCache:
    """Holds at most one loaded pipeline: a second one would double the VRAM for a rare gain.

    ComfyUI runs prompts on one worker thread, but ``release`` is also reached from ComfyUI's
    "free memory" path, which other packs may trigger from elsewhere, hence the lock.
    """

    def __init__(self, load: Callable[[LoadKey, DownloadProgress | None], Any] = load_pipeline) -> None:
        self._load = load
        self._lock = threading.RLock()
        self._key: LoadKey | None = None
        self._pipe: Any = None

    @property
    def key(self) -> LoadKey | None:
        return self._key

    def get(self, key: LoadKey, on_download: DownloadProgress | None = None) -> tuple[Any, bool]:
        """The pipeline for ``key`` and whether it was already loaded; a load that raises (a
        cancelled download) leaves nothing loaded."""
        with self._lock:
            if self._key == key:
                return self._pipe, True
            self.release("different weights, device or precision requested")
            log.info("[FlashVSR] loading %s %s on %s (%s)", key.version, key.mode, key.device, key.dtype)
            self._pipe = self._load(key, on_download)
            self._key = key
            return self._pipe, False

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
    if choice == "auto":
        return auto_device
    if choice == "cpu":
        return "cpu"
    if choice == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"FlashVSR ⚡: device 'mps' is not available here; {_existing_devices()}")
        return "mps"
    index = int(choice.split(":", 1)[1])
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        raise ValueError(f"FlashVSR ⚡: device {choice!r} does not exist; {_existing_devices()}")
    return choice


def _existing_devices() -> str:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    found = ["cpu"] + [f"cuda:{i}" for i in range(count)]
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        found.append("mps")
    return f"devices on this machine: {', '.join(found)} (or choose 'auto')"


def resolve_precision(choice: str, device: str) -> str:
    """``auto``: bf16 (the official dtype) where the GPU has it, fp16 on older GPUs and MPS, fp32 on CPU."""
    if choice != "auto":
        return choice
    if device.startswith("cuda"):
        index = int(device.split(":", 1)[1]) if ":" in device else torch.cuda.current_device()
        return "bf16" if torch.cuda.get_device_capability(index)[0] >= 8 else "fp16"
    if device.startswith("mps"):
        return "fp16"
    return "fp32"


@dataclass(frozen=True)
class RunOutcome:
    frames: torch.Tensor
    lines: tuple[str, ...]  # the UI text shown on the node


def run_upscale(frames: torch.Tensor, settings: NodeSettings, *, cache: PipelineCache,
                roots: Sequence[str], auto_device: str, on_progress: Progress,
                sage_status: Callable[[], dict], on_download: DownloadProgress | None = None) -> RunOutcome:
    """Upscale ``frames`` (N, H, W, 3) with ``settings``; ``on_progress`` and ``on_download`` may
    raise to cancel."""
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[0] == 0:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError("FlashVSR ⚡ needs video frames as an IMAGE batch (frames, height, width, "
                         f"channels) with at least one frame; got {shape}")
    device = resolve_device(settings.device, auto_device)
    key = LoadKey(tuple(str(r) for r in roots), settings.version, settings.mode, device,
                  resolve_precision(settings.precision, device))
    config = settings.upscale_config()
    from ..flashvsr.engine.frames import BadFrames
    from ..flashvsr.engine.loader import CheckpointMismatch
    from ..flashvsr.engine.stream import NonFiniteOutput
    t0 = time.perf_counter()
    try:
        pipe, reused = cache.get(key, on_download)
        load_line = "weights: already loaded" if reused else \
            f"weights: loaded in {time.perf_counter() - t0:.1f} s"
        result = pipe.upscale(frames, config, on_progress=on_progress)
    except (BadFrames, CheckpointMismatch, NonFiniteOutput) as err:
        raise ValueError(f"FlashVSR ⚡: {err}") from None     # the whole story: no engine traceback
    finally:
        # With keep_model_loaded on, a cancelled or failed run keeps the model as well: the engine
        # frees only the run's own tensors, so the next run needs no reload.
        if not settings.keep_model_loaded:
            cache.release("keep_model_loaded is off")
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
        f"{out.shape[0]}x{out.shape[2]}x{out.shape[1]} frames, {key.dtype} on {device}",
        load_line + ("; unloaded after the run" if not settings.keep_model_loaded else ""),
    ]
    why_not = sage_not_used_reason(settings.sageattention, result.stats.attention, sage_status)
    if why_not:
        lines.insert(1, why_not)
    return RunOutcome(out, tuple(lines))


def sage_not_used_reason(requested: str, attention_line: str,
                         sage_status: Callable[[], dict]) -> str | None:
    """Why SageAttention did not run although it was requested; None when it ran or was not asked."""
    if requested != "enable" or "sage" in attention_line.lower():
        return None
    status = sage_status()
    if not status.get("installed"):
        why = status.get("reason") or "import failed"
        return f"SageAttention requested but not used: not installed ({why})"
    return ("SageAttention requested but not used: installed "
            f"({status.get('version') or 'unknown version'}) but no attention call here was eligible "
            "(it needs a CUDA GPU and fp16/bf16); see the server log")

