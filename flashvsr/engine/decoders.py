"""Decoders behind one small interface, so the engine has one loop for every variant.

Both decoders are causal and carry state between chunks: decoding chunk by chunk gives the same
frames as the official decode of the whole latent sequence at the end (docs/model.md §1).
"""
from __future__ import annotations

from typing import Protocol

import torch

from ...models.tcdecoder import TCDecoder, TCDecoderPasses


class Decoder(Protocol):
    def new_state(self) -> object: ...

    def decode(self, latents: torch.Tensor, cond: torch.Tensor, state: object) -> torch.Tensor:
        """latents (1, 16, t, h, w), cond = aligned LQ frames (1, 3, T, 8h, 8w) -> (1, 3, T, 8h, 8w) in [-1, 1]."""


class TinyDecoder:
    """TCDecoder: conditioned on the LQ frames; output ~[0, 1] mapped to [-1, 1], not clamped."""

    def __init__(self, net: TCDecoder, passes: TCDecoderPasses | None = None):
        self.net, self.passes = net, passes or TCDecoderPasses()    # smaller passes = lower peak VRAM

    def new_state(self):
        from ...models.tcdecoder import TCDecoderState
        return TCDecoderState()

    def decode(self, latents, cond, state):
        return self.net.decode_chunk(latents, cond, state, self.passes) * 2 - 1


class FullDecoder:
    """Wan 2.1 VAE decoder (ignores the condition); optional spatial tiling in latent units."""

    def __init__(self, net, tiled: bool = False, tile=(60, 104), stride=(30, 52), compiled_norms: bool = False):
        self.net, self.tiled, self.tile, self.stride = net, tiled, tuple(tile), tuple(stride)
        self.compiled_norms = compiled_norms

    def new_state(self):
        from ...models.wan_vae import VAETiling, WanVAEDecodeOptions
        tiling = VAETiling(self.tile, self.stride) if self.tiled else None
        return self.net.new_state(WanVAEDecodeOptions(tiling=tiling, compiled_norms=self.compiled_norms))

    def decode(self, latents, cond, state):
        return self.net.decode_chunk(latents, state)
