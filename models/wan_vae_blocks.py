"""Layers of the Wan 2.1 VAE decoder, with every causal history passed in explicitly.

Module and parameter names mirror ``Wan2.1_VAE.pth`` so the checkpoint loads without renaming
(docs/model.md §10.2). Semantics follow FlashVSR's ``diffsynth/models/wan_video_vae.py`` at
``b527c6f``; the code is our own.

A causal layer never keeps history on itself. Each one owns a ``slot`` (an index fixed at
construction) into a ``caches`` list that belongs to one decode stream; the decoder passes that list
and the run's settings (:class:`StepRun`) through every ``step(x, caches, run)`` call. Tensors are
``(B, C, T, H, W)``; in channels-last-3d runs they are laid out ``(B, T, H, W, C)`` in memory, which
makes every per-frame 2-D view below a free reshape.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .wan_vae import WanVAEConfig

HISTORY_FRAMES = 2  # a causal kernel of 3 taps needs the two previous input frames

# Cache marker of a temporal upsampler that has passed the stream's first frame but has no time-conv
# history yet: the official code stores the string 'Rep' there, and its next time conv sees zeros.
FIRST_FRAME_DONE = "first-frame-done"


@dataclass(frozen=True)
class StepRun:
    """Settings of one decode call, the same for every layer."""
    fmt: torch.memory_format  # torch.channels_last_3d or torch.contiguous_format
    compiled_norms: bool = False
    # This rank's band of rows in a decode over several processes (models/row_bands.py), or None:
    # then every row-padded convolution takes its neighbours' rows and the attention gathers.
    rows: object = None
    # A batch of this many tiles whose convolutions run tile by tile (off CUDA: models/tile_batch.py,
    # PerTile), so each tile's frames are those it gets alone; 1: the batch in one call.
    split_tiles: int = 1

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.split_tiles > 1:
            from .tile_batch import PerTile
            return PerTile(self.split_tiles, self.rows).conv(conv, x)
        return conv(x) if self.rows is None else self.rows.conv(conv, x)

    @property
    def fmt2d(self) -> torch.memory_format:
        return torch.channels_last if self.fmt == torch.channels_last_3d else torch.contiguous_format

    def norm_silu_into(self, norm: RMSNorm, x: torch.Tensor, out: torch.Tensor) -> None:
        """out = SiLU(norm(x)), written straight into ``out`` (a slice of a conv's input buffer)."""
        if self.compiled_norms:
            compiled_norm_silu()(x, norm.gamma, norm.scale, out)
            return
        F.normalize(x, dim=1, out=out)
        out.mul_(norm.scale).mul_(norm.gamma)
        F.silu(out, inplace=True)


def _norm_silu_into(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    out.copy_(F.silu(F.normalize(x, dim=1) * scale * gamma))


@functools.cache
def compiled_norm_silu() -> Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor], None]:
    """RMS norm + SiLU as one generated kernel that rounds where eager rounds.

    Eager spends four memory passes on this (divide, two products, SiLU) after the norm's own read;
    fused it is one; a rare value lands one bf16 step apart (reduction order). Timings in
    docs/performance.md, "Fused RMS norm + SiLU". Needs Triton and inductor's
    ``emulate_precision_casts`` (present in torch 2.11); the first call compiles for a few seconds.
    """
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "emulate_precision_casts"):
        raise RuntimeError(f"compiled_norms needs inductor's emulate_precision_casts, which torch "
                           f"{torch.__version__} lacks: upgrade torch or leave compiled_norms off")
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("compiled_norms needs Triton (pip install triton, or triton-windows on "
                           "Windows); leave compiled_norms off without it")
    from .compiled import CompiledWithFallback
    compiled = torch.compile(_norm_silu_into, dynamic=True, options={"emulate_precision_casts": True})
    return CompiledWithFallback("the Wan VAE norms", compiled, _norm_silu_into)


