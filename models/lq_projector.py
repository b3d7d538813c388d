"""LQ projector: turns the bicubic-upsampled low-quality video into DiT tokens (docs/model.md §9).

Each call takes a clip of 4 frames at output resolution and returns one latent frame of tokens.
The two weight versions were trained with different temporal caches, and using the wrong one is a
known cause of ghosting, so the cache rule is part of the model, chosen by ``causal``:

* v1 (``causal=False``, the official ``Buffer_LQ4x_Proj``): each conv's cache is overwritten with the
  *current* clip's last two frames *before* the conv runs, so no context crosses clip boundaries.
* v1.1 (``causal=True``, ``Causal_LQ4x_Proj``): each conv sees the *previous* clip's last two frames
  (replicate-padding on the very first clip), then stores the current ones.

All padding is ``replicate`` (unlike the Wan VAE's zeros).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SHUFFLE = 16      # pixels per token side: a 16x16 RGB patch becomes 768 channels
CACHE_FRAMES = 2


@dataclass(frozen=True)
class LQProjectorConfig:
    in_dim: int = 3
    hidden1: int = 2048
    hidden2: int = 3072
    out_dim: int = 1536
    layer_num: int = 1

    @classmethod
    def from_state_dict(cls, sd) -> "LQProjectorConfig":
        try:
            c1, c2 = sd["conv1.weight"], sd["conv2.weight"]
            layers = 0
            while f"linear_layers.{layers}.weight" in sd:
                layers += 1
            return cls(in_dim=c1.shape[1] // (SHUFFLE * SHUFFLE), hidden1=c1.shape[0], hidden2=c2.shape[0],
                       out_dim=sd["linear_layers.0.weight"].shape[0], layer_num=layers)
        except KeyError as err:
            raise ValueError(f"not an LQ projector state dict: key {err} is missing") from None


class CausalConv3d(nn.Conv3d):
    """Conv3d with (1, 1, 1) spatial/temporal padding done by hand: 2 frames in front, none behind."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, kernel_size=(4, 3, 3), stride=(2, 1, 1), padding=0)
        self.by_taps = False

    def use_taps(self) -> None:
        """Run as one 2-D convolution over the 4 temporal taps stacked on the channel axis (CUDA).

        cuDNN has Hopper kernels for 2-D but picks an sm80 kernel for this 3-D convolution. With the
        input frames of each output frame side by side as channels (tap-major), the 3-D convolution
        is one 2-D 3x3 convolution with 4x the input channels, accumulated in float32 inside cuDNN
        like the 3-D one, and faster than both the 3-D one and a sum of 4 per-tap convolutions
        (docs/performance.md, "Stacked taps"). The weight is stored so that the stacked 2-D weight
        is a channels-last view of it (no copy); the state dict is unchanged.
        """
        w = self.weight.data
        self.weight.data = w.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)
        self.by_taps = True

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None, rows=None) -> torch.Tensor:
        """``rows``: this rank's band of a run over several processes (models/row_bands.py), or None."""
        front = CACHE_FRAMES
        if cache is not None:
            x = torch.cat([cache, x], dim=2)
            front -= cache.shape[2]
        if rows is None:
            x = F.pad(x, (1, 1, 1, 1, front, 0), mode="replicate")
        else:
            # the neighbours' rows (current and cached frames) in place of the row padding;
            # replicate padding is separable, so the frame's edges and corners match
            x = F.pad(rows.pad(x, 1, "replicate"), (1, 1, 0, 0, front, 0), mode="replicate")
        if self.by_taps:
            return self._by_taps(x)
        # A batch of tiles one at a time: the CPU's batched 3-D convolution sums in another order,
        # and a batch must give the frames of its tiles run alone (models/tile_batch.py).
        if x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(CausalConv3d, self).forward(clip) for clip in x.split(1)])

    def _by_taps(self, x: torch.Tensor) -> torch.Tensor:
        out_ch, in_ch, taps = self.weight.shape[:3]
        stride = self.stride[0]
        b, _, t, h, w = x.shape
        t_out = (t - taps) // stride + 1
        # (B*T_out, H, W, taps*C): the frames t*stride + i of each output frame t, channel i*C + c
        stacked = x.unfold(2, taps, stride).permute(0, 2, 3, 4, 5, 1).reshape(b * t_out, h, w, taps * in_ch)
        weight = self.weight.permute(0, 2, 1, 3, 4).reshape(out_ch, taps * in_ch, *self.weight.shape[3:])
        out = F.conv2d(stacked.permute(0, 3, 1, 2), weight, self.bias)
        return out.unflatten(0, (b, t_out)).transpose(1, 2)


