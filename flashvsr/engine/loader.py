"""Build the networks from state dicts: config inferred from shapes, strict key and shape checks.

Counts of the official checkpoints (docs/model.md §12): DiT 825 tensors, LQ projector 8,
TCDecoder 66, Wan VAE decoder subset 108. Smaller test checkpoints go through the same code.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from ...models.dit import DiTConfig, WanDiT
from ...models.lq_projector import LQProjector, LQProjectorConfig
from ...models.tcdecoder import COND_SHUFFLE, TCDecoder, TCDecoderConfig
from ..config import Version
from .decoders import FullDecoder, TinyDecoder

DIT_TENSORS = 825
PROJECTOR_TENSORS = 8
TCDECODER_TENSORS = 66


class CheckpointMismatch(ValueError):
    pass


def load_exact(module: nn.Module, sd: Mapping[str, torch.Tensor], *, what: str, source: str = "") -> None:
    """Strict load that names what is wrong: missing keys, unexpected keys, wrong shapes."""
    want = module.state_dict()
    missing = sorted(want.keys() - sd.keys())
    extra = sorted(sd.keys() - want.keys())
    bad = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(t.shape)}"
           for k, t in want.items() if k in sd and tuple(sd[k].shape) != tuple(t.shape)]
    if missing or extra or bad:
        where = f" ({source})" if source else ""
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys, e.g. {extra[:3]}")
        if bad:
            parts.append(f"{len(bad)} wrong shapes, e.g. {bad[:3]}")
        raise CheckpointMismatch(f"{what}{where} does not match the network: " + "; ".join(parts)
                                 + ". Is this the right file for this slot?")
    module.load_state_dict(dict(sd), strict=True, assign=True)


def _finish(module: nn.Module, device, dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _config(factory, sd, what: str, source: str):
    try:
        return factory(sd)
    except ValueError as err:
        raise CheckpointMismatch(f"{what} ({source or 'state dict'}): {err}. Is this the right file for this slot?") from None


def _build(make, config_from, sd, what: str, device, dtype, source: str):
    """Config from the shapes, network on the meta device, strict load (assigning the tensors), cast."""
    cfg = _config(config_from, sd, what, source)
    with torch.device("meta"):
        net = make(cfg)
    load_exact(net, sd, what=what, source=source)
    return _finish(net, device, dtype)


def build_dit(sd, device="cpu", dtype=torch.bfloat16, source: str = "") -> WanDiT:
    return _build(WanDiT, DiTConfig.from_state_dict, sd, "DiT", device, dtype, source)


def build_projector(sd, version, device="cpu", dtype=torch.bfloat16, source: str = "") -> LQProjector:
    causal = Version.parse(version) is Version.V1_1
    return _build(lambda cfg: LQProjector(cfg, causal=causal), LQProjectorConfig.from_state_dict, sd,
                  "LQ projector", device, dtype, source)


def build_tcdecoder(sd, device="cpu", dtype=torch.bfloat16, source: str = "") -> TCDecoder:
    return _build(TCDecoder, TCDecoderConfig.from_state_dict, sd, "TCDecoder", device, dtype, source)


def build_vae(sd, device="cpu", dtype=torch.bfloat16, source: str = ""):
    from ...models import wan_vae
    return _build(wan_vae.WanVAEDecoder, wan_vae.WanVAEConfig.from_state_dict, wan_vae.decoder_state_dict(sd),
                  "Wan VAE decoder", device, dtype, source)


def check_fit(dit: WanDiT, projector: LQProjector, decoder: nn.Module, prompt: torch.Tensor,
              sources: Sequence[str]) -> None:
    """Each file loads on its own, but where one network feeds another the widths must agree: a set
    mixed from different models (or sizes) would otherwise fail deep inside a run, or not at all.

    ``sources``: the DiT, projector, decoder and prompt files; the message names both files at fault.
    """
    dit_src, proj_src, dec_src, prompt_src = (s or "state dict" for s in sources)
    if not (isinstance(prompt, torch.Tensor) and prompt.ndim == 3 and prompt.shape[0] == 1):
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise CheckpointMismatch(f"prompt embedding ({prompt_src}): expected a (1, L, C) tensor, got {shape}")
    if isinstance(decoder, TCDecoder):     # its input is the latents behind the shuffled RGB condition
        latent = decoder.cfg.latent_channels - 3 * math.prod(COND_SHUFFLE)
    else:
        latent = decoder.config.z_dim
    pairs = (
        (projector.cfg.out_dim, dit.cfg.dim, f"the LQ projector ({proj_src}) makes tokens {{}} wide",
         f"the DiT ({dit_src}) is {{}} wide"),
        (prompt.shape[-1], dit.cfg.text_dim, f"the prompt embedding ({prompt_src}) is {{}} wide",
         f"the DiT ({dit_src}) takes text {{}} wide"),
        (latent, dit.cfg.out_dim, f"the decoder ({dec_src}) reads {{}} latent channels",
         f"the DiT ({dit_src}) makes {{}}"),
    )
    for got, want, this, that in pairs:
        if got != want:
            raise CheckpointMismatch(f"{this.format(got)} but {that.format(want)}: these files come from different "
                                     "models or sizes; use the files of one FlashVSR release together")


def build_decoder(kind: str, sd, device="cpu", dtype=torch.bfloat16, source: str = "", **vae_tiling):
    if kind == "full":
        return FullDecoder(build_vae(sd, device, dtype, source), **vae_tiling)
    return TinyDecoder(build_tcdecoder(sd, device, dtype, source))
