"""Finding, reading and validating FlashVSR weight files (official files and common repacks).

Layout of the models folder (see ``weight_files`` for the tables and their sources)::

    <models>/FlashVSR/v1/     diffusion_pytorch_model_streaming_dmd.safetensors, LQ_proj_in.ckpt
    <models>/FlashVSR/v1.1/   the same names, v1.1 weights
    <models>/FlashVSR/        TCDecoder.ckpt, Wan2.1_VAE.pth, posi_prompt.pth (identical for both
                              versions; also accepted inside either version folder), and repacks
                              under their own names (Kijai's Wan2_1_*FlashVSR*.safetensors, 1038lab's
                              FlashVSR1_1.safetensors, LQ_proj_in/TCDecoder/Prompt/Wan2.1_VAE.safetensors)

Pickles (.ckpt/.pth) are only ever read with ``torch.load(weights_only=True, map_location="cpu")``.
This module reads and checks files; building the networks from them is ``engine/loader.py``'s job.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .download import Progress, DownloadError, fetch, hub_endpoint, offline_reason
from .checks import (Header, MissingFile, MissingWeights, WeightError, check_dit_blocks, check_role, check_size,
                            detect_role, fmt_bytes, official_name, read_header, role_mismatch, sha256_of)
from .catalog import (CATALOG, KNOWN_FILES, ROLE_TITLES, SHARED_ROLES, VERSIONS, Catalog,
                           KnownFile, check_version_mode, official_paths, repack_paths, roles_for_mode)

__all__ = [
    "COMMON_PREFIXES", "KNOWN_FILES", "FileStatus", "MissingWeights", "WeightError", "WeightFiles",
    "check_models_folder", "ensure_weights", "locate_weights", "read_prompt", "read_state_dict",
    "sha256_of",
]

log = logging.getLogger(__name__)

COMMON_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
WRAPPER_KEYS = ("state_dict", "model_state", "model", "module")
# torch.load(weights_only=True) before 2.6 can be made to run code (CVE-2025-32434).
SAFE_UNPICKLING_TORCH = (2, 6)


@dataclass(frozen=True)
class WeightFiles:
    dit: Path
    lq_proj: Path
    prompt: Path
    tcdecoder: Path | None  # tiny / tiny-long only
    vae: Path | None  # full only


@dataclass(frozen=True)
class FileStatus:
    label: str  # e.g. "v1.1 DiT", "TCDecoder", "repack FlashVSR1_1.safetensors (1038lab/FlashVSR)"
    role: str
    state: str  # "present" | "missing" | "corrupt"
    path: Path  # where it is, or (missing) where to put it
    detail: str = ""


# ---------------------------------------------------------------- reading

def _refuse_unsafe_unpickling(path: Path, role: str | None) -> None:
    """Never unpickle with a torch whose weights_only guard can be bypassed; say how to get past it."""
    found = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if found is None or (int(found.group(1)), int(found.group(2))) >= SAFE_UNPICKLING_TORCH:
        return
    names = sorted({r.filename for r in CATALOG.repacks if role is None or r.role == role})
    raise WeightError(f"{path}: not opened: this is a pickle checkpoint and torch {torch.__version__} is older "
                      f"than 2.6, whose torch.load(weights_only=True) a crafted file can get past to run code "
                      f"(CVE-2025-32434). Upgrade torch (pip install -U \"torch>=2.6\", see README.md) or put "
                      f"the safetensors repack in the FlashVSR models folder instead: {', '.join(names)}.")


def _torch_load(path: Path, role: str | None = None):
    _refuse_unsafe_unpickling(path, role)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightError(f"{path}: refused: the checkpoint contains Python objects that "
                          f"torch.load(weights_only=True) will not run ({first}). The official files are "
                          f"plain tensors; use the official file instead of this one.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise WeightError(f"{path}: cannot be read as a PyTorch checkpoint ({exc}); the file is "
                          f"corrupt. Delete it and download it again.") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise WeightError(f"{path}: cannot be read as safetensors ({exc}); the file is corrupt. "
                          f"Delete it and download it again.") from None


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and len(obj) == 1:
        (key, value), = obj.items()
        if key in WRAPPER_KEYS and isinstance(value, Mapping):
            obj = value
        else:
            break
    if isinstance(obj, torch.Tensor):
        raise WeightError(f"{path}: holds a single tensor of shape {tuple(obj.shape)}, not a state dict "
                          f"(a prompt embedding?); it cannot be loaded as network weights.")
    if not isinstance(obj, Mapping) or not obj:
        raise WeightError(f"{path}: holds {type(obj).__name__}"
                          f"{' (empty)' if isinstance(obj, Mapping) else ''}, not a state dict of tensors.")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightError(f"{path}: besides tensors the checkpoint holds {', '.join(bad[:4])}"
                          f"{' …' if len(bad) > 4 else ''}; expected a plain state dict (name -> tensor). "
                          f"If the weights are nested under one of these entries, save that entry alone.")
    return dict(obj)


def _strip_one_prefix(sd: dict[str, torch.Tensor], prefixes: Sequence[str]) -> dict[str, torch.Tensor]:
    for prefix in prefixes:
        if prefix and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: Path | str, *, strip_prefixes: Sequence[str] = (),
                    role: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors file or a weights-only pickle.

    A dict nested under ``state_dict`` / ``model_state`` / ``model`` / ``module`` is unwrapped when it
    is the checkpoint's only entry. ``strip_prefixes``: the first of these that every key starts with
    is removed (e.g. ``COMMON_PREFIXES``); nothing is stripped unless asked. ``role`` ("dit",
    "lq_proj", "tcdecoder", "vae"): raise if the file holds a different network.
    """
    path = Path(path)
    if isinstance(strip_prefixes, str):
        strip_prefixes = (strip_prefixes,)
    header = read_header(path)
    expected = CATALOG.official_file("v1.1", role).filename if role else ""
    if role:
        check_role(path, header, role, expected)  # before loading gigabytes of the wrong file
    if header.kind == "safetensors":
        sd = _load_safetensors(path)
    else:
        sd = _unwrap(_torch_load(path, role), path)
    if role and header.keys is None and header.pickle_bytes is None:
        found = detect_role(tuple(sd))
        if found != role:
            raise role_mismatch(path, role, found, expected)
    if role == "dit" and header.shapes is None:          # a pickle: its shapes are known only now
        check_dit_blocks(path, {k: tuple(v.shape) for k, v in sd.items()})
    return _strip_one_prefix(sd, strip_prefixes)


