"""What every ``flashvsr`` subcommand shares: where the models live, the device, the precision and
the engine options. The subcommands import this module; it imports none of them."""
from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from .. import config

log = logging.getLogger(__name__)


def default_models_roots() -> list[Path]:
    """``$FLASHVSR_MODELS`` if set, else ``~/.cache/flashvsr/models``."""
    env = os.environ.get("FLASHVSR_MODELS")
    return [Path(env).expanduser()] if env else [Path.home() / ".cache" / "flashvsr" / "models"]


def resolve_device(name: str) -> str:
    """``--device`` -> a torch device string (see ``flashvsr.devices``); warns when auto means the CPU."""
    from ..devices import resolve_device as resolve
    device = resolve(name, flag="--device")
    if name == "auto" and device == "cpu":
        log.warning("no CUDA GPU found: running on the CPU, which is far too slow for real videos "
                    "(run `flashvsr doctor` to see why CUDA is unavailable)")
    return device


def pixels(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 768x1408, got {text!r}") from None
    return h, w


def latent_units(hw: tuple[int, int], flag: str) -> tuple[int, int]:
    """Output pixels -> latent units of the Wan VAE (8 pixels each)."""
    if hw[0] % 8 or hw[1] % 8 or min(hw) < 8:
        raise ValueError(f"{flag} must be multiples of 8 pixels, got {hw[0]}x{hw[1]}")
    return hw[0] // 8, hw[1] // 8


def add_weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default="v1.1", choices=[v.value for v in config.Version],
                   help="weights version: v1.1 (default, more stable) or v1")


def pack_version() -> str:
    """This pack's version: the checkout's pyproject.toml (ComfyUI runs the pack from a clone), else
    the installed distribution's metadata."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^version\s*=\s*"([^"]+)"', pyproject.read_text(encoding="utf-8"), re.M)
        if found:
            return found.group(1)
    from importlib import metadata
    try:
        return metadata.version("flashvsr-bolt")
    except metadata.PackageNotFoundError:
        return "unknown"


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by ``upscale`` and ``bench``: which engine, on what."""
    d = config.UpscaleConfig()
    add_weights_argument(p)
    p.add_argument("--sageattention", default=d.sageattention, choices=config.SAGE_CHOICES,
                   help="enable: Sage-style quantised attention where it is faster (our INT8 block-sparse "
                        "kernel on Hopper; SageAttention for dense calls where installed, eligible and not "
                        "slower than SDPA); disable: bf16 attention only")
    add_int8_values_argument(p)
    p.add_argument("--device", default="auto", help="auto (CUDA if available, else MPS, else CPU), cuda, "
                                                     "cuda:1, mps, cpu")
    p.add_argument("--precision", default="auto", choices=config.PRECISIONS,
                   help="compute dtype; auto: bf16 (the official setting) on GPUs that support it, "
                        "fp16 on older GPUs and MPS, fp32 on CPU")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="models folder (repeatable; default $FLASHVSR_MODELS or "
                        "~/.cache/flashvsr/models; a ComfyUI models/FlashVSR folder works)")
    add_gpus_argument(p)


def add_int8_values_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8-kv-values", dest="kv_int8_values", action="store_true",
                   help="keep the KV cache's values in int8 too, always (about a third less cache memory, "
                        "~8%% slower at 4K; the same accuracy as int8 keys). Without it they are used only "
                        "where they keep a run untiled within --vram-budget. Takes effect only where the INT8 "
                        "block-sparse kernel runs (--sageattention enable, Hopper, no FA4); ignored "
                        "elsewhere, with the reason logged")


def add_gpus_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="split the DiT over N GPUs of this machine, one process each (same frames as one "
                        "GPU; the 12 heads allow 2, 3, 4, 6 or 12). Under torchrun leave it out. With "
                        "--device cpu: N CPU processes (a test of the parallel path, not a speed-up)")
    p.add_argument("--rank0-share", type=float, default=1.0, metavar="S",
                   help="with several GPUs: GPU 0's share of the DiT's token windows relative to another "
                        "GPU's (default 1; below 1 leaves GPU 0 time for the upsampling and colour fix, "
                        "which only it runs; the projector and decoder bands stay even; the frames are the "
                        "same for any value)")
