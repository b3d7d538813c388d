"""Turn the plain input specs of ``options.py`` into ``comfy_api`` V3 inputs.

``io`` is passed in (ComfyUI's ``comfy_api.latest.io``) so this stays importable, and testable,
without ComfyUI.
"""
from __future__ import annotations

from typing import Any

from .options import Widget


def to_io_input(io: Any, w: Widget) -> Any:
    if w.kind == "IMAGE":
        return io.Image.Input(w.id, tooltip=w.tooltip)
    if w.kind == "COMBO":
        return io.Combo.Input(w.id, options=list(w.options), default=w.default, tooltip=w.tooltip,
                              optional=w.optional)
    if w.kind == "BOOLEAN":
        return io.Boolean.Input(w.id, default=w.default, tooltip=w.tooltip,
                                label_on=w.label_on, label_off=w.label_off)
    if w.kind == "INT":
        return io.Int.Input(w.id, default=w.default, min=w.min, max=w.max, step=w.step, tooltip=w.tooltip,
                            control_after_generate=w.control_after_generate)
    if w.kind == "FLOAT":
        return io.Float.Input(w.id, default=w.default, min=w.min, max=w.max, step=w.step, tooltip=w.tooltip)
    raise ValueError(f"no ComfyUI input for widget kind {w.kind!r} ({w.id})")


def schema(io: Any, *, node_id: str, display_name: str, description: str,
           inputs: tuple[Widget, ...], category: str) -> Any:
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=category,
        description=description,
        search_aliases=["FlashVSR", "video upscale", "video super resolution", "vsr", "upscale video"],
        inputs=[to_io_input(io, w) for w in inputs],
        outputs=[io.Image.Output(display_name="frames", tooltip="The upscaled frames: as many as "
                                 "came in, scale times the size, ready for Create Video.")],
    )
