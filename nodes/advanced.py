"""FlashVSR ⚡ Advanced: every engine option, validated before the run."""
from __future__ import annotations

from typing import Any

import torch
from comfy_api.latest import io

from . import comfy_glue
from .options import (CATEGORY, DISPLAY_ADVANCED, NODE_ID_ADVANCED, advanced_inputs, advanced_settings,
                      tile_size_problem)
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
    def validate_inputs(cls, tile_size=None) -> bool | str:
        # ComfyUI 0.33 shows the returned text on every input named here (and checks every input
        # not named here itself: min, max, dropdown choices, each on its own input). So only
        # tile_size is named, for its own rule. tile_overlap's limit depends on tile_size, which a
        # validator naming tile_overlap alone cannot read: the front end keeps tile_overlap within
        # it as the user edits (tile_overlap_limits), and a prompt that bypasses the front end is
        # refused when the node runs, with one message naming tile_overlap. The VAE tile rules are
        # checked at run time the same way.
        return tile_size_problem(tile_size) or True

    @classmethod
    def execute(cls, frames: torch.Tensor, **values: Any) -> io.NodeOutput:
        out, lines = comfy_glue.upscale(frames, advanced_settings(**values))
        return io.NodeOutput(out, ui={"text": list(lines)})
