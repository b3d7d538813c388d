"""FlashVSR ⚡: frames in, frames out, a preset, scale and seed; everything else is the official default."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from . import comfy_glue
from .options import BASIC_INPUTS, CATEGORY, DISPLAY_BASIC, NODE_ID_BASIC, basic_settings
from .schema import schema


class FlashVSRBolt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(io, node_id=NODE_ID_BASIC, display_name=DISPLAY_BASIC, category=CATEGORY,
                      inputs=BASIC_INPUTS, description=(
                          "One-step diffusion video super-resolution (FlashVSR, v1.1 weights, "
                          "downloaded on first use into models/FlashVSR). Uses SageAttention when "
                          "the server has it. Returns every input frame at scale times the size; "
                          "shows the attention backends, speed and peak VRAM after each run."))

    @classmethod
    def execute(cls, frames: torch.Tensor, preset: str, scale: float, seed: int) -> io.NodeOutput:
        out, lines = comfy_glue.upscale(frames, basic_settings(preset, scale, seed))
        return io.NodeOutput(out, ui={"text": list(lines)})
