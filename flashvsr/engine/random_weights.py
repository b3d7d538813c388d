"""Randomly initialised FlashVSR networks, for speed benchmarks and tests (the output means nothing).

``random_networks`` builds the DiT, LQ projector, decoder and prompt directly on the device, at the
official widths (``flashvsr bench``, ``FlashVSR.random``), at the golden fixtures' reduced widths
('tiny') or at the smallest widths the architecture allows ('micro'). ``randomize`` fills a module
with scale-aware values, so activations keep a sensible range through all layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ...models.dit import DiTConfig, WanDiT
from ...models.lq_projector import LQProjector, LQProjectorConfig
from ...models.tcdecoder import TCDecoder, TCDecoderConfig
from ..config import Mode, Version

TINY_DIT = DiTConfig(dim=256, ffn_dim=512, text_dim=64, num_heads=2, num_layers=2)
TINY_PROJECTOR = LQProjectorConfig(hidden1=64, hidden2=96, out_dim=256)
TINY_TCDECODER = TCDecoderConfig(channels=(64, 32, 16, 16))
TINY_PROMPT = (1, 32, 64)
# "micro": the smallest widths the architecture allows (one 128-wide head); behaviour tests only
MICRO_DIT = DiTConfig(dim=128, ffn_dim=128, text_dim=32, num_heads=1, num_layers=1)
MICRO_PROJECTOR = LQProjectorConfig(hidden1=16, hidden2=16, out_dim=128)
MICRO_TCDECODER = TCDecoderConfig(channels=(16, 8, 8, 8))
MICRO_PROMPT = (1, 8, 32)
FULL_PROMPT = (1, 512, 4096)


def tiny_vae_config():
    """The Wan VAE decoder at the reduced width the tests use."""
    from ...models.wan_vae import WanVAEConfig
    return WanVAEConfig(base_dim=8)


def full_vae_config():
    from ...models.wan_vae import WanVAEConfig
    return WanVAEConfig()


@torch.no_grad()
def randomize(module: nn.Module, gen: torch.Generator) -> nn.Module:
    """Scale-aware random values: weights ~ N(0, 1/fan_in), biases small, norm gains near 1."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        cpu = torch.empty(p.shape, dtype=torch.float32)
        if leaf in ("gamma",) or (leaf == "weight" and p.ndim == 1):
            cpu.normal_(1.0, 0.1, generator=gen)
        elif leaf == "modulation":
            cpu.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
        elif p.ndim >= 2:
            cpu.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
        else:
            cpu.normal_(0.0, 0.05, generator=gen)
        p.copy_(cpu.to(device=p.device, dtype=p.dtype))
    return module


def make_random(factory, device, dtype, gen) -> nn.Module:
    """``factory()`` built on the meta device, then materialised on ``device`` and randomised."""
    with torch.device("meta"):
        net = factory()
    net = net.to_empty(device=device).to(dtype)
    return randomize(net, gen).eval().requires_grad_(False)


def random_networks(mode, version, device, dtype, size: str = "full", seed: int = 0):
    """(dit, projector, decoder, prompt) with random weights.

    size: 'full' (official widths, for speed tests), 'tiny' (the fixtures' reduced widths) or 'micro'.
    """
    sizes = {"full": (DiTConfig(), LQProjectorConfig(), TCDecoderConfig(), FULL_PROMPT),
             "tiny": (TINY_DIT, TINY_PROJECTOR, TINY_TCDECODER, TINY_PROMPT),
             "micro": (MICRO_DIT, MICRO_PROJECTOR, MICRO_TCDECODER, MICRO_PROMPT)}
    if size not in sizes:
        raise ValueError(f"size must be one of {sorted(sizes)}, got {size!r}")
    dit_cfg, proj_cfg, tc_cfg, prompt_shape = sizes[size]
    mode, version = Mode.parse(mode), Version.parse(version)
    gen = torch.Generator("cpu").manual_seed(seed)
    dit = make_random(lambda: WanDiT(dit_cfg), device, dtype, gen)
    projector = make_random(lambda: LQProjector(proj_cfg, causal=version is Version.V1_1), device, dtype, gen)
    if mode is Mode.FULL:
        from ...models.wan_vae import WanVAEDecoder
        cfg = full_vae_config() if size == "full" else tiny_vae_config()
        decoder = make_random(lambda: WanVAEDecoder(cfg), device, dtype, gen)
    else:
        decoder = make_random(lambda: TCDecoder(tc_cfg), device, dtype, gen)
    prompt = torch.randn(prompt_shape, generator=gen).to(torch.bfloat16)
    return dit, projector, decoder, prompt
