"""What the two FlashVSR ⚡ nodes accept, as plain data, and how it becomes engine settings.

Nothing here imports ComfyUI, so the tests check ids, widget order, tooltips, ranges and validation
directly; ``nodes/schema.py`` turns these specs into ``comfy_api`` inputs inside ComfyUI.

Widget order is permanent: UI workflows store widget values by position, so inputs are only ever
appended, never reordered, renamed or removed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from ..flashvsr.config import (COLOR_FIXES, MODES, PRECISIONS, PREPROCESS_MODES, SAGE_CHOICES, TILE_MIN,
                               TILE_STEP, VERSIONS, SageAttention, UpscaleConfig, max_tile_overlap,
                               tile_problems)

NODE_ID_BASIC = "FlashVSRBolt"
NODE_ID_ADVANCED = "FlashVSRBoltAdvanced"
DISPLAY_BASIC = "FlashVSR ⚡"
DISPLAY_ADVANCED = "FlashVSR ⚡ Advanced"
CATEGORY = "FlashVSR"
MODELS_FOLDER = "FlashVSR"  # the folder_paths key and the folder name under ComfyUI/models
# example_workflows/<title>.json: the front end titles a pack's templates by their file name.
EXAMPLE_WORKFLOWS = {"basic": "FlashVSR upscale a video (Tiny, 4x)",
                     "advanced": "FlashVSR Advanced, every option (Tiny-Long)"}

PRESETS = {"Tiny": "tiny", "Tiny-Long": "tiny-long", "Full": "full"}
# The device dropdown lists what exists on the server (``device_choices``, asked when ComfyUI builds
# the node list); these are the entries every machine has.
BASE_DEVICES = ("auto", "cpu")
# GPU counts the DiT can be split over: its 12 attention heads must split evenly
# (models/sequence_parallel.check_heads); the dropdown offers those this server has GPUs for.
DIT_HEADS = 12
GPU_COUNTS = tuple(n for n in range(1, DIT_HEADS + 1) if DIT_HEADS % n == 0)
SEED_MAX = 0xFFFF_FFFF_FFFF_FFFF
VAE_PIXELS_PER_LATENT = 8

_DEFAULTS = UpscaleConfig()


@dataclass(frozen=True)
class Widget:
    """One node input. ``kind`` is the ComfyUI type: IMAGE, COMBO, INT, FLOAT or BOOLEAN."""

    kind: str
    id: str
    tooltip: str
    default: Any = None
    options: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    step: float | None = None
    label_on: str | None = None
    label_off: str | None = None
    control_after_generate: str | None = None  # INT only: the front end's fixed/randomize switch
    machine_options: bool = False  # COMBO whose options depend on the server (checked at run time)
    optional: bool = False  # may be missing from a prompt (appended after API workflows were saved)


def _frames() -> Widget:
    return Widget("IMAGE", "frames", "Video frames as an IMAGE batch (frames, height, width, 3), e.g. "
                  "from Get Video Components or Load Video. Every frame comes back, at scale times the size.")


def _scale(step: float) -> Widget:
    return Widget("FLOAT", "scale", "Output size / input size. FlashVSR is trained for 4x; 2x-4x work "
                  "well. The output is exactly round(height*scale) x round(width*scale).",
                  default=_DEFAULTS.scale, min=1.0, max=4.0, step=step)


def _seed() -> Widget:
    return Widget("INT", "seed", "Seed of the single denoising step's noise. The official runs use 0; "
                  "other values give slightly different fine detail.", default=_DEFAULTS.seed,
                  min=0, max=SEED_MAX, step=1, control_after_generate="fixed")


BASIC_INPUTS: tuple[Widget, ...] = (
    _frames(),
    Widget("COMBO", "preset", "Tiny: fast, TCDecoder. Tiny-Long: same result as Tiny with flat VRAM "
           "for long videos (each chunk leaves the GPU at once). Full: Wan 2.1 VAE decoder, best "
           "quality, slowest and most VRAM. All use the v1.1 weights, downloaded on first use.",
           default="Tiny", options=tuple(PRESETS)),
    _scale(0.5),
    _seed(),
)

ADVANCED_INPUTS: tuple[Widget, ...] = (
    _frames(),
    Widget("COMBO", "version", "Weights: v1.1 (Nov 2025, more stable, fewer artifacts) or the "
           "original v1. Each version is its own download into models/FlashVSR/<version>/.",
           default="v1.1", options=tuple(reversed(VERSIONS))),
    Widget("COMBO", "mode", "tiny: TCDecoder, fast. tiny-long: same output as tiny, flat VRAM for "
           "long videos. full: Wan 2.1 VAE decoder, best quality, slowest, most VRAM. Switching only "
           "the mode keeps the DiT loaded.", default="tiny", options=MODES),
    _scale(0.1),
    Widget("COMBO", "sageattention", "enable: Sage-style quantised attention where it is faster: our "
           "INT8 block-sparse kernel on Hopper GPUs, SageAttention for the dense calls where it is "
           "installed, eligible and not slower than PyTorch (the node reports what ran and why). "
           "disable: bf16 attention only. The badge above the node says what enable runs on this server.",
           default=SageAttention.ENABLE.value, options=SAGE_CHOICES),
    Widget("COMBO", "color_fix", "Match each output frame's colours to the input frame. adain: "
           "official (per-channel mean and std). wavelet: keeps the input's low frequencies; try it "
           "when colours shift. none: raw model output.", default=_DEFAULTS.color_fix,
           options=COLOR_FIXES),
    Widget("FLOAT", "sparse_ratio", "Sparse-attention budget: about sparse_ratio x 60 key blocks per "
           "query block. 2.0 official and most stable; 1.5 faster; higher is denser and slower.",
           default=_DEFAULTS.sparse_ratio, min=0.5, max=8.0, step=0.1),
    # An INT since only whole groups count; workflows saved with the former FLOAT (3.0) still load.
    Widget("INT", "kv_ratio", "How many past 2-latent-frame groups the attention cache keeps. "
           "3 official; fewer = less VRAM, less temporal stability.",
           default=int(_DEFAULTS.kv_ratio), min=1, max=8, step=1),
    Widget("INT", "local_range", "Side of the local attention window in 128-token blocks. 11 "
           "official (more stable), 9 sharper details.", default=_DEFAULTS.local_range,
           min=1, max=63, step=2),
    Widget("INT", "tile_size", "Spatial tiling of the DiT in output pixels, 0 = off (best quality). "
           "Otherwise a multiple of 128, at least 256: lowers VRAM for very large outputs; tiles are "
           "blended, seams are possible.", default=_DEFAULTS.tile_size, min=0, max=8192, step=TILE_STEP),
    Widget("INT", "tile_overlap", "Overlap of neighbouring spatial tiles in output pixels; must be "
           "less than half of tile_size. Hidden while tile_size is 0.",
           default=_DEFAULTS.tile_overlap, min=0, max=4096, step=8),
    Widget("BOOLEAN", "vae_tiling", "full mode only: decode with the Wan VAE in overlapping tiles to "
           "cut decoder VRAM (the official runs decode untiled). Hidden in tiny and tiny-long.",
           default=_DEFAULTS.vae_tiling, label_on="tiled", label_off="untiled"),
    Widget("INT", "vae_tile_height", "VAE tile height in output pixels (multiple of 8).",
           default=_DEFAULTS.vae_tile[0] * VAE_PIXELS_PER_LATENT, min=64, max=8192, step=8),
    Widget("INT", "vae_tile_width", "VAE tile width in output pixels (multiple of 8).",
           default=_DEFAULTS.vae_tile[1] * VAE_PIXELS_PER_LATENT, min=64, max=8192, step=8),
    Widget("INT", "vae_stride_height", "Vertical step between VAE tiles in output pixels; at most "
           "the tile height (smaller = more overlap, smoother seams, slower).",
           default=_DEFAULTS.vae_stride[0] * VAE_PIXELS_PER_LATENT, min=8, max=8192, step=8),
    Widget("INT", "vae_stride_width", "Horizontal step between VAE tiles in output pixels; at most "
           "the tile width.", default=_DEFAULTS.vae_stride[1] * VAE_PIXELS_PER_LATENT,
           min=8, max=8192, step=8),
    Widget("COMBO", "precision", "Compute dtype. auto: bf16 on GPUs that support it, else fp16; "
           "fp16 on MPS, fp32 on CPU. The official weights run in bf16.", default="auto", options=PRECISIONS),
    Widget("COMBO", "device", "auto: ComfyUI's device (honours --cpu, --cuda-device). Or pick one "
           "of the devices this server has.", default="auto", options=BASE_DEVICES, machine_options=True),
    Widget("BOOLEAN", "keep_model_loaded", "Keep the weights on the device for the next run "
           "(fast re-runs) or free them when this run ends. ComfyUI's 'Unload models' and "
           "'Free model and node cache' also free them.", default=True,
           label_on="keep loaded", label_off="unload after run"),
    Widget("COMBO", "preprocess", "exact: N frames in, N frames out at exactly scale times the "
           "size (edges padded internally). official: the reference scripts' centre crop to "
           "multiples of 128 and 8n-3 frames (for comparisons with published results).",
           default=_DEFAULTS.preprocess, options=PREPROCESS_MODES),
    Widget("BOOLEAN", "compile", "CUDA only: compile the DiT's small elementwise steps with "
           "torch.compile (faster after a warm-up on the first run; falls back to eager where it "
           "cannot compile). Off: no compile warm-up.", default=_DEFAULTS.compile,
           label_on="compile", label_off="eager"),
    _seed(),
    Widget("FLOAT", "vram_budget_gib", "GPU memory this run may use, in GiB; 0 = auto (the free memory). "
           "The run is planned for it: untiled when it fits (with sageattention enable on Hopper, also "
           "untiled with the KV cache's values in int8 when only that fits), else spatial tiles "
           "(tile_size > 0 wins); the node's report gives the plan and its predicted peak.",
           default=0.0, min=0.0, max=1024.0, step=0.5),
    # A dropdown, so ComfyUI itself refuses a count this server cannot run, on this input alone
    # (a validator's message would land on every input it names). Optional: API prompts saved
    # before it existed still run, on one GPU.
    Widget("COMBO", "gpus", "How many of this server's GPUs run the DiT: 1 = this GPU only. More "
           "split its attention heads over them (2, 3, 4, 6 or 12, up to the GPUs this server sees): "
           "the same result within bf16 rounding, faster; the projector and decoder split the frame into "
           "row bands over them. The other GPUs run worker processes that the node starts and keeps while the model "
           "stays loaded. Hidden when the server has one GPU.", default="1", options=tuple(map(str, GPU_COUNTS)),
           machine_options=True, optional=True),
)


@dataclass(frozen=True)
class NodeSettings:
    """Validated values of one node run, before any device is resolved."""

    version: str = "v1.1"
    mode: str = "tiny"
    scale: float = _DEFAULTS.scale
    sageattention: str = _DEFAULTS.sageattention
    color_fix: str = _DEFAULTS.color_fix
    sparse_ratio: float = _DEFAULTS.sparse_ratio
    kv_ratio: int = int(_DEFAULTS.kv_ratio)
    local_range: int = _DEFAULTS.local_range
    tile_size: int = _DEFAULTS.tile_size
    tile_overlap: int = _DEFAULTS.tile_overlap
    vae_tiling: bool = _DEFAULTS.vae_tiling
    vae_tile_height: int = _DEFAULTS.vae_tile[0] * VAE_PIXELS_PER_LATENT
    vae_tile_width: int = _DEFAULTS.vae_tile[1] * VAE_PIXELS_PER_LATENT
    vae_stride_height: int = _DEFAULTS.vae_stride[0] * VAE_PIXELS_PER_LATENT
    vae_stride_width: int = _DEFAULTS.vae_stride[1] * VAE_PIXELS_PER_LATENT
    precision: str = "auto"
    device: str = "auto"
    keep_model_loaded: bool = True
    seed: int = _DEFAULTS.seed
    preprocess: str = _DEFAULTS.preprocess
    compile: bool = _DEFAULTS.compile
    vram_budget_gib: float = 0.0       # 0 = "auto"
    gpus: int = 1                      # processes (GPUs) the DiT is split over; checked when the node runs

    def __post_init__(self) -> None:
        problems = problems_with(ADVANCED_INPUTS, {f.name: getattr(self, f.name) for f in fields(self)})
        if problems:
            raise ValueError("FlashVSR ⚡: " + "; ".join(problems))

    def upscale_config(self) -> UpscaleConfig:
        px = VAE_PIXELS_PER_LATENT
        return UpscaleConfig(
            scale=float(self.scale), sparse_ratio=float(self.sparse_ratio),
            kv_ratio=float(int(self.kv_ratio)), local_range=int(self.local_range),
            color_fix=self.color_fix, seed=int(self.seed), sageattention=self.sageattention,
            preprocess=self.preprocess, compile=bool(self.compile), tile_size=int(self.tile_size),
            tile_overlap=int(self.tile_overlap), vae_tiling=bool(self.vae_tiling),
            vae_tile=(self.vae_tile_height // px, self.vae_tile_width // px),
            vae_stride=(self.vae_stride_height // px, self.vae_stride_width // px),
            vram_budget=float(self.vram_budget_gib) or "auto")


def basic_settings(preset: str, scale: float, seed: int) -> NodeSettings:
    """The basic node: a preset picks the mode, everything else is the official default."""
    if preset not in PRESETS:
        raise ValueError(f"FlashVSR ⚡: unknown preset {preset!r}; choose one of {list(PRESETS)}")
    return NodeSettings(mode=PRESETS[preset], scale=scale, seed=seed)


def advanced_settings(**values: Any) -> NodeSettings:
    """The Advanced node: every widget value by name (frames excluded)."""
    unknown = sorted(set(values) - {f.name for f in fields(NodeSettings)})
    if unknown:
        raise TypeError(f"FlashVSR ⚡ Advanced got unknown inputs {unknown}")
    if "gpus" in values:     # the dropdown's entries are text ("2")
        values = {**values, "gpus": _whole_number("gpus", values["gpus"])}
    return NodeSettings(**values)


def advanced_inputs() -> tuple[Widget, ...]:
    """``ADVANCED_INPUTS`` with the server's own devices in ``device`` and its GPU counts in ``gpus``."""
    machine = {"device": device_choices, "gpus": gpu_choices}
    return tuple(replace(w, options=machine[w.id]()) if w.machine_options else w for w in ADVANCED_INPUTS)