def read_prompt(path: Path | str) -> torch.Tensor:
    """Read the fixed prompt embedding: a bare-tensor pickle or a one-tensor safetensors file."""
    path = Path(path)
    header = read_header(path)
    check_role(path, header, "prompt", "posi_prompt.pth")
    obj = _load_safetensors(path) if header.kind == "safetensors" else _torch_load(path, "prompt")
    if isinstance(obj, Mapping) and len(obj) == 1:
        (obj,) = obj.values()
    if not isinstance(obj, torch.Tensor):
        what = f"a dict with {len(obj)} entries" if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightError(f"{path}: a prompt embedding is a single tensor of shape (1, L, C); this file "
                          f"holds {what}. Use posi_prompt.pth from the official FlashVSR repository.")
    if obj.ndim != 3 or obj.shape[0] != 1 or not obj.is_floating_point():
        raise WeightError(f"{path}: a prompt embedding has shape (1, L, C) and a float dtype; found shape "
                          f"{tuple(obj.shape)} {obj.dtype}. Use posi_prompt.pth (1, 512, 4096) bf16.")
    return obj


# ---------------------------------------------------------------- locating

def _as_roots(roots: Sequence[Path | str] | Path | str) -> tuple[Path, ...]:
    if isinstance(roots, (str, Path)):
        roots = (roots,)
    out = tuple(Path(r) for r in roots)
    if not out:
        raise ValueError("at least one models/FlashVSR folder is needed, got none")
    return out


def _check_file(path: Path, role: str, known: KnownFile | None, expected_name: str) -> Header:
    # No size comparison here: truncation is caught from the file's own structure, and other sizes
    # are legitimate (repacks, reduced test weights); verify_sha256 / doctor --deep compare bytes.
    header = read_header(path, known)
    check_role(path, header, role, expected_name)
    return header


