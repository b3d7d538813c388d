"""Which weight files FlashVSR needs, where they come from, and where they live on disk.

Models folder layout (``<models>`` is ComfyUI's models directory; every root passed to the
functions here is a folder equivalent to ``<models>/FlashVSR``, ComfyUI may register several)::

    <models>/FlashVSR/
        v1/      diffusion_pytorch_model_streaming_dmd.safetensors   LQ_proj_in.ckpt
        v1.1/    diffusion_pytorch_model_streaming_dmd.safetensors   LQ_proj_in.ckpt
        TCDecoder.ckpt  Wan2.1_VAE.pth  posi_prompt.pth      (identical for both versions: here,
                                                              or in either version folder)
        <repack files under their own names, e.g. FlashVSR1_1.safetensors, Prompt.safetensors>

The official names are the same in both versions although the DiT and the projector differ, hence one
folder per version. Downloads always go to ``<first root>/<version>/``.

Sources of the numbers below (the files themselves: docs/model.md §12):

* sha256 of the official files: Hugging Face file pages of ``JunhaoZhuang/FlashVSR`` (v1) and
  ``JunhaoZhuang/FlashVSR-v1.1``; v1.1 sizes and hashes also pinned by several third-party installers.
  v1 sizes of the DiT and projector are not confirmed anywhere we could read, so they are ``None``.
  The Wan VAE hash is the standard Wan 2.1 VAE (confirmed for v1.1, reported via a mirror for v1).
* Revisions: v1 ``f202bac…`` is a commit whose ``resolve/<commit>/README.md`` was served (its README
  already announces v1.1, so it postdates the weight uploads); v1.1 ``a258bf2…`` is the commit that
  third-party download scripts pin for ``hf_hub_download``. Neither was checked against the live Hub
  from here.
* ``posi_prompt.pth`` is only in the official GitHub repo (git blob ``95c840b2…``, 4,195,504 bytes,
  sha256 ``4601107a…``). Hugging Face copies: ``deAPI-ai/flashvsr-v1-1`` (reported byte-identical to
  GitHub's by a third-party model catalog) and ``varb15/posi_prompt`` (used by a third-party plugin).
  Their commits are unknown, so they are fetched at ``main`` and the sha256 is always checked.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import MODES, VERSIONS

ROLES = ("dit", "lq_proj", "prompt", "tcdecoder", "vae")
SHARED_ROLES = frozenset({"prompt", "tcdecoder", "vae"})  # byte-identical in v1 and v1.1
ROLE_TITLES = {
    "dit": "DiT",
    "lq_proj": "LQ projector",
    "prompt": "prompt embedding",
    "tcdecoder": "TCDecoder",
    "vae": "Wan 2.1 VAE",
}

HF_ENDPOINT = "https://huggingface.co"
REVISION_V1 = "f202bac12630875e4cab3fde6ca0090b838577c7"
REVISION_V1_1 = "a258bf2d58ac5a7d7193fb6ce4326aaff98ea6cb"
PROMPT_SHA256 = "4601107a11e4e11a936a6b79df579e54dbc99872132bf542151f0ffd65b4b1ef"


@dataclass(frozen=True)
class KnownFile:
    """One downloadable official file: what it is, its expected bytes, and a Hub location."""

    version: str
    role: str
    filename: str
    size: int | None  # bytes; None where no source confirms it
    sha256: str | None
    repo_id: str
    revision: str
    mirror: bool = False  # not the authors' repo: the download is only kept if its sha256 matches

    def url(self, endpoint: str | None = None) -> str:
        return f"{(endpoint or HF_ENDPOINT).rstrip('/')}/{self.repo_id}/resolve/{self.revision}/{self.filename}"


@dataclass(frozen=True)
class Repack:
    """A community repack accepted in place of an official file (never downloaded by us)."""

    filename: str
    role: str
    versions: tuple[str, ...]
    origin: str


@dataclass(frozen=True)
class Catalog:
    official: tuple[KnownFile, ...]
    repacks: tuple[Repack, ...]

    def sources(self, version: str, role: str) -> tuple[KnownFile, ...]:
        """Download sources for one file, in the order they are tried (several only for mirrors)."""
        found = tuple(f for f in self.official if f.version == version and f.role == role)
        if not found:
            raise KeyError(f"no official file for version {version!r}, role {role!r}")
        return found

    def official_file(self, version: str, role: str) -> KnownFile:
        return self.sources(version, role)[0]

    def repacks_for(self, version: str, role: str) -> tuple[Repack, ...]:
        return tuple(r for r in self.repacks if r.role == role and version in r.versions)

    def identify(self, sha256: str) -> tuple[KnownFile, ...]:
        """Every catalog entry whose bytes have this hash (to tell the user what a file really is)."""
        return tuple(f for f in self.official if f.sha256 == sha256)


def _version_files(version: str, repo_id: str, revision: str, dit_sha: str, lq_sha: str,
                   dit_size: int | None, lq_size: int | None) -> tuple[KnownFile, ...]:
    return (
        KnownFile(version, "dit", "diffusion_pytorch_model_streaming_dmd.safetensors", dit_size,
                  dit_sha, repo_id, revision),
        KnownFile(version, "lq_proj", "LQ_proj_in.ckpt", lq_size, lq_sha, repo_id, revision),
        KnownFile(version, "tcdecoder", "TCDecoder.ckpt", 189_018_333,
                  "e224bdcf2f52745cbf4d393ff5374c2ba09e90285d5d19062d2bf63b915b6161", repo_id, revision),
        KnownFile(version, "vae", "Wan2.1_VAE.pth", 507_609_880,
                  "38071ab59bd94681c686fa51d75a1968f64e470262043be31f7a094e442fd981", repo_id, revision),
        KnownFile(version, "prompt", "posi_prompt.pth", 4_195_504, PROMPT_SHA256,
                  "deAPI-ai/flashvsr-v1-1", "main", mirror=True),
        KnownFile(version, "prompt", "posi_prompt.pth", 4_195_504, PROMPT_SHA256,
                  "varb15/posi_prompt", "main", mirror=True),
    )


KNOWN_FILES: tuple[KnownFile, ...] = (
    _version_files("v1", "JunhaoZhuang/FlashVSR", REVISION_V1,
                   dit_sha="b05be65078a22000d8efdb6ce212133fd043255371c015329e9f3d31645c62c5",
                   lq_sha="7ad76b2cc682d72e9521c5fa6bf15850c974c8aff9a04c92882b49c0517ffb94",
                   dit_size=None, lq_size=None)
    + _version_files("v1.1", "JunhaoZhuang/FlashVSR-v1.1", REVISION_V1_1,
                     dit_sha="bd28180edcf3446c028e32fc6b731a80bf7e4da2ab4caac3186b9499964d37be",
                     lq_sha="d6d011cdaaba6a52645086caa08fa04124e746f6ca568140a24007591142bfd2",
                     dit_size=5_676_070_392, lq_size=575_694_948)
)

_KIJAI = "Kijai/WanVideo_comfy (FlashVSR/)"
_LAB1038 = "1038lab/FlashVSR"
REPACKS: tuple[Repack, ...] = (
    Repack("Wan2_1-T2V-1_3B_FlashVSR_fp32.safetensors", "dit", ("v1",), _KIJAI),
    Repack("Wan2_1_FlashVSR_LQ_proj_model_bf16.safetensors", "lq_proj", ("v1",), _KIJAI),
    Repack("Wan2_1_FlashVSR_TCDecoder_fp32.safetensors", "tcdecoder", VERSIONS, _KIJAI),
    Repack("FlashVSR1_1.safetensors", "dit", ("v1.1",), _LAB1038),
    # Uploaded together with the v1.1 DiT; 1038lab's pack only supports v1.1 since then.
    Repack("LQ_proj_in.safetensors", "lq_proj", ("v1.1",), _LAB1038),
    Repack("TCDecoder.safetensors", "tcdecoder", VERSIONS, _LAB1038),
    Repack("Prompt.safetensors", "prompt", VERSIONS, _LAB1038),
    Repack("Wan2.1_VAE.safetensors", "vae", VERSIONS, _LAB1038),
)

CATALOG = Catalog(official=KNOWN_FILES, repacks=REPACKS)


def check_version_mode(version: str, mode: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"FlashVSR version must be one of {VERSIONS}, got {version!r}")
    if mode not in MODES:
        raise ValueError(f"FlashVSR mode must be one of {MODES}, got {mode!r}")


def roles_for_mode(mode: str) -> tuple[str, ...]:
    """Files a mode loads: Full decodes with the Wan VAE, Tiny/Tiny-Long with the TCDecoder."""
    decoder = "vae" if mode == "full" else "tcdecoder"
    return ("dit", "lq_proj", "prompt", decoder)


def official_paths(roots: Sequence[Path], version: str, role: str, filename: str) -> tuple[Path, ...]:
    """Every place an official file may sit, most specific first."""
    paths = [root / version / filename for root in roots]
    if role in SHARED_ROLES:
        paths += [root / other / filename for root in roots for other in VERSIONS if other != version]
        paths += [root / filename for root in roots]
    return tuple(paths)


def repack_paths(roots: Sequence[Path], repacks: Sequence[Repack]) -> tuple[Path, ...]:
    return tuple(root / r.filename for r in repacks for root in roots)
