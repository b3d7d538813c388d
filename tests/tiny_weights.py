"""Reduced-width weight files under the official names, so tests run the real loading path (file
discovery, pickles through ``weights_only``, strict loads) on a CPU in seconds."""
from __future__ import annotations

import pathlib

import torch

from comfyui_flashvsr.flashvsr.config import Version
from comfyui_flashvsr.flashvsr.engine.random_weights import (TINY_DIT, TINY_PROJECTOR, TINY_PROMPT, TINY_TCDECODER,
                                                             make_random, tiny_vae_config)
from comfyui_flashvsr.models.dit import WanDiT
from comfyui_flashvsr.models.lq_projector import LQProjector
from comfyui_flashvsr.models.tcdecoder import TCDecoder


def write_tiny_weights(root, version: str = "v1.1", seed: int = 0, include_vae: bool = True) -> pathlib.Path:
    """Write reduced-width weights under the official names into ``root/<version>/``; returns that folder."""
    from safetensors.torch import save_file
    version = Version.parse(version)
    folder = pathlib.Path(root) / version.value
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator("cpu").manual_seed(seed)
    cpu = torch.device("cpu")
    dit = make_random(lambda: WanDiT(TINY_DIT), cpu, torch.float32, gen)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()},
              str(folder / "diffusion_pytorch_model_streaming_dmd.safetensors"))
    proj = make_random(lambda: LQProjector(TINY_PROJECTOR, causal=version is Version.V1_1), cpu, torch.bfloat16, gen)
    torch.save(proj.state_dict(), folder / "LQ_proj_in.ckpt")
    tc = make_random(lambda: TCDecoder(TINY_TCDECODER), cpu, torch.float32, gen)
    torch.save(tc.state_dict(), folder / "TCDecoder.ckpt")
    if include_vae:
        from comfyui_flashvsr.models.wan_vae import WanVAEDecoder
        vae = make_random(lambda: WanVAEDecoder(tiny_vae_config()), cpu, torch.float32, gen)
        torch.save(vae.state_dict(), folder / "Wan2.1_VAE.pth")
    torch.save(torch.randn(TINY_PROMPT, generator=gen).to(torch.bfloat16), folder / "posi_prompt.pth")
    return folder
