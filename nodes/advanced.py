"""FlashVSR ⚡ Advanced: every engine option, validated before the run."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from . import comfy_glue
from .options import (ADVANCED_INPUTS, CATEGORY, DISPLAY_ADVANCED, NODE_ID_ADVANCED, advanced_settings,
                      problems_with)
from .schema import schema


class FlashVSRBoltAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(io, node_id=NODE_ID_ADVANCED, display_name=DISPLAY_ADVANCED, category=CATEGORY,
                      inputs=ADVANCED_INPUTS, description=(
                          "FlashVSR video super-resolution with every option: weights version, "
                          "mode, SageAttention on/off, colour fix, sparse attention, spatial and VAE "
                          "tiling, precision, device, keeping the model loaded."))

    @classmethod
    def validate_inputs(cls, scale=None, sparse_ratio=None, kv_ratio=None, local_range=None,
                        tile_size=None, tile_overlap=None, vae_tile_height=None, vae_tile_width=None,
                        vae_stride_height=None, vae_stride_width=None, seed=None) -> bool | str:
        # Declaring these replaces ComfyUI's own min/max check for them with ours, which also
        # checks the combinations; dropdowns keep ComfyUI's check (HTTP 400 value_not_in_list).
        problems = problems_with(ADVANCED_INPUTS, {
            "scale": scale, "sparse_ratio": sparse_ratio, "kv_ratio": kv_ratio,
            "local_range": local_range, "tile_size": tile_size, "tile_overlap": tile_overlap,
            "vae_tile_height": vae_tile_height, "vae_tile_width": vae_tile_width,
            "vae_stride_height": vae_stride_height, "vae_stride_width": vae_stride_width, "seed": seed})
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, frames: torch.Tensor, **values: Any) -> io.NodeOutput:
        out, lines = comfy_glue.upscale(frames, advanced_settings(**values))
        return io.NodeOutput(out, ui={"text": list(lines)})
