"""Decoders behind one small interface, so the engine has one loop for every variant.

Both decoders are causal and carry state between chunks: decoding chunk by chunk gives the same
frames as the official decode of the whole latent sequence at the end (docs/model.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ...models.tcdecoder import TCDecoder, TCDecoderPasses


@dataclass(frozen=True)
class DecoderSpec:
    """How rank 0 decodes, for the other ranks of a run over several processes to decode their
    bands alike: the same layers, and the same passes (each pass exchanges rows)."""
    kind: str                       # "tc" (TCDecoder) or "vae" (Wan VAE)
    latents: int = 1                # TCDecoder: latents per body pass
    tail_frames: int = 1            # TCDecoder: frames per tail pass
    compiled_norms: bool = False    # Wan VAE


class Decoder(Protocol):
    def new_state(self) -> object: ...

    def decode(self, latents: torch.Tensor, cond: torch.Tensor, state: object, rows=None) -> torch.Tensor:
        """latents (B, 16, t, h, w), cond = aligned LQ frames (B, 3, T, 8h, 8w) -> (B, 3, T, 8h, 8w) in [-1, 1].
        B > 1: a batch of spatial tiles, each its own causal stream, all in ``state`` (one state per
        batch, B fixed for its life); each tile's frames are those it would get alone.
        ``rows``: the inputs are this rank's band of latent rows (models/row_bands.py)."""

    def spec(self) -> DecoderSpec: ...


class TinyDecoder:
    """TCDecoder: conditioned on the LQ frames; output ~[0, 1] mapped to [-1, 1], not clamped."""

    def __init__(self, net: TCDecoder, passes: TCDecoderPasses | None = None):
        self.net, self.passes = net, passes or TCDecoderPasses()    # smaller passes = lower peak VRAM

    def new_state(self):
        from ...models.tcdecoder import TCDecoderState
        return TCDecoderState()

    def decode(self, latents, cond, state, rows=None):
        return self.net.decode_chunk(latents, cond, state, self.passes, rows) * 2 - 1

    def spec(self) -> DecoderSpec:
        return DecoderSpec("tc", self.passes.latents, self.passes.tail_frames)


class FullDecoder:
    """Wan 2.1 VAE decoder (ignores the condition); optional spatial tiling in latent units."""

    def __init__(self, net, tiled: bool = False, tile=(60, 104), stride=(30, 52), compiled_norms: bool = False):
        self.net, self.tiled, self.tile, self.stride = net, tiled, tuple(tile), tuple(stride)
        self.compiled_norms = compiled_norms

    def new_state(self):
        from ...models.wan_vae import VAETiling, WanVAEDecodeOptions
        tiling = VAETiling(self.tile, self.stride) if self.tiled else None
        return self.net.new_state(WanVAEDecodeOptions(tiling=tiling, compiled_norms=self.compiled_norms))

    def decode(self, latents, cond, state, rows=None):
        return self.net.decode_chunk(latents, state, rows=rows)

    def spec(self) -> DecoderSpec:
        if self.tiled:
            raise ValueError("the Wan VAE's spatial tiles and row bands over several processes do not combine: "
                             "turn vae_tiling off (each process decodes only its band)")
        return DecoderSpec("vae", compiled_norms=self.compiled_norms)


def decoder_from(spec: DecoderSpec, net) -> Decoder:
    """The decoder ``spec`` describes, over this process's network (a worker of a parallel run)."""
    from ...models.wan_vae import WanVAEDecoder
    want = TCDecoder if spec.kind == "tc" else WanVAEDecoder
    if not isinstance(net, want):
        raise RuntimeError(f"rank 0 decodes with the {want.__name__}, but this process loaded the "
                           f"{type(net).__name__}: start every process with the same mode")
    if spec.kind == "tc":
        return TinyDecoder(net, TCDecoderPasses(latents=spec.latents, tail_frames=spec.tail_frames))
    return FullDecoder(net, compiled_norms=spec.compiled_norms)