def device_choices() -> tuple[str, ...]:
    from ..flashvsr.devices import existing_devices

    return BASE_DEVICES + tuple(d for d in existing_devices() if d not in BASE_DEVICES)


def gpu_choices(visible: int | None = None) -> tuple[str, ...]:
    """The ``gpus`` entries for a server that sees ``visible`` CUDA GPUs (default: this one)."""
    if visible is None:
        from ..flashvsr.devices import cuda_count
        visible = cuda_count()
    return tuple(str(n) for n in GPU_COUNTS if n <= max(1, visible))


def gpus_problem(gpus: int, device: str, visible: int) -> str | None:
    """What is wrong with splitting the DiT over ``gpus`` processes with rank 0 on ``device`` (a
    resolved device) on a server that sees ``visible`` CUDA GPUs; None when it runs."""
    if gpus == 1:
        return None
    if gpus not in GPU_COUNTS:
        return (f"gpus is {gpus}; the DiT's {DIT_HEADS} attention heads split evenly only over "
                f"{', '.join(map(str, GPU_COUNTS))} GPUs")
    if gpus > visible:
        return (f"gpus is {gpus}, but this server sees {visible} CUDA GPU{'s' * (visible != 1)}; "
                f"choose one of {list(gpu_choices(visible))}")
    kind = device.partition(":")[0]
    if kind not in ("cuda", "cpu"):       # cpu: gloo processes, a test of the same path
        return f"gpus is {gpus}, but device {device} is not a CUDA GPU; several GPUs need CUDA"
    if kind == "cuda":
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_nccl_available()):
            return f"gpus is {gpus}, but this PyTorch has no NCCL (several GPUs need Linux and a CUDA build)"
    return None


