"""TCDecoder: FlashVSR's conditional tiny video decoder (a widened TAEHV decoder), docs/model.md §10.1.

Input per latent frame: the 16 latent channels behind 768 channels of the 4x8x8 pixel-shuffled LQ
frames (the condition). Output: 4 RGB frames per latent (2 temporal doublings), 8x the size,
values about [0, 1]. The first 3 frames of a run are dropped once (the decoder's warm-up).

Streaming: every MemBlock mixes its input with its own *previous* input (zeros at the very start),
so the memory of a layer depends only on the order of the inputs it has seen. Running a layer over
all frames of a chunk at once (with the previous input shifted in) therefore gives the same result
as the official frame-by-frame work queue, and is much faster.

A batch of B spatial tiles (issue #14) runs as B independent streams in one call: frames are
tile-major on dim 0 (tile b's frames b*t .. b*t+t-1), every MemBlock's memory holds B frames (one
per tile) and shifts within each tile's frames, and each tile drops its own warm-up frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

COND_SHUFFLE = (4, 8, 8)   # frames, rows, cols folded into channels for the condition
TRIM_FRAMES = 3             # 2**2 - 1: the official decoder drops these once per run
LATENTS_PER_PASS = 2        # latent frames decoded per layer pass (a steady chunk's worth)


@dataclass(frozen=True)
class TCDecoderConfig:
    channels: tuple[int, int, int, int] = (512, 256, 128, 128)
    latent_channels: int = 16 + 768

    @classmethod
    def from_state_dict(cls, sd) -> "TCDecoderConfig":
        try:
            return cls(channels=(sd["decoder.1.weight"].shape[0], sd["decoder.10.weight"].shape[0],
                                 sd["decoder.16.weight"].shape[0], sd["decoder.22.weight"].shape[0]),
                       latent_channels=sd["decoder.1.weight"].shape[1])
        except KeyError as err:
            raise ValueError(f"not a TCDecoder state dict: key {err} is missing") from None


def _conv(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(2 * n, n), nn.ReLU(), _conv(n, n), nn.ReLU(), _conv(n, n))

    def forward(self, x: torch.Tensor, past: torch.Tensor, rows=None) -> torch.Tensor:
        if rows is None:
            return F.relu(self.conv(torch.cat([x, past], 1)) + x)
        y = torch.cat([x, past], 1)
        for layer in self.conv:
            y = _layer(layer, y, rows)
        return F.relu(y + x)


def _layer(layer: nn.Module, x: torch.Tensor, rows) -> torch.Tensor:
    """One layer on a band of rows (models/row_bands.py): convolutions take their neighbours' rows."""
    return rows.conv(layer, x) if isinstance(layer, nn.Conv2d) else layer(x)


