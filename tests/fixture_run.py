"""Run one golden-fixture case (format ``flashvsr_ref`` v1) through our engine, recording stages.

Used by the parity tests and by the GPU parity check (scripts/gpu_profile.py); the cases and their
format are described in tests/fixtures/flashvsr_ref/README.md. A slim case (one with a ``slim`` entry
in its JSON) stores no weights: ``load_case`` rebuilds them from the recipe and checks their sha256.
"""
from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass, field

import torch

from comfyui_flashvsr.attention import AttentionDispatcher
from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.engine.frames import FrameSource
from comfyui_flashvsr.flashvsr.engine.loader import build_decoder, build_dit, build_projector
from comfyui_flashvsr.flashvsr.engine.preprocess import Upsampler, plan_geometry
from comfyui_flashvsr.flashvsr.engine.stream import EngineModels, run_stream

from flashvsr_tests_fixture_weights import digest, regenerate

SHIPPED = pathlib.Path(__file__).resolve().parent / "fixtures" / "flashvsr_ref"

KNOWN_COMPONENTS = ("weights/dit/", "weights/lq_proj/", "weights/tcdecoder/")


@dataclass
class Case:
    meta: dict
    tensors: dict[str, torch.Tensor]

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}


@dataclass
class CaseRun:
    consts: object
    lq_hr_u8: torch.Tensor
    stage: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    draft: list[dict] = field(default_factory=list)
    decoded: torch.Tensor | None = None      # (3, T, H, W) float32, before the colour fix
    final: torch.Tensor | None = None        # (3, T, H, W) in [-1, 1]
    attention: dict = field(default_factory=dict)   # the attention session's report (which backends ran)


class FixtureWeightsMismatch(AssertionError):
    """The recipe rebuilt weights whose sha256 is not the one the case records."""


def case_folders() -> list[pathlib.Path]:
    """The shipped cases, then any folder listed in $FLASHVSR_FIXTURES (os.pathsep-separated)."""
    extra = [pathlib.Path(p) for p in os.environ.get("FLASHVSR_FIXTURES", "").split(os.pathsep) if p]
    return [SHIPPED] + [p for p in extra if p.resolve() != SHIPPED]


def case_files() -> list[pathlib.Path]:
    return [c for folder in case_folders() for c in sorted(folder.glob("case_*.json"))]


def load_case(path: pathlib.Path, meta: dict) -> Case:
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    slim = meta.get("slim")
    if slim is not None:
        weights = regenerate(meta["weight_recipe"], meta["tensors"])
        got = digest(weights)
        if got != slim["weights_sha256"] or len(weights) != slim["weights_count"]:
            raise FixtureWeightsMismatch(
                f"{path.name}: the weight recipe rebuilt {len(weights)} tensors with sha256 {got}, the case "
                f"records {slim['weights_count']} with {slim['weights_sha256']} (did torch.randn on the CPU "
                "change? see tests/fixtures/flashvsr_ref/README.md)")
        tensors.update(weights)
    return Case(meta, tensors)


def _vae_prefix(case: Case) -> str | None:
    """The weights/<component>/ folder holding a Wan VAE (its name is not fixed by format v1)."""
    prefixes = {k[: k.index("/", len("weights/")) + 1] for k in case.tensors
                if k.startswith("weights/") and k.count("/") >= 2}
    for prefix in sorted(prefixes - set(KNOWN_COMPONENTS)):
        names = [k[len(prefix):] for k in case.tensors if k.startswith(prefix)]
        if any(n.split("decoder.", 1)[-1].startswith(("middle.", "upsamples.")) for n in names):
            return prefix
    return None


def _decoder_kind(case: Case) -> str:
    declared = str(case.meta.get("case_params", {}).get("decoder", "tiny")).lower()
    if declared in ("full", "vae", "wan_vae") or _vae_prefix(case) is not None:
        return "full"
    return "tiny"