def _whole_number(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"FlashVSR ⚡: {name} is {value!r}; choose a whole number") from None


def cross_field_problems(values: Mapping[str, Any]) -> dict[str, str]:
    """The rules that relate inputs, by the input each broken rule is about; None = linked, not known."""
    problems = {}
    tile = values.get("tile_size")
    if tile is not None:
        problems |= tile_problems(tile, values.get("tile_overlap"))
    for axis in ("height", "width"):
        size, stride = values.get(f"vae_tile_{axis}"), values.get(f"vae_stride_{axis}")
        for name, v in ((f"vae_tile_{axis}", size), (f"vae_stride_{axis}", stride)):
            if v is not None and v % VAE_PIXELS_PER_LATENT:
                problems[name] = f"{name} is {v}; use a multiple of {VAE_PIXELS_PER_LATENT}"
        if size is not None and stride is not None and stride > size and f"vae_stride_{axis}" not in problems:
            problems[f"vae_stride_{axis}"] = (f"vae_stride_{axis} ({stride}) is larger than vae_tile_{axis} "
                                              f"({size}), which would leave gaps; use a stride of at most the tile")
    return problems


def tile_size_problem(tile_size: int | None) -> str | None:
    """What is wrong with ``tile_size`` on its own (its range, and 0 or a multiple of 128 from 256)."""
    if tile_size is None:
        return None
    [widget] = [w for w in ADVANCED_INPUTS if w.id == "tile_size"]
    if not widget.min <= tile_size <= widget.max:
        return f"tile_size is {tile_size}; it must be between {_num(widget.min)} and {_num(widget.max)}"
    return tile_problems(tile_size, None).get("tile_size")


