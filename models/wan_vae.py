"""Wan 2.1 VAE decoder for FlashVSR "Full": strict weight subset, streaming and tiled decode.

Semantics are those of FlashVSR's ``diffsynth/models/wan_video_vae.py`` (``b527c6f``,
docs/model.md §10.2); the code is our own. Layers live in ``wan_vae_blocks.py``.

Use::

    vae = WanVAEDecoder.from_state_dict(torch.load(path, weights_only=True), device="cuda")
    state = vae.new_state()                      # WanVAEDecodeOptions(tiling=VAETiling()) to tile
    for latents in chunks:                       # (1, 16, t, h, w), t >= 1, in stream order
        frames = vae.decode_chunk(latents, state)  # (1, 3, n, 8h, 8w) in [-1, 1], weight dtype

``n`` is ``4t - 3`` for the first chunk and ``4t`` after it, so any chunking of T latents yields the
``1 + 4(T-1)`` frames of one whole decode. ``frames`` may be channels-last-3d strided:
``frames[0].permute(1, 2, 3, 0)`` is then a contiguous ``(n, H, W, 3)`` view.

Numerics: ``z / (1/std) + mean`` in the weight dtype (1/std taken in fp32, then cast), ``conv2``;
RMS norms with their two bf16 roundings; nearest x2 (exact in any dtype); zero-padded causal convs
whose history is the last two input frames; the first latent gives one frame (temporal upsamplers
skip it), the second latent's time convs see zero history; clamp. Where the official loop feeds one
latent at a time, we feed all latents of a chunk through each layer at once; ``per_latent=True``
keeps the official loop as the reference. Checked against the official module with random weights
(docs/performance.md, "Parity with the official module"): the contiguous path is bit-identical in
bf16; channels-last (the CUDA default) picks other cuDNN kernels, so it differs by rounding only.

Cost at 768x1408 (latent 96x176), counted from the layer shapes: about 4.5 TMAC (9 TFLOP) per output
frame: ~40 % in the 96-wide full-resolution stage, ~40 % in the 192-wide half-resolution stage, the
rest below. So the decode is bound by the convolutions at the two highest resolutions plus the
elementwise norm/SiLU passes over them (each pass over a 96-channel bf16 frame is 207 MB). For speed:
channels-last-3d on CUDA (cuDNN's NDHWC kernels are much faster than NCDHW here, and every per-frame
reshape becomes a view); each chunk through each layer in one call (split in time only above
``max_pass_elements``); the norm writes straight into the causal conv's input buffer (the official
copies twice: cat, then F.pad); in-place SiLU and residual adds; nearest x2 as a broadcast copy; no
host syncs. Optional ``compiled_norms`` fuses each RMS norm + SiLU into one kernel.

Timings and peaks against the official ``decode`` are in docs/performance.md, "Wan VAE decoder".
Memory: the causal histories hold 2 frames per conv (5.1 GB in bf16 at 768x1408, as in the official
code) plus one pass's activations (``max_pass_elements``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .tile_batch import split_convs
from .wan_vae_blocks import Decoder3d, StepRun

# Per-channel latent statistics of Wan 2.1's VAE: ``mean`` and ``std`` of ``WanVideoVAE.__init__``
# in FlashVSR diffsynth/models/wan_video_vae.py (b527c6f), the same values as Wan 2.1
# wan/modules/vae.py ``WanVAE``. Latents are normalised as (mu - mean) / std by the encoder.
WAN_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Decoder subset of Wan2.1_VAE.pth at full size (docs/model.md §10.2).
WAN_VAE_DECODER_TENSORS = 108
WAN_VAE_DECODER_PARAMS = 73_295_603

SPATIAL_UPSCALE = 8
# One pass of a layer is split in time above this many activation elements: 4 frames (one latent) of
# the 96-channel stage at 768x1408, 0.8 GB in bf16: as fast as bigger passes at a lower peak, and
# faster than smaller ones (docs/performance.md, "Pass budget").
DEFAULT_MAX_PASS_ELEMENTS = 4 * 96 * 768 * 1408

_ENCODER_ONLY = re.compile(r"^(encoder\.|conv1\.)")
_UPSAMPLE_KEY = re.compile(r"^decoder\.upsamples\.(\d+)\.")


class WanVAECheckpointError(ValueError):
    """The state dict is not a (consistent) Wan 2.1 VAE decoder."""


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_upsample: tuple[bool, ...] = (True, True, False)  # per upsampling stage, top first

    def __post_init__(self) -> None:
        if self.z_dim != len(WAN_LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(WAN_LATENT_MEAN)} (the Wan 2.1 latent statistics "
                             f"have that many channels), got {self.z_dim}; z_dim 48 is Wan 2.2's VAE")
        if len(self.temporal_upsample) != len(self.dim_mult) - 1:
            raise ValueError(f"temporal_upsample needs one flag per upsampling stage "
                             f"({len(self.dim_mult) - 1}), got {self.temporal_upsample}")
        if self.base_dim < 1 or self.num_res_blocks < 0 or min(self.dim_mult) < 1:
            raise ValueError(f"invalid widths: {self}")
        if any(w % 2 for w in self.stage_widths()[:-1]):
            raise ValueError(f"every upsampling stage halves its width, so widths must be even: {self}")

    def stage_widths(self) -> list[int]:
        """Output width of each decoder stage, from the latent end to the image end."""
        return [self.base_dim * m for m in reversed(self.dim_mult)]

    @property
    def time_upscale(self) -> int:
        return 2 ** sum(self.temporal_upsample)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> WanVAEConfig:
        """Infer the widths from decoder tensor shapes (keys without a ``model.`` prefix)."""
        z = _shape(sd, "conv2.weight")
        if len(z) != 5 or z[0] != z[1]:
            raise WanVAECheckpointError(f"conv2.weight has shape {z}; expected (z, z, 1, 1, 1)")
        top = _shape(sd, "decoder.conv1.weight")
        if len(top) != 5 or top[1] != z[0]:
            raise WanVAECheckpointError(
                f"decoder.conv1.weight has shape {top}; expected (width, {z[0]}, 3, 3, 3) to match conv2")
        kinds = _upsample_kinds(sd)
        resamples = [i for i, k in enumerate(kinds) if k == "resample"]
        group = resamples[0] if resamples else len(kinds)
        expected = (["res"] * group + ["resample"]) * len(resamples) + ["res"] * group
        if group == 0 or kinds != expected:
            raise WanVAECheckpointError(
                f"decoder.upsamples layout {kinds} is not stages of equal residual-block counts "
                f"separated by resamplers")
        ends = [i + group - 1 for i in range(0, len(kinds), group + 1)]
        widths = [_shape(sd, f"decoder.upsamples.{i}.residual.6.weight")[0] for i in ends]
        if widths[0] != top[0]:
            raise WanVAECheckpointError(
                f"decoder.conv1.weight outputs {top[0]} channels but the first upsampling stage "
                f"(decoder.upsamples.{ends[0]}.residual.6.weight) is {widths[0]} wide; "
                f"Wan's decoder needs them equal")
        base = math.gcd(*widths)
        temporal = tuple(f"decoder.upsamples.{i}.time_conv.weight" in sd for i in resamples)
        try:
            return cls(base_dim=base, z_dim=z[0], dim_mult=tuple(w // base for w in reversed(widths)),
                       num_res_blocks=group - 1, temporal_upsample=temporal)
        except ValueError as exc:
            raise WanVAECheckpointError(f"decoder shapes give an invalid config: {exc}") from exc


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise WanVAECheckpointError(f"{key} is missing; is this the Wan 2.1 VAE (Wan2.1_VAE.pth)?")
    return tuple(sd[key].shape)


def _upsample_kinds(sd: Mapping[str, torch.Tensor]) -> list[str]:
    indices = sorted({int(m.group(1)) for k in sd if (m := _UPSAMPLE_KEY.match(k))})
    if indices != list(range(len(indices))):
        raise WanVAECheckpointError(f"decoder.upsamples indices are not 0..n-1: {indices}")
    kinds = []
    for i in indices:
        if f"decoder.upsamples.{i}.resample.1.weight" in sd:
            kinds.append("resample")
        elif f"decoder.upsamples.{i}.residual.6.weight" in sd:
            kinds.append("res")
        else:
            raise WanVAECheckpointError(
                f"decoder.upsamples.{i} has neither residual.6.weight (residual block) nor "
                f"resample.1.weight (resampler)")
    return kinds


def decoder_state_dict(raw: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """The decoder subset of a Wan 2.1 VAE state dict, checked key by key against the model.

    Accepts the file as saved (optionally under ``'model_state'``) or DiffSynth's ``model.``-prefixed
    names. Encoder weights (``encoder.*``, ``conv1.*``) are dropped; anything else must be exactly the
    decoder's tensors, or the error names the missing, unexpected and wrongly shaped keys.
    """
    if isinstance(raw.get("model_state"), Mapping):
        raw = raw["model_state"]
    if raw and all(k.startswith("model.") for k in raw):
        raw = {k[len("model."):]: v for k, v in raw.items()}
    sd = {k: v for k, v in raw.items() if not _ENCODER_ONLY.match(k)}
    not_tensors = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise WanVAECheckpointError(f"entries that are not tensors: {not_tensors[:5]}")
    config = WanVAEConfig.from_state_dict(sd)
    with torch.device("meta"):
        want = {k: tuple(t.shape) for k, t in WanVAEDecoder(config).state_dict().items()}
    missing = sorted(want.keys() - sd.keys())
    unexpected = sorted(sd.keys() - want.keys())
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {s}" for k, s in want.items()
           if k in sd and tuple(sd[k].shape) != s]
    if missing or unexpected or bad:
        raise WanVAECheckpointError(
            f"Wan VAE decoder weights do not match {config}: {len(missing)} missing {missing[:5]}; "
            f"{len(unexpected)} unexpected {unexpected[:5]}; {len(bad)} wrong shape {bad[:5]}. "
            f"Use the original Wan2.1_VAE.pth (or a repack with the same key names).")
    return {k: sd[k] for k in want}


@dataclass(frozen=True)
class VAETiling:
    """Spatial tiles in latent units; defaults are the FlashVSR Full pipeline's (480x832 px tiles)."""
    tile: tuple[int, int] = (60, 104)
    stride: tuple[int, int] = (30, 52)

    def __post_init__(self) -> None:
        for size, step in zip(self.tile, self.stride):
            if not 0 < step <= size:
                raise ValueError(f"tile stride must be in 1..tile size (no gaps), got tile {self.tile} "
                                 f"stride {self.stride}")

    def boxes(self, h: int, w: int) -> list[tuple[int, int, int, int]]:
        """(top, bottom, left, right) latent boxes, clipped to the image, in the official order."""
        def starts(n: int, size: int, step: int) -> list[int]:
            # A start is dropped when the previous tile already reaches the end.
            return [s for s in range(0, n, step) if not (s - step >= 0 and s - step + size >= n)]
        (th, tw), (sh, sw) = self.tile, self.stride
        return [(y, min(y + th, h), x, min(x + tw, w))
                for y in starts(h, th, sh) for x in starts(w, tw, sw)]