class RMSNorm3d(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


@dataclass
class ProjectorState:
    clips_seen: int = 0
    cache1: torch.Tensor | None = None
    cache2: torch.Tensor | None = None


class LQProjector(nn.Module):
    def __init__(self, cfg: LQProjectorConfig, causal: bool):
        super().__init__()
        self.cfg, self.causal = cfg, causal
        self.conv1 = CausalConv3d(cfg.in_dim * SHUFFLE * SHUFFLE, cfg.hidden1)
        self.norm1 = RMSNorm3d(cfg.hidden1)
        self.conv2 = CausalConv3d(cfg.hidden1, cfg.hidden2)
        self.norm2 = RMSNorm3d(cfg.hidden2)
        self.linear_layers = nn.ModuleList(nn.Linear(cfg.hidden2, cfg.out_dim) for _ in range(cfg.layer_num))

    def use_conv_taps(self) -> "LQProjector":
        """Both 3-D convolutions as 2-D convolutions over stacked taps (faster on CUDA; see CausalConv3d)."""
        for conv in (self.conv1, self.conv2):
            conv.use_taps()
        return self

    @staticmethod
    def _shuffle(video: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) -> (B, C*256, F, H/16, W/16), channel = c*256 + dy*16 + dx."""
        b, c, f, h, w = video.shape
        x = video.view(b, c, f, h // SHUFFLE, SHUFFLE, w // SHUFFLE, SHUFFLE).permute(0, 1, 4, 6, 2, 3, 5)
        return x.reshape(b, c * SHUFFLE * SHUFFLE, f, h // SHUFFLE, w // SHUFFLE)

    def _conv(self, conv: CausalConv3d, x: torch.Tensor, state: ProjectorState, slot: str, rows) -> torch.Tensor:
        tail = x[:, :, -CACHE_FRAMES:].clone()
        if self.causal:
            y = conv(x, getattr(state, slot), rows)
        else:
            y = conv(x, tail, rows)
        setattr(state, slot, tail)
        return y

    @torch.no_grad()
    def stream(self, clip: torch.Tensor, state: ProjectorState, rows=None) -> torch.Tensor | None:
        """Feed one clip (B, 3, 4, H, W) (B > 1: spatial tiles of one stream each, state for all of them);
        returns (B, h*w, out_dim) tokens, or None for the priming first clip.

        The first clip is a single frame (repeated to 4): it only primes the caches. ``rows``: the
        clip is this rank's band of rows, in units of 16-pixel token rows (models/row_bands.py);
        the tokens are then those of the band's rows and ``state`` holds the band's caches.
        """
        first = state.clips_seen == 0
        if first:
            clip = torch.cat([clip[:, :, :1].expand(-1, -1, 3, -1, -1), clip], dim=2)
        x = F.silu(self.norm1(self._conv(self.conv1, self._shuffle(clip), state, "cache1", rows)))
        if first:
            state.cache2 = x[:, :, -CACHE_FRAMES:].clone()
            state.clips_seen += 1
            return None
        x = F.silu(self.norm2(self._conv(self.conv2, x, state, "cache2", rows)))
        state.clips_seen += 1
        tokens = x.flatten(2).transpose(1, 2)            # (B, f*h*w, hidden2), order (f, y, x)
        return self.linear_layers[0](tokens)