def _find(roots: tuple[Path, ...], version: str, role: str, catalog: Catalog) -> Path | None:
    known = catalog.official_file(version, role)
    for path in official_paths(roots, version, role, known.filename):
        if path.exists():
            _check_file(path, role, known, known.filename)
            return path
    for repack in catalog.repacks_for(version, role):
        for path in repack_paths(roots, (repack,)):
            if path.exists():
                _check_file(path, role, None, known.filename)
                log.info("[FlashVSR] Using the %s repack %s for the %s %s (no official %s found)",
                         repack.origin, path, version, ROLE_TITLES[role], known.filename)
                return path
    return None


def _ambiguity_hint(roots: tuple[Path, ...], role: str, known: KnownFile, catalog: Catalog) -> str:
    """Point out an official version-specific file sitting where its version cannot be told."""
    if role in SHARED_ROLES:
        return ""
    stray = [root / known.filename for root in roots if (root / known.filename).is_file()]
    if not stray:
        return ""
    hashes = ", ".join(f"{v}: sha256 {catalog.official_file(v, role).sha256}" for v in VERSIONS)
    return (f"{stray[0]} exists, but outside a version folder it is not used because v1 and v1.1 share "
            f"this name; move it into {stray[0].parent / 'v1'} or {stray[0].parent / 'v1.1'} ({hashes}).")


def _missing(roots: tuple[Path, ...], version: str, role: str, catalog: Catalog,
             endpoint: str | None) -> MissingFile:
    known = catalog.official_file(version, role)
    return MissingFile(role=role, filename=known.filename,
                       paths=official_paths(roots, version, role, known.filename),
                       url=known.url(hub_endpoint(endpoint)),
                       repacks=tuple(r.filename for r in catalog.repacks_for(version, role)),
                       hint=_ambiguity_hint(roots, role, known, catalog))


def locate_weights(roots: Sequence[Path | str], version: str, mode: str, *,
                   catalog: Catalog = CATALOG, endpoint: str | None = None) -> WeightFiles:
    """Find the files a run needs; check each cheaply (format, completeness, which network).

    Raises MissingWeights listing every absent file with the exact paths it may be put at, and
    WeightError for a present file that is unusable.
    """
    roots = _as_roots(roots)
    check_version_mode(version, mode)
    found, missing = {}, []
    for role in roles_for_mode(mode):
        path = _find(roots, version, role, catalog)
        if path is None:
            missing.append(_missing(roots, version, role, catalog, endpoint))
        else:
            found[role] = path
    if missing:
        raise MissingWeights(version, mode, missing)
    return WeightFiles(dit=found["dit"], lq_proj=found["lq_proj"], prompt=found["prompt"],
                       tcdecoder=found.get("tcdecoder"), vae=found.get("vae"))


def _sha_problem(path: Path, known: KnownFile, catalog: Catalog, endpoint: str | None) -> str | None:
    if known.sha256 is None:
        return None
    try:
        check_size(path, known)
    except WeightError as exc:
        return str(exc)
    actual = sha256_of(path)
    if actual == known.sha256:
        return None
    text = f"{path}: sha256 {actual} is not that of {official_name(known)} ({known.sha256})."
    others = [f for f in catalog.identify(actual) if (f.version, f.role) != (known.version, known.role)]
    if others:
        f = others[0]
        return (f"{text} It is the official {f.version} {ROLE_TITLES[f.role]} ({f.filename}): move it to "
                f"the {f.version} folder, and put the {known.version} file here ({known.url(endpoint)}).")
    return f"{text} Delete it and download it again from {known.url(endpoint)}"


def _verify(files: WeightFiles, version: str, catalog: Catalog, endpoint: str | None) -> None:
    for role in ("dit", "lq_proj", "prompt", "tcdecoder", "vae"):
        path = getattr(files, role)
        known = catalog.official_file(version, role)
        if path is None or path.name != known.filename:
            continue  # repacks have no published hash
        problem = _sha_problem(path, known, catalog, hub_endpoint(endpoint))
        if problem:
            raise WeightError(problem)


