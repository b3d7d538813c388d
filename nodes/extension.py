"""The ComfyUI extension object: registers the models folder, the info route and the two nodes."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import comfy_glue
from .advanced import FlashVSRBoltAdvanced
from .basic import FlashVSRBolt


class FlashVSRExtension(ComfyExtension):
    async def on_load(self) -> None:
        comfy_glue.register_models_folder()
        comfy_glue.place_sample()
        comfy_glue.release_with_comfy_unload()
        comfy_glue.release_at_exit()
        comfy_glue.register_routes()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [FlashVSRBolt, FlashVSRBoltAdvanced]