@dataclass(frozen=True)
class WanVAEDecodeOptions:
    tiling: VAETiling | None = None
    channels_last: bool | None = None  # None: on for CUDA tensors, off elsewhere
    max_pass_elements: int = DEFAULT_MAX_PASS_ELEMENTS
    # CUDA only: RMS norm + SiLU as one torch.compile'd kernel (wan_vae_blocks.compiled_norm_silu).
    compiled_norms: bool = False


@dataclass
class _TileStream:
    box: tuple[int, int, int, int]
    caches: list
    mask: torch.Tensor  # (1, 1, 1, h_px, w_px) float32 blend weights


@dataclass
class WanVAEDecodeState:
    """Everything one decode stream carries between chunks (create with ``new_state``)."""
    options: WanVAEDecodeOptions
    caches: list
    latent_mean: torch.Tensor  # (1, z, 1, 1, 1), weight dtype and device
    latent_inv_std: torch.Tensor
    latents_done: int = 0
    latent_hw: tuple[int, int] | None = None
    batch: int | None = None  # tile streams the caches hold on their batch axis (B of the first chunk)
    tiles: list[_TileStream] = field(default_factory=list)
    tile_weight: torch.Tensor | None = None  # (1, 1, 1, H, W) float32 sum of the tile masks


class WanVAEDecoder(nn.Module):
    """``conv2`` + ``decoder`` of the Wan 2.1 VAE; parameter names equal the checkpoint's."""

    def __init__(self, config: WanVAEConfig = WanVAEConfig()) -> None:
        super().__init__()
        self.config = config
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)

    @classmethod
    def from_state_dict(cls, raw: Mapping[str, object], *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.bfloat16,
                        channels_last: bool | None = None) -> WanVAEDecoder:
        """Build, strictly load and cast (the official run is bf16). ``channels_last`` None: on CUDA."""
        sd = decoder_state_dict(raw)
        with torch.device("meta"):
            model = cls(WanVAEConfig.from_state_dict(sd))
        model.load_state_dict(sd, strict=True, assign=True)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if channels_last if channels_last is not None else model.conv2.weight.is_cuda:
            model.to_channels_last()
        return model

    def to_channels_last(self) -> WanVAEDecoder:
        """Lay conv weights out channels-last so cuDNN does not transpose them on every call."""
        for p in self.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
            elif p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
        return self

    def new_state(self, options: WanVAEDecodeOptions = WanVAEDecodeOptions()) -> WanVAEDecodeState:
        weight = self.conv2.weight
        # fp32 first, then the weight dtype: the official casts mean and 1/std to the latent dtype.
        mean = torch.tensor(WAN_LATENT_MEAN, dtype=torch.float32)
        inv_std = 1.0 / torch.tensor(WAN_LATENT_STD, dtype=torch.float32)
        shape = (1, -1, 1, 1, 1)
        return WanVAEDecodeState(
            options=options, caches=[None] * self.decoder.num_slots,
            latent_mean=mean.to(device=weight.device, dtype=weight.dtype).view(shape),
            latent_inv_std=inv_std.to(device=weight.device, dtype=weight.dtype).view(shape))

    def output_frames(self, t: int, first_chunk: bool) -> int:
        """Frames decoded from ``t`` latents: the stream's first latent gives a single frame."""
        up = self.config.time_upscale
        return up * (t - 1) + 1 if first_chunk else up * t

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, options: WanVAEDecodeOptions = WanVAEDecodeOptions(),
               *, per_latent: bool = False) -> torch.Tensor:
        """Whole-sequence decode: (B, 16, T, h, w) -> (B, 3, 1 + 4(T-1), 8h, 8w)."""
        return self.decode_chunk(latents, self.new_state(options), per_latent=per_latent)

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, state: WanVAEDecodeState, *,
                     per_latent: bool = False, rows=None) -> torch.Tensor:
        """Decode the next ``t`` latents of the stream in ``state``; returns frames in [-1, 1].

        ``per_latent=True`` runs the official loop (one latent per decoder call): the reference
        the batched default is tested against. If this raises (OOM, interrupt), ``state`` is
        half-updated: start the stream again with a new state. ``rows``: the latents are this
        rank's band of latent rows (models/row_bands.py); the frames are then the band's rows.

        B > 1: a batch of spatial tiles of one shape, each its own stream (the caches in ``state``
        hold B frames on their batch axis; keep B for the whole stream). Off CUDA the
        convolutions run tile by tile (tile_batch.PerTile): each tile's frames are bitwise those
        of the tile alone.
        """
        self._check_chunk(latents, state)
        opts = state.options
        use_cl = opts.channels_last if opts.channels_last is not None else latents.is_cuda
        split = latents.shape[0] if split_convs(latents) else 1
        run = StepRun(torch.channels_last_3d if use_cl else torch.contiguous_format, opts.compiled_norms, rows, split)
        if rows is not None and opts.tiling is not None:
            raise ValueError("the Wan VAE's spatial tiles and row bands over several processes do not combine: "
                             "turn vae_tiling off (each process decodes only its band)")
        if opts.tiling is None:
            out = self._decode_frames(latents, state, state.caches, run, per_latent)
            out = out.clamp_(-1.0, 1.0)
        else:
            out = self._decode_tiled(latents, state, run, per_latent)
        state.latents_done += latents.shape[2]
        return out

    def _check_chunk(self, latents: torch.Tensor, state: WanVAEDecodeState) -> None:
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be (B, {self.config.z_dim}, t >= 1, h, w), "
                             f"got {tuple(latents.shape)}")
        if len(state.caches) != self.decoder.num_slots:
            raise ValueError("this state belongs to a different decoder; create it with new_state()")
        if state.options.compiled_norms and not latents.is_cuda:
            raise ValueError("compiled_norms is for CUDA latents; turn it off for "
                             f"{latents.device.type} decoding")
        hw = tuple(latents.shape[-2:])
        if state.latent_hw is not None and state.latent_hw != hw:
            raise ValueError(f"chunk latents are {hw} but this stream started at {state.latent_hw}; "
                             f"use a new state for a new video")
        state.latent_hw = hw
        if state.batch is not None and state.batch != latents.shape[0]:
            raise ValueError(f"this decode state holds {state.batch} tiles' caches, but the chunk has "
                             f"{latents.shape[0]}; use one state per batch")
        state.batch = latents.shape[0]

    def _decode_frames(self, latents: torch.Tensor, state: WanVAEDecodeState, caches: list,
                       run: StepRun, per_latent: bool) -> torch.Tensor:
        """De-normalise, conv2 and run the decoder over one chunk; unclamped, weight dtype."""
        z = latents.to(self.conv2.weight.dtype) / state.latent_inv_std + state.latent_mean
        x = run.conv(self.conv2, z.contiguous(memory_format=run.fmt))
        max_elements = state.options.max_pass_elements
        if not per_latent:
            return self.decoder.run(x, caches, run, max_elements)
        return torch.cat([self.decoder.run(x[:, :, i:i + 1], caches, run, max_elements)
                          for i in range(x.shape[2])], dim=2)

    def _decode_tiled(self, latents: torch.Tensor, state: WanVAEDecodeState, run: StepRun,
                      per_latent: bool) -> torch.Tensor:
        """Blend per-tile decodes with linear ramps; fp32 accumulation on the latents' device.

        The official tiled decode accumulates on the CPU in bf16 with bf16 masks; we keep fp32 on the
        compute device (same blend, less rounding, no transfers).
        """
        if not state.tiles:
            self._init_tiles(state, latents.device)
        b, _, t, h, w = latents.shape
        frames = self.output_frames(t, first_chunk=state.latents_done == 0)
        s = SPATIAL_UPSCALE
        acc = torch.zeros((b, 3, frames, h * s, w * s), dtype=torch.float32, device=latents.device)
        for tile in state.tiles:
            y0, y1, x0, x1 = tile.box
            part = self._decode_frames(latents[:, :, :, y0:y1, x0:x1], state, tile.caches, run,
                                       per_latent)
            acc[:, :, :, y0 * s:y1 * s, x0 * s:x1 * s].addcmul_(part, tile.mask)
        return acc.div_(state.tile_weight).clamp_(-1.0, 1.0).to(self.conv2.weight.dtype)

    def _init_tiles(self, state: WanVAEDecodeState, device: torch.device) -> None:
        h, w = state.latent_hw
        s = SPATIAL_UPSCALE
        tiling = state.options.tiling
        ramp_h, ramp_w = ((size - step) * s for size, step in zip(tiling.tile, tiling.stride))
        weight = torch.zeros((1, 1, 1, h * s, w * s), dtype=torch.float32, device=device)
        for box in tiling.boxes(h, w):
            y0, y1, x0, x1 = box
            mask_h = blend_ramp((y1 - y0) * s, ramp_h, y0 == 0, y0 + tiling.tile[0] >= h, device)
            mask_w = blend_ramp((x1 - x0) * s, ramp_w, x0 == 0, x0 + tiling.tile[1] >= w, device)
            mask = torch.minimum(mask_h[:, None], mask_w[None, :])[None, None, None]
            weight[..., y0 * s:y1 * s, x0 * s:x1 * s] += mask
            state.tiles.append(_TileStream(box, [None] * self.decoder.num_slots, mask))
        state.tile_weight = weight


def blend_ramp(length: int, width: int, at_start: bool, at_end: bool, device: torch.device) -> torch.Tensor:
    """1-D blend weights: 1 inside, a linear ramp (1/width .. 1) on sides shared with another tile."""
    m = torch.ones(length, dtype=torch.float32, device=device)
    if width > 0:
        up = torch.arange(1, width + 1, dtype=torch.float32, device=device) / width
        if not at_start:
            m[:width] = up[:length]
        if not at_end:  # written second, so it wins where both ramps overlap, as upstream
            m[-width:] = up.flip(0)[-length:]
    return m