def ensure_weights(roots: Sequence[Path | str], version: str, mode: str, *, download: bool = True,
                   progress: Progress | None = None, verify_sha256: bool = False,
                   catalog: Catalog = CATALOG, endpoint: str | None = None,
                   timeout: float | None = None) -> WeightFiles:
    """Locate the files; download only the missing official ones into ``roots[0]/<version>/``.

    Offline (``HF_HUB_OFFLINE``, ``download=False``) or when a download fails, raises MissingWeights
    saying why and where to put the files. ``progress`` receives a ``DownloadStatus`` several times a
    second while a file downloads, on this thread; whatever it raises (a cancel) stops the download
    and propagates, leaving no partial file. ``timeout``: seconds the hub may stay silent before the
    download fails (default: ``FLASHVSR_DOWNLOAD_TIMEOUT``, else 60). ``verify_sha256`` checks official
    files against the published hashes (a few seconds per GB).
    """
    roots = _as_roots(roots)
    try:
        files = locate_weights(roots, version, mode, catalog=catalog, endpoint=endpoint)
    except MissingWeights as missing:
        reason = offline_reason(download)
        if reason:
            raise missing.with_reason(reason) from None
        for n, item in enumerate(missing.missing):
            try:
                fetch(catalog.sources(version, item.role), roots[0] / version, endpoint=endpoint,
                      progress=progress, timeout=timeout, part=(n + 1, len(missing.missing)))
            except DownloadError as exc:
                raise MissingWeights(version, mode, missing.missing[n:],
                                     f"downloading {item.filename} failed ({exc})") from None
        files = locate_weights(roots, version, mode, catalog=catalog, endpoint=endpoint)
    if verify_sha256:
        _verify(files, version, catalog, endpoint)
    return files


# ---------------------------------------------------------------- doctor

def _status(label: str, path: Path, role: str, known: KnownFile | None, deep: bool,
            catalog: Catalog, endpoint: str | None) -> FileStatus:
    expected = catalog.official_file("v1.1", role).filename
    checked = "header ok"
    try:
        _check_file(path, role, known, expected)
        if deep:
            if role == "prompt":
                read_prompt(path)
            else:
                read_state_dict(path, role=role)
            problem = _sha_problem(path, known, catalog, endpoint) if known else None
            if problem:
                return FileStatus(label, role, "corrupt", path, problem)
            checked = "loads, sha256 " + ("ok" if known and known.sha256 else "not published")
    except WeightError as exc:
        return FileStatus(label, role, "corrupt", path, str(exc))
    size = path.stat().st_size
    if known and known.size is not None and size != known.size:
        checked += (f"; not the official file's size ({known.size} bytes), so not the official file: "
                    f"fine for a repack or test weights, otherwise run the deep check")
    return FileStatus(label, role, "present", path, f"{fmt_bytes(size)}, {checked}")


def check_models_folder(roots: Sequence[Path | str], *, deep: bool = False, catalog: Catalog = CATALOG,
                        endpoint: str | None = None) -> list[FileStatus]:
    """Status of every known file in the models folders, for ``doctor``.

    Cheap by default (headers only); ``deep=True`` also loads each file and checks its sha256.
    Repacks are listed only when present.
    """
    roots = _as_roots(roots)
    endpoint = hub_endpoint(endpoint)
    groups = [(f"{v} {ROLE_TITLES[r]}", v, r) for v in VERSIONS for r in ("dit", "lq_proj")]
    groups += [(ROLE_TITLES[r], "v1.1", r) for r in ("tcdecoder", "vae", "prompt")]
    out = []
    for label, version, role in groups:
        known = catalog.official_file(version, role)
        present = [p for p in official_paths(roots, version, role, known.filename) if p.exists()]
        for path in present:
            out.append(_status(label, path, role, known, deep, catalog, endpoint))
        if not present:
            item = _missing(roots, version, role, catalog, endpoint)
            detail = f"download: {item.url}" + (f"; {item.hint}" if item.hint else "")
            out.append(FileStatus(label, role, "missing", roots[0] / version / known.filename, detail))
    for repack in catalog.repacks:
        for path in repack_paths(roots, (repack,)):
            if path.exists():
                label = f"repack {repack.filename} ({repack.origin}, for {'/'.join(repack.versions)})"
                out.append(_status(label, path, repack.role, None, deep, catalog, endpoint))
    return out