def run_case(case: Case, dtype: torch.dtype, device: str = "cpu", sageattention: str = "disable",
             fast: bool = False, kv_int8_values: bool = False) -> CaseRun:
    """``fast`` (CUDA): the pipeline's own fast path (``FlashVSR.engine_models``: compiled DiT glue, the
    projector's stacked-tap convolutions, the compiled TCDecoder passes with the folded tail), to
    check it against the official outputs too."""
    p = case.meta["case_params"]
    cfg = UpscaleConfig(scale=float(p["scale"]), sparse_ratio=float(p["sparse_ratio"]),
                        kv_ratio=float(p["kv_ratio"]), local_range=int(p["local_range"]),
                        color_fix="adain", preprocess="official", sageattention=sageattention,
                        kv_int8_values=kv_int8_values)
    dit = build_dit(case.weights("weights/dit/"), device, dtype)
    projector = build_projector(case.weights("weights/lq_proj/"), p["version"], device, dtype)
    if _decoder_kind(case) == "full":
        prefix = _vae_prefix(case)
        if prefix is None:
            raise ValueError(f"case {case.meta.get('case')} uses the Full decoder but stores no Wan VAE "
                             "weights under weights/<name>/")
        decoder = build_decoder("full", case.weights(prefix), device, dtype)
    else:
        decoder = build_decoder("tiny", case.weights("weights/tcdecoder/"), device, dtype)
    prompt = case.tensors["input/prompt_context"]
    if fast:
        from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
        pipe = FlashVSR(dit, projector, decoder.net, prompt, _decoder_kind(case), p["version"], device, dtype)
        models = pipe.engine_models(cfg)
    else:
        models = EngineModels(dit, projector, decoder, dit.prepare(prompt), torch.device(device), dtype)
    consts = models.consts

    frames = case.tensors["input/lq_lowres_u8"]
    geom = plan_geometry(frames.shape[1], frames.shape[2], cfg.scale, official=True)
    up = Upsampler(geom, "cpu", torch.float32)
    n_model = case.meta["geometry"]["F"]
    lq_u8 = [((up(frames[min(i, frames.shape[0] - 1)]) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0)
             for i in range(n_model)]
    run = CaseRun(consts=consts, lq_hr_u8=torch.stack(lq_u8))
    pooled: dict[int, dict] = {}

    def observe(name: str, k: int, t: torch.Tensor) -> None:
        if name.endswith("/block_mask"):
            run.masks[(k, int(name.split("/")[0][5:]))] = t.detach().cpu()
        elif name.startswith("layer0/pooled_"):
            pooled.setdefault(k, {})[name.split("/")[1]] = t.detach().float().cpu()
        else:
            run.stage.setdefault(name, []).append(t.detach().float().cpu())

    attn = AttentionDispatcher().session(sageattention, int8_values=kv_int8_values)
    list(run_stream(models, FrameSource(frames), geom, cfg, attn, noise=case.tensors["input/noise"], observer=observe))
    run.attention = attn.report()
    run.decoded = torch.cat([f[0] for f in run.stage["frames_decoded"]], dim=1)
    run.final = torch.cat(run.stage["frames_final"], dim=0).transpose(0, 1)
    run.draft = [_draft_details(pooled[k], dit, geom, cfg, k) for k in sorted(pooled)]
    return run


def _draft_details(pooled: dict, dit, geom, cfg: UpscaleConfig, k: int) -> dict:
    """Recompute layer 0's draft softmax from the pooled tensors the engine used."""
    from comfyui_flashvsr.models.lcsa import draft_block_mask, local_block_mask, topk_count, topk_ratio_for
    bh, bw = geom.model_h // 128, geom.model_w // 128
    local = local_block_mask(bh, bw, cfg.local_range)
    s1 = bh * bw
    groups = pooled["pooled_q"].shape[0] // s1
    _, details = draft_block_mask(pooled["pooled_q"], pooled["pooled_k"], dit.cfg.num_heads, groups, local,
                                  topk_count(s1, topk_ratio_for(cfg.sparse_ratio, geom.model_h, geom.model_w)),
                                  return_details=True)
    details.update(pooled_q=pooled["pooled_q"], pooled_k=pooled["pooled_k"], local_mask=local)
    return details
