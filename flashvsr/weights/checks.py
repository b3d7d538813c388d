"""Cheap checks on weight files: format, completeness, which model a file holds, sha256.

Nothing here loads tensors; every check reads at most the file's header (safetensors JSON, the zip
directory and ``data.pkl`` of a PyTorch checkpoint), so the DiT's 5.7 GB are never touched.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from .catalog import CATALOG, ROLE_TITLES, SHARED_ROLES, KnownFile

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_MAX_DATA_PKL = 64 * 1024 * 1024

# Keys that only one of the networks has (matched as suffixes, so a "model." prefix is tolerated);
# checked in this order because the VAE also has conv1/conv2 like the projector.
ROLE_SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("dit", ("patch_embedding.weight", "blocks.0.self_attn.q.weight", "head.head.weight")),
    ("tcdecoder", ("decoder.1.weight", "decoder.26.weight")),
    ("vae", ("decoder.conv1.weight", "decoder.head.2.weight")),
    ("lq_proj", ("conv1.weight", "norm1.gamma", "linear_layers.0.weight")),
)


# Every DiT FlashVSR ships or accepts (official files, repacks) is Wan2.1-1.3B: at its width a file
# with another block count is incomplete, not a variant. Narrower test checkpoints are left alone.
WAN_1_3B_WIDTH, WAN_1_3B_BLOCKS = 1536, 30
_BLOCK_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


class WeightError(ValueError):
    """A weight file is unusable; the message names the file, what is wrong and what to do."""


@dataclass(frozen=True)
class MissingFile:
    role: str
    filename: str
    paths: tuple[Path, ...]  # where it may be put; downloads go to the first
    url: str
    repacks: tuple[str, ...] = ()  # names accepted instead, directly in a models/FlashVSR folder
    hint: str = ""


class MissingWeights(WeightError):
    """Files a run needs are absent; ``missing`` says which and ``expected_paths`` where to put them."""

    def __init__(self, version: str, mode: str, missing: Sequence[MissingFile], reason: str = "") -> None:
        self.version, self.mode, self.reason = version, mode, reason
        self.missing = tuple(missing)
        self.expected_paths = tuple(p for m in self.missing for p in m.paths)
        super().__init__(self._message())

    def with_reason(self, reason: str) -> "MissingWeights":
        return MissingWeights(self.version, self.mode, self.missing, reason)

    def _message(self) -> str:
        n = len(self.missing)
        lines = [f"FlashVSR {self.version} ({self.mode}) is missing {n} weight file{'s' * (n != 1)}"
                 + (f": {self.reason}." if self.reason else ".")]
        for m in self.missing:
            lines.append(f"  {ROLE_TITLES[m.role]} {m.filename}")
            where = "put it at" if len(m.paths) == 1 else "put it at one of"
            lines.append(f"    {where}: " + "\n      ".join(str(p) for p in m.paths))
            lines.append(f"    download: {m.url}")
            if m.repacks:
                lines.append(f"    or instead, directly in the FlashVSR folder: {', '.join(m.repacks)}")
            if m.hint:
                lines.append(f"    note: {m.hint}")
        return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def official_name(known: KnownFile) -> str:
    """E.g. 'the official v1.1 LQ_proj_in.ckpt'; no version for the files both versions share."""
    version = "" if known.role in SHARED_ROLES else f"{known.version} "
    return f"the official {version}{known.filename}"


def _fix_hint(known: KnownFile | None) -> str:
    if known is None:
        return "Delete it and download it again."
    return f"Delete it and download it again from {known.url()}"


@dataclass(frozen=True)
class Header:
    """What a cheap look at a file found."""

    kind: str  # "safetensors" | "zip-pickle" | "legacy-pickle"
    keys: tuple[str, ...] | None  # tensor names when cheaply readable (safetensors)
    shapes: dict[str, tuple[int, ...]] | None
    pickle_bytes: bytes | None  # data.pkl of a zip checkpoint: its key strings are stored verbatim


def _text_problem(head: bytes) -> str | None:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith(LFS_POINTER_PREFIX):
        return ("is a Git LFS pointer (a few lines of text), not the weights: it was copied from a git "
                "clone made without git-lfs")
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "is an HTML/XML page, not the weights: a browser or proxy saved an error or login page"
    if stripped.startswith((b"{\"error\"", b"entry not found", b"invalid username", b"repository not found")):
        return f"is a text error message from the download server ({stripped[:60]!r}), not the weights"
    return None


def _safetensors_header(path: Path, f, size: int, known: KnownFile | None) -> Header:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise WeightError(f"{path}: the safetensors header claims {n} bytes but the file has only "
                          f"{size}: the file is truncated or not a safetensors file. {_fix_hint(known)}")
    try:
        meta = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightError(f"{path}: the safetensors header is not valid JSON ({exc}): the file is "
                          f"corrupt. {_fix_hint(known)}") from None
    if not isinstance(meta, dict):
        raise WeightError(f"{path}: the safetensors header is not a JSON object: the file is corrupt. "
                          f"{_fix_hint(known)}")
    meta.pop("__metadata__", None)
    data_size, end = size - 8 - n, 0
    shapes = {}
    for key, entry in meta.items():
        try:
            begin, stop = entry["data_offsets"]
            shapes[key] = tuple(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise WeightError(f"{path}: tensor {key!r} has a malformed safetensors header entry: the file "
                              f"is corrupt. {_fix_hint(known)}") from None
        end = max(end, int(stop))
    if end > data_size:
        raise WeightError(f"{path}: the file is truncated: its header describes {fmt_bytes(end)} of "
                          f"tensor data but only {fmt_bytes(data_size)} follow (an interrupted download?). "
                          f"{_fix_hint(known)}")
    if end < data_size:
        raise WeightError(f"{path}: {data_size - end} unexpected bytes after the last tensor: the file is "
                          f"corrupt. {_fix_hint(known)}")
    if not meta:
        raise WeightError(f"{path}: the safetensors file holds no tensors. {_fix_hint(known)}")
    return Header("safetensors", tuple(meta), shapes, None)


def _zip_header(path: Path, known: KnownFile | None) -> Header:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = [name for name in names if name.endswith("data.pkl")]
            if len(pkl) != 1:
                raise WeightError(f"{path}: a zip archive but not a PyTorch checkpoint (no single data.pkl "
                                  f"among {names[:5]}). {_fix_hint(known)}")
            info = archive.getinfo(pkl[0])
            data = archive.read(pkl[0]) if info.file_size <= _MAX_DATA_PKL else None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise WeightError(f"{path}: the PyTorch checkpoint is truncated or corrupt ({exc}): its zip "
                          f"directory at the end of the file is missing or damaged (an interrupted "
                          f"download?). {_fix_hint(known)}") from None
    return Header("zip-pickle", None, None, data)


def read_header(path: Path, known: KnownFile | None = None) -> Header:
    """Check that ``path`` is a complete weight file of the format its name promises.

    Raises WeightError for a missing/empty file, a folder, a Git LFS pointer, an HTML or text page,
    a truncated or corrupt file, or a format that does not match the name. ``known`` only adds the
    download URL to the advice; ``check_size`` compares with the official size.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightError(f"{path}: is a folder, expected a weight file. Remove the folder and put the "
                          f"file there instead.")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(256)
            if size == 0:
                raise WeightError(f"{path}: the file is empty (0 bytes). {_fix_hint(known)}")
            problem = _text_problem(head)
            if problem:
                raise WeightError(f"{path}: {problem} ({size} bytes). {_fix_hint(known)}")
            suffix = path.suffix.lower()
            if head.startswith(b"PK\x03\x04"):
                kind = "zip-pickle"
            elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                kind = "legacy-pickle"
            elif len(head) >= 9 and head[8:9] == b"{":
                kind = "safetensors"
            else:
                raise WeightError(f"{path}: not a safetensors file nor a PyTorch checkpoint (starts with "
                                  f"{head[:16]!r}). {_fix_hint(known)}")
            if suffix in SAFETENSORS_SUFFIXES and kind != "safetensors":
                raise WeightError(f"{path}: named {suffix} but holds a PyTorch pickle checkpoint. Rename it "
                                  f"to .pth, or download the real file. {_fix_hint(known)}")
            if suffix in PICKLE_SUFFIXES and kind == "safetensors":
                raise WeightError(f"{path}: named {suffix} but holds a safetensors file. Rename it to "
                                  f".safetensors, or download the real file. {_fix_hint(known)}")
            if kind == "safetensors":
                f.seek(0)
                return _safetensors_header(path, f, size, known)
    except FileNotFoundError:
        raise WeightError(f"{path}: the file does not exist.") from None
    except PermissionError as exc:
        raise WeightError(f"{path}: cannot be read ({exc}). Fix its permissions.") from None
    if kind == "zip-pickle":
        return _zip_header(path, known)
    return Header("legacy-pickle", None, None, None)