class TGrow(nn.Module):
    """1x1 conv to ``stride`` x channels, then split into ``stride`` consecutive frames."""

    def __init__(self, n: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n, n * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, c, h, w = x.shape
        # reshape, not view: a channels-last tensor cannot move channel groups into the batch in place
        return self.conv(x).reshape(t * self.stride, c, h, w)


@dataclass(frozen=True)
class TCDecoderPasses:
    """How a chunk is cut into passes (same frames whatever the cut) and which functions run them.

    ``latents``: latent frames per body pass; ``tail_frames``: output frames per tail pass.
    ``body``/``tail``: compiled :meth:`TCDecoder.run_body` / :meth:`TCDecoder.run_tail`, or None for
    the eager ones.
    """
    latents: int = LATENTS_PER_PASS
    tail_frames: int = 4 * LATENTS_PER_PASS
    body: object = None
    tail: object = None

    def __post_init__(self) -> None:
        if self.latents < 1 or self.tail_frames < 1:
            raise ValueError(f"passes must be >= 1, got latents={self.latents}, tail_frames={self.tail_frames}")


@dataclass
class TCDecoderState:
    memory: list[torch.Tensor] | None = None   # per MemBlock: its last input frame, (tiles, C, h, w)
    started: bool = False


class TCDecoder(nn.Module):
    def __init__(self, cfg: TCDecoderConfig):
        super().__init__()
        self.cfg = cfg
        c0, c1, c2, c3 = cfg.channels
        # Indices match the checkpoint keys ``decoder.N``; the no-bias 3x3 convs after the first and
        # last ReLU are the "identity-deepening" layers of the official decoder.
        self.decoder = nn.Sequential(
            Clamp(), _conv(cfg.latent_channels, c0), nn.ReLU(), _conv(c0, c0, bias=False), nn.ReLU(),
            MemBlock(c0), MemBlock(c0), MemBlock(c0), nn.Upsample(scale_factor=2), TGrow(c0, 1),
            _conv(c0, c1, bias=False),
            MemBlock(c1), MemBlock(c1), MemBlock(c1), nn.Upsample(scale_factor=2), TGrow(c1, 2),
            _conv(c1, c2, bias=False),
            MemBlock(c2), MemBlock(c2), MemBlock(c2), nn.Upsample(scale_factor=2), TGrow(c2, 2),
            _conv(c2, c3, bias=False), nn.ReLU(), _conv(c3, c3, bias=False), nn.ReLU(), _conv(c3, 3),
        )
        # The last upsampling (then its TGrow): from here on every layer works on each frame by
        # itself (no MemBlock), so the full-resolution tail can run one output frame at a time.
        self.tail_start = max(i for i, layer in enumerate(self.decoder) if isinstance(layer, nn.Upsample))

    @staticmethod
    def shuffle_condition(cond: torch.Tensor, start: int = 0, count: int | None = None) -> torch.Tensor:
        """(1, 3, T, H, W) LQ frames -> (ceil(T/4), 768, H/8, W/8), front padded with frame 0;
        ``start``/``count`` select latent frames (a pass's share, without shuffling the rest)."""
        ft, fh, fw = COND_SHUFFLE
        b, c, t, h, w = cond.shape
        pad = -t % ft
        count = (t + pad) // ft - start if count is None else count
        frames = torch.arange(start * ft, (start + count) * ft, device=cond.device) - pad
        cond = cond.index_select(2, frames.clamp_min(0))
        x = cond.view(b, c, count, ft, h // fh, fh, w // fw, fw).permute(0, 2, 1, 3, 5, 7, 4, 6)
        return x.reshape(b * count, c * ft * fh * fw, h // fh, w // fw)

    def memory_shapes(self, h: int, w: int, tiles: int = 1) -> list[tuple[int, int, int, int]]:
        """Shape of each MemBlock's remembered input for latents of h x w (one frame per tile)."""
        shapes, c, scale = [], self.cfg.channels, 1
        stage = 0
        for layer in self.decoder:
            if isinstance(layer, MemBlock):
                shapes.append((tiles, c[stage], h * scale, w * scale))
            elif isinstance(layer, nn.Upsample):
                scale *= 2
                stage += 1
        return shapes

    def run_body(self, x: torch.Tensor, memory: list[torch.Tensor], rows=None):
        """The layers before the full-resolution tail over a chunk of frames (tiles*t, C, h, w),
        tile-major; memory = each MemBlock's previous input per tile, (tiles, C, h, w). A pure
        function of its inputs (returns the new memory), so it can be compiled (one graph per
        number of tiles). ``rows``: ``x`` is this rank's band of rows (models/row_bands.py), or a
        ``tile_batch.PerTile`` that runs the convolutions tile by tile.

        It ends with the last TGrow, moved before the last (nearest) upsampling: a 1x1 convolution
        commutes with nearest upsampling, so this is the same arithmetic on 4x fewer pixels, and
        its output holds separate frames that the tail can take one by one.
        """
        start = self.tail_start
        tiles = memory[0].shape[0]
        new_memory = []
        for layer in list(self.decoder)[:start]:
            if isinstance(layer, MemBlock):
                frames = x.unflatten(0, (tiles, -1))                  # (tiles, t, C, h, w)
                past = torch.cat([memory[len(new_memory)].unsqueeze(1), frames[:, :-1]], dim=1).flatten(0, 1)
                new_memory.append(frames[:, -1].clone())
                x = layer(x, past) if rows is None else layer(x, past, rows)
            else:
                x = layer(x) if rows is None else _layer(layer, x, rows)
        return self.decoder[start + 1](x), new_memory

    def run_tail(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        """Last upsampling and the full-resolution convolutions of frames from :meth:`run_body`."""
        start = self.tail_start
        x = self.decoder[start](x)
        for layer in list(self.decoder)[start + 2:]:
            x = layer(x) if rows is None else _layer(layer, x, rows)
        return x

    def subpixel_weight(self) -> torch.Tensor:
        """The tail's first 3x3 convolution folded into the nearest 2x upsampling before it, as a
        (4 * C_out, C_in, 2, 2) weight: one 2x2 kernel per output phase (row a, column b). Output pixel
        (2i+a, 2j+b) reads low-resolution rows i-1, i (a = 0) or i, i+1 (a = 1), with the 3x3 kernel's
        rows merged as [w0, w1 + w2] or [w0 + w1, w2] (columns alike). Sums in float32, rounded once."""
        start = self.tail_start
        conv = self.decoder[start + 2]
        if not (isinstance(self.decoder[start], nn.Upsample) and isinstance(conv, nn.Conv2d)
                and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is None):
            raise ValueError("the TCDecoder tail does not start with nearest 2x upsampling and a 3x3 convolution")

        def fold(w, dim):      # the 3 taps along ``dim`` as 2, per phase: [w0, w1 + w2], [w0 + w1, w2]
            t0, t1, t2 = w.unbind(dim)
            return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

        phases = [col for row in fold(conv.weight.float(), 2) for col in fold(row, 3)]
        return torch.cat(phases, 0).to(conv.weight.dtype)

    def fast_tail_weights(self) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        """What :meth:`run_tail_subpixel` takes: the folded first weight and the (weight, bias) of each
        later convolution, all channels-last copies (the module's own weights stay as they are)."""
        cl = torch.channels_last
        rest = [(layer.weight.contiguous(memory_format=cl), layer.bias)
                for layer in list(self.decoder)[self.tail_start + 3:] if isinstance(layer, nn.Conv2d)]
        return self.subpixel_weight().contiguous(memory_format=cl), rest

    def run_tail_subpixel(self, x: torch.Tensor, weights) -> torch.Tensor:
        """:meth:`run_tail` with the upsampling and the first convolution as one 2x2 convolution on the
        low-resolution frames (16 instead of 36 multiply-adds per output channel and input pixel, no
        upsampled tensor), in channels-last memory (cuDNN's NHWC kernels are about twice as fast
        here as its NCHW ones; docs/performance.md, "Tail in channels-last").
        ``weights`` from :meth:`fast_tail_weights`. Differs from run_tail by the rounding of the merged
        weights (bf16 noise); pure, so it can be compiled. (:meth:`subpixel_weight` checks that the
        tail can be folded.)"""
        start = self.tail_start
        sub, rest = weights
        cl = torch.channels_last
        t, _, h, w = x.shape
        cout = sub.shape[0] // 4
        y = F.conv2d(F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=cl), sub)     # (t, 4*cout, h+1, w+1)
        y = y.view(t, 2, 2, cout, h + 1, w + 1)
        phases = [[y[:, a, b, :, a:a + h, b:b + w] for b in (0, 1)] for a in (0, 1)]
        x = torch.stack([torch.stack(row, -1) for row in phases], -3)     # (t, cout, h, 2, w, 2)
        x = x.reshape(t, cout, 2 * h, 2 * w).contiguous(memory_format=cl)
        convs = iter(rest)
        for layer in list(self.decoder)[start + 3:]:
            if isinstance(layer, nn.Conv2d):
                weight, bias = next(convs)
                x = F.conv2d(x, weight, bias, layer.stride, layer.padding)
            else:
                x = layer(x)
        return x

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, cond: torch.Tensor, state: TCDecoderState,
                     passes: "TCDecoderPasses | None" = None, rows=None) -> torch.Tensor:
        """latents (B, 16, t, h, w), cond (B, 3, T, 8h, 8w) -> frames (B, 3, 4t [-3 once], 8h, 8w) in ~[0, 1].

        B > 1: a batch of spatial tiles, each its own stream (``state`` holds all their memories;
        keep B for the whole stream). Each pass takes its latents of every tile, each tail pass its
        frames of every tile. Off CUDA the convolutions run tile by tile (tile_batch.PerTile) so
        each tile's frames are bitwise those of the tile alone.

        ``rows``: the inputs are this rank's band of latent rows (models/row_bands.py); the frames
        are then the band's rows, ``state`` holds its memory, and the eager layers run (a compiled
        pass cannot hold the exchanges). Every rank must use the same ``passes`` (each pass exchanges).
        """
        from .tile_batch import PerTile, split_convs
        passes = passes or TCDecoderPasses()
        tiles = latents.shape[0]
        lat = latents.transpose(1, 2)                 # (tiles, t, 16, h, w)
        if state.memory is None:
            h, w = latents.shape[-2:]
            # The official decoder's first "past" is zeros (input * 0).
            state.memory = [torch.zeros(s, dtype=lat.dtype, device=lat.device)
                            for s in self.memory_shapes(h, w, tiles)]
        if state.memory[0].shape[0] != tiles:
            raise ValueError(f"this decoder state holds {state.memory[0].shape[0]} tiles' memory, "
                             f"but the chunk has {tiles}; use one state per batch")
        if split_convs(latents):
            rows = PerTile(tiles, rows)
        # A few latents per pass, a few frames per tail pass: the MemBlocks carry their memory across
        # passes and the tail is frame-local, so this is exact; it caps the full-resolution
        # activations (chunk 0 has 6 latents = 24 frames, ~6.6 GB per 128-channel bf16 tensor at
        # 768x1408) and every pass has the same shape in every chunk. Inputs are joined per pass
        # and each pass's features are dropped before the next one starts: Tiny-Long's peak VRAM
        # is set here (docs/performance.md).
        if rows is None:
            body, tail = passes.body or self.run_body, passes.tail or self.run_tail
        else:
            def body(x, memory):
                return self.run_body(x, memory, rows)

            def tail(x):
                return self.run_tail(x, rows)
        outs = []
        for i in range(0, lat.shape[1], passes.latents):
            n = min(passes.latents, lat.shape[1] - i)
            x = torch.cat([self.shuffle_condition(cond, i, n), lat[:, i:i + n].flatten(0, 1)], dim=1)
            y, state.memory = body(x, state.memory)
            del x
            y = y.unflatten(0, (tiles, -1))           # (tiles, frames, C, h, w)
            outs += [tail(y[:, j:j + passes.tail_frames].flatten(0, 1))
                     for j in range(0, y.shape[1], passes.tail_frames)]
            del y
        x = _join_passes(outs, tiles)              # (tiles, T, 3, H, W)
        if not state.started:
            state.started = True
            x = x[:, TRIM_FRAMES:]
        return x.transpose(1, 2)


def _join_passes(outs: list[torch.Tensor], tiles: int) -> torch.Tensor:
    """Tail passes (tiles*k, 3, H, W), tile-major, -> (tiles, T, 3, H, W) in the passes' memory
    layout (channels-last from the compiled tail: one plain copy, as a cat of 4-D frames would be)."""
    if len(outs) == 1:
        return outs[0].unflatten(0, (tiles, -1))
    first = outs[0]
    fmt = torch.channels_last if first.is_contiguous(memory_format=torch.channels_last) \
        and not first.is_contiguous() else torch.contiguous_format
    frames = sum(o.shape[0] for o in outs)
    x = torch.empty((frames, *first.shape[1:]), dtype=first.dtype, device=first.device,
                    memory_format=fmt).unflatten(0, (tiles, -1))
    start = 0
    for o in outs:
        k = o.shape[0] // tiles
        x[:, start:start + k].copy_(o.unflatten(0, (tiles, k)))
        start += k
    return x