def upsample_nearest2x(x: torch.Tensor, fmt2d: torch.memory_format) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W), each pixel repeated 2x2: what 'nearest-exact' does at scale 2.

    A broadcast copy: bit-identical to F.interpolate, in any dtype, and faster for channels-last
    (docs/performance.md, "Nearest 2× as a broadcast copy").
    """
    n, c, h, w = x.shape
    out = torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=fmt2d)
    out.view(n, c, h, 2, w, 2).copy_(x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2))
    return out


def frames_view(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W); a view when ``x`` is channels-last-3d."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def video_view(y: torch.Tensor, b: int, t: int, fmt: torch.memory_format) -> torch.Tensor:
    """(B*T, C, H, W) -> (B, C, T, H, W) in layout ``fmt`` (free for a channels-last ``y``)."""
    v = y.reshape(b, t, *y.shape[1:]).transpose(1, 2)
    return v.contiguous(memory_format=fmt)


class RMSNorm(nn.Module):
    """Wan's ``RMS_norm``: unit L2 norm over channels, times sqrt(C), times ``gamma``.

    The two products stay separate, in the input dtype, because in bf16 each one rounds and the
    official code rounds twice. Its ``+ bias`` is ``+ 0.0`` (no bias in the checkpoint) and is dropped:
    it can only turn -0.0 into +0.0.
    """

    def __init__(self, dim: int, *, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mul_(self.scale).mul_(self.gamma)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only: with zeros, or with the stream's last frames.

    Height and width are zero-padded by the convolution itself (no padded copy of the input).
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int]) -> None:
        kt, kh, kw = kernel
        super().__init__(in_dim, out_dim, kernel, padding=(0, kh // 2, kw // 2))
        self.history = kt - 1
        self.slot = -1  # assigned by Decoder3d

    def step(self, x: torch.Tensor, caches: list, run: StepRun,
             norm: RMSNorm | None = None) -> torch.Tensor:
        """Convolve ``x`` after its history; with ``norm``, convolve SiLU(norm(x)) instead."""
        if self.history == 0:
            return run.conv(self, x)
        if self.history != HISTORY_FRAMES:
            raise ValueError(f"CausalConv3d supports temporal kernels of 1 or 3, got {self.history + 1}")
        past = caches[self.slot]
        b, c, t, h, w = x.shape
        # One buffer holding [history, input]; the norm writes its output straight into it.
        buf = torch.empty((b, c, HISTORY_FRAMES + t, h, w), dtype=x.dtype, device=x.device,
                          memory_format=run.fmt)
        if isinstance(past, torch.Tensor):
            buf[:, :, :HISTORY_FRAMES].copy_(past)
        else:
            buf[:, :, :HISTORY_FRAMES].zero_()
        if norm is None:
            buf[:, :, HISTORY_FRAMES:].copy_(x)
        else:
            run.norm_silu_into(norm, x, buf[:, :, HISTORY_FRAMES:])
        # The clone frees the large buffer once the conv is done; zero frames in it stand for the
        # zero padding of a stream that is shorter than the history so far.
        caches[self.slot] = buf[:, :, -HISTORY_FRAMES:].clone(memory_format=run.fmt)
        return run.conv(self, buf)


class ResidualBlock(nn.Module):
    """norm, SiLU, causal conv, norm, SiLU, (dropout), causal conv; plus a 1x1x1 shortcut if widths differ."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices 1, 4, 5 (SiLU, SiLU, Dropout) hold no weights; keeping them keeps the checkpoint's
        # names residual.{0,2,3,6}.*. Dropout is the identity at inference.
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, (3, 3, 3)),
            RMSNorm(out_dim, images=False), nn.SiLU(), nn.Identity(),
            CausalConv3d(out_dim, out_dim, (3, 3, 3)))
        self.shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1)) if in_dim != out_dim else None

    def expansion(self) -> float:
        return self.residual[6].out_channels / self.residual[2].in_channels

    def step(self, x: torch.Tensor, caches: list, run: StepRun) -> torch.Tensor:
        norm_a, _, conv_a, norm_b, _, _, conv_b = self.residual
        skip = x if self.shortcut is None else run.conv(self.shortcut, x)
        y = conv_a.step(x, caches, run, norm=norm_a)
        y = conv_b.step(y, caches, run, norm=norm_b)
        return y.add_(skip)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (no time mixing)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def expansion(self) -> float:
        return 1.0

    def step(self, x: torch.Tensor, caches: list, run: StepRun) -> torch.Tensor:
        if run.rows is not None:
            # Over several processes every rank gathers the whole frame (at the lowest resolution),
            # runs the block on it as one process would, and keeps its own rows.
            whole = self.step(run.rows.whole(x), caches, replace(run, rows=None))
            return run.rows.own(whole).contiguous(memory_format=run.fmt)
        b, c, t, h, w = x.shape
        qkv = run.conv(self.to_qkv, self.norm(frames_view(x)))  # (B*T, 3C, H, W)
        # (B*T, 1, H*W, 3C) made contiguous as upstream does, since SDPA's kernel choice (and so its
        # rounding) follows the strides; free when qkv is channels-last.
        qkv = qkv.permute(0, 2, 3, 1).reshape(b * t, 1, h * w, 3 * c).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v)  # (B*T, 1, H*W, C)
        o = run.conv(self.proj, o.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w))
        return video_view(o, b, t, run.fmt).add_(x)


