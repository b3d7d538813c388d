"""FlashVSR ⚡ Advanced: every engine option, validated before the run."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from . import comfy_glue
from .options import (CATEGORY, DISPLAY_ADVANCED, NODE_ID_ADVANCED, advanced_inputs, advanced_settings,
                      cross_field_problems)
from .schema import schema


class FlashVSRBoltAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(io, node_id=NODE_ID_ADVANCED, display_name=DISPLAY_ADVANCED, category=CATEGORY,
                      inputs=advanced_inputs(), description=(
                          "FlashVSR video super-resolution with every option: weights version, "
                          "mode, SageAttention on/off, colour fix, sparse attention, spatial and VAE "
                          "tiling, precision, device, keeping the model loaded."))

    @classmethod
    def validate_inputs(cls, tile_size=None, tile_overlap=None) -> bool | str:
        # ComfyUI shows the returned text on every input named here, and checks every input not
        # named here itself (min, max, dropdown choices), each on its own input. So only the two
        # inputs of the one rule it cannot check are named; the VAE tile rules (multiples of 8,
        # stride <= tile) are checked when the node runs, with a message naming the input.
        problems = cross_field_problems({"tile_size": tile_size, "tile_overlap": tile_overlap})
        return "; ".join(problems.values()) if problems else True

    @classmethod
    def execute(cls, frames: torch.Tensor, **values: Any) -> io.NodeOutput:
        out, lines = comfy_glue.upscale(frames, advanced_settings(**values))
        return io.NodeOutput(out, ui={"text": list(lines)})