def check_size(path: Path, known: KnownFile | None) -> None:
    """Compare with the official size: the cheap first step of a sha256 verification."""
    if known is None or known.size is None:
        return
    size = Path(path).stat().st_size
    if size != known.size:
        what = "smaller" if size < known.size else "larger"
        raise WeightError(f"{path}: {fmt_bytes(size)} ({size} bytes), {what} than {official_name(known)} "
                          f"({known.size} bytes): not the official file "
                          f"(another precision or an incomplete copy). {_fix_hint(known)}")


def detect_role(keys: tuple[str, ...] | None = None, pickle_bytes: bytes | None = None) -> str | None:
    """Which network a state dict belongs to, from tensor names or the raw pickle bytes."""
    if keys is not None:
        def has(name: str) -> bool:
            return any(k == name or k.endswith("." + name) for k in keys)
    elif pickle_bytes is not None:
        def has(name: str) -> bool:
            return name.encode() in pickle_bytes
    else:
        return None
    for role, names in ROLE_SIGNATURES:
        if all(has(n) for n in names):
            return role
    return None


def role_mismatch(path: Path, role: str, found: str | None, expected_name: str) -> WeightError:
    what = f"the {ROLE_TITLES[found]}" if found else "no FlashVSR network we know"
    move = ""
    if found:
        move = (f" and move this one to where the {ROLE_TITLES[found]} belongs "
                f"({CATALOG.official_file('v1.1', found).filename})")
    return WeightError(f"{path}: this file holds {what}, not the {ROLE_TITLES[role]}. The "
                       f"{ROLE_TITLES[role]} file is {expected_name}; put the right file here{move}.")