class Resample(nn.Module):
    """x2 nearest upsampling in space + 3x3 conv halving the width; optionally x2 in time first.

    The time doubling is a causal (3,1,1) conv to 2C channels whose halves become frames 2i and 2i+1.
    The stream's first frame skips it and stays a single frame (the official 'Rep' rule); the time
    conv then runs over frames 1, 2, ... as if the stream began at frame 1 (zero history).
    """

    def __init__(self, dim: int, *, temporal: bool) -> None:
        super().__init__()
        # Index 0 is the weightless upsampler; index 1 keeps the checkpoint name resample.1.*.
        self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def expansion(self) -> float:
        return 4.0 if self.time_conv is not None else 2.0

    def step(self, x: torch.Tensor, caches: list, run: StepRun) -> torch.Tensor:
        if self.time_conv is not None:
            x = self._double_time(x, caches, run)
        b, t = x.shape[0], x.shape[2]
        # Nearest x2 only copies values, so running it in bf16 equals the official fp32 round trip.
        up = upsample_nearest2x(frames_view(x), run.fmt2d)
        return video_view(run.conv(self.resample[1], up), b, t, run.fmt)

    def _double_time(self, x: torch.Tensor, caches: list, run: StepRun) -> torch.Tensor:
        slot = self.time_conv.slot
        starts_stream = caches[slot] is None
        if starts_stream:
            caches[slot] = FIRST_FRAME_DONE
        rest = x[:, :, 1:] if starts_stream else x
        b, c, _, h, w = x.shape
        n_head = 1 if starts_stream else 0
        t = rest.shape[2]
        out = torch.empty((b, c, n_head + 2 * t, h, w), dtype=x.dtype, device=x.device,
                          memory_format=run.fmt)
        if starts_stream:
            out[:, :, :1].copy_(x[:, :, :1])
        if t:
            y = self.time_conv.step(rest, caches, run)  # (B, 2C, t, H, W)
            # channel half j of time step i -> output frame 2i + j
            out[:, :, n_head:].view(b, c, t, 2, h, w).copy_(
                y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5))
        return out


class Head(nn.Sequential):
    """norm, SiLU, causal conv to RGB (checkpoint names head.0.gamma, head.2.*)."""

    def __init__(self, dim: int) -> None:
        super().__init__(RMSNorm(dim, images=False), nn.SiLU(), CausalConv3d(dim, 3, (3, 3, 3)))

    def expansion(self) -> float:
        return 1.0

    def step(self, x: torch.Tensor, caches: list, run: StepRun) -> torch.Tensor:
        return self[2].step(x, caches, run, norm=self[0])


class InputConv(CausalConv3d):
    """The decoder's first causal conv (latent width to the top width)."""

    def expansion(self) -> float:
        return self.out_channels / self.in_channels


class Decoder3d(nn.Module):
    """Wan 2.1 ``Decoder3d`` without attention in the upsampling stages (``attn_scales=[]``)."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        widths = config.stage_widths()
        top = widths[0]
        self.conv1 = InputConv(config.z_dim, top, (3, 3, 3))
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        blocks: list[nn.Module] = []
        in_dim = top
        for stage, out_dim in enumerate(widths):
            for _ in range(config.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(widths) - 1:
                blocks.append(Resample(out_dim, temporal=config.temporal_upsample[stage]))
                in_dim = out_dim // 2
        self.upsamples = nn.Sequential(*blocks)
        self.head = Head(in_dim)
        causal = [m for m in self.modules() if isinstance(m, CausalConv3d) and m.history]
        for slot, module in enumerate(causal):
            module.slot = slot
        self.num_slots = len(causal)

    def steps(self) -> list[nn.Module]:
        return [self.conv1, *self.middle, *self.upsamples, self.head]

    def run(self, x: torch.Tensor, caches: list, run: StepRun, max_elements: int,
            start: int = 0) -> torch.Tensor:
        """Run steps ``start..`` over ``x``; split it in time wherever a step would exceed the budget.

        Every step is causal with its history in ``caches``, so running consecutive time slices
        through the remaining steps one after the other gives the same frames as one pass. The
        budget is per tile of a batch (B > 1): a batch splits in time as each of its tiles alone
        would (the same passes, so the same frames; the memory model counts every tile's share).
        """
        steps = self.steps()
        for i in range(start, len(steps)):
            t = x.shape[2]
            elements = x[:1, :, :1].numel()
            if run.rows is not None:
                # the whole frame's count: every rank splits in time alike (each pass exchanges
                # rows), and as one process does
                elements = elements // x.shape[-2] * run.rows.whole_rows(x.shape[-2])
            per_frame = elements * max(1.0, steps[i].expansion())
            if t > 1 and per_frame * t > max_elements:
                group = max(1, int(max_elements // per_frame))
                parts = [self.run(p, caches, run, max_elements, i) for p in x.split(group, dim=2)]
                return torch.cat(parts, dim=2)
            x = steps[i].step(x, caches, run)
        return x
