"""ComfyUI-FlashVSR: FlashVSR ⚡ video super-resolution nodes for ComfyUI.

ComfyUI loads this file by path and calls ``comfy_entrypoint``; nothing ComfyUI-specific (and
nothing heavy: no CUDA, no downloads, no sageattention or triton) is imported before that, so the
package also imports as a plain library (tests, CLI).
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes.extension import FlashVSRExtension

    return FlashVSRExtension()