def check_role(path: Path, header: Header, role: str, expected_name: str) -> None:
    """Raise if the header shows a different network than ``role`` (silent when it cannot tell)."""
    if role == "prompt":
        found = detect_role(header.keys, header.pickle_bytes)
        if found is not None:
            raise role_mismatch(path, role, found, expected_name)
        if header.shapes is not None and len(header.shapes) != 1:
            raise WeightError(f"{path}: a prompt embedding file holds exactly one tensor, this one holds "
                              f"{len(header.shapes)} (e.g. {list(header.shapes)[:3]}); it is not "
                              f"{expected_name}.")
        return
    if header.keys is None and header.pickle_bytes is None:
        return
    found = detect_role(header.keys, header.pickle_bytes)
    if found != role:
        raise role_mismatch(path, role, found, expected_name)
    if role == "dit" and header.shapes is not None:
        check_dit_blocks(path, header.shapes)      # from the header: before gigabytes load


def check_dit_blocks(path: Path, shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise if a DiT at the Wan2.1-1.3B width does not hold exactly its 30 blocks."""
    width = next((shape[0] for key, shape in shapes.items() if key.endswith("patch_embedding.weight")), None)
    if width != WAN_1_3B_WIDTH:
        return
    blocks = {int(m.group(1)) for key in shapes if (m := _BLOCK_KEY.search(key))}
    want = set(range(WAN_1_3B_BLOCKS))
    if blocks == want:
        return
    odd = [(what, sorted(ids)) for what, ids in (("missing", want - blocks), ("unexpected", blocks - want)) if ids]
    odd_text = "".join(f"; {what} blocks {ids[:5]}{' …' if len(ids) > 5 else ''}" for what, ids in odd)
    raise WeightError(f"{path}: holds {len(blocks)} DiT blocks, but the Wan2.1-1.3B DiT this file stands for "
                      f"(width {width}) has {WAN_1_3B_BLOCKS} (blocks 0-{WAN_1_3B_BLOCKS - 1}){odd_text}: the file is "
                      f"incomplete or another model. {_fix_hint(None)}")


def sha256_of(path: Path, chunk_size: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file, read in large chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()