def tile_overlap_limits() -> dict[str, int]:
    """The largest ``tile_overlap`` for every ``tile_size`` the node takes, for the front end, which
    keeps ``tile_overlap`` in range as the user edits (ComfyUI cannot check one input against another
    and report it on one widget)."""
    [widget] = [w for w in ADVANCED_INPUTS if w.id == "tile_size"]
    return {str(size): max_tile_overlap(size) for size in range(TILE_MIN, int(widget.max) + 1, TILE_STEP)}


def problems_with(spec: tuple[Widget, ...], values: Mapping[str, Any]) -> list[str]:
    """Every range, choice and cross-field problem in ``values``; None means "linked, not known yet".

    One message per problem, naming the input, the value and what to do, so a user can fix them all
    in one go.
    """
    problems = []
    for w in spec:
        value = values.get(w.id)
        if value is None or w.kind == "IMAGE" or w.machine_options:
            continue  # the device is resolved (and a missing one named) when the node runs
        if w.kind == "COMBO" and value not in w.options:
            problems.append(f"{w.id} is {value!r}; choose one of {list(w.options)}")
        elif w.kind in ("INT", "FLOAT") and not w.min <= value <= w.max:
            problems.append(f"{w.id} is {value}; it must be between {_num(w.min)} and {_num(w.max)}")
    return problems + list(cross_field_problems(values).values())


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
