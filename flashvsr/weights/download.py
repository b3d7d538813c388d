"""Fetching official weight files from the Hugging Face Hub with ``hf_hub_download``.

Only single files are fetched (never a whole repo), at the pinned revision, straight into a folder
(``local_dir``), so nothing lands in the user's HF cache. What "resumable" means here:

* files already present are never fetched again, so an interrupted multi-file download continues
  with the files still missing;
* within one call, huggingface_hub retries a dropped connection (5 times) and resumes with an HTTP
  range request from the data it had already written;
* huggingface_hub writes to a temporary file and renames it when complete, so a folder never holds
  a partial file. A process killed mid-file: 2.x starts that file again next time (older versions
  resume their ``.incomplete`` file; hf_xet, for repos on Xet storage, re-uses its cached chunks).

``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a download starts (not when huggingface_hub was
imported), so a mirror or offline mode set later still applies.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from .checks import fmt_bytes, sha256_of
from .catalog import KnownFile

log = logging.getLogger(__name__)

# progress(filename, bytes_done, bytes_total or None), called as bytes arrive.
Progress = Callable[[str, int, "int | None"], None]

_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub itself treats as true


class DownloadError(Exception):
    """Every source of one file failed; the message lists each URL and why."""


def offline_reason(download: bool) -> str | None:
    """Why downloading is not allowed right now, or None when it is."""
    if not download:
        return "automatic download is off (download=False); put the files in place by hand"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return (f"{var}={os.environ[var]} is set, so nothing is downloaded; put the files in place "
                    f"by hand, or unset {var} to let FlashVSR download them")
    return None


def hub_endpoint(endpoint: str | None = None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's own errors are OSErrors; the HTTP client's transport errors are not, and the
    # client differs between huggingface_hub versions (httpx2, httpx, requests).
    found: list[type[BaseException]] = [OSError]
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _progress_class(progress: Progress, filename: str):
    from tqdm.std import tqdm  # a dependency of huggingface_hub

    class _ProgressBridge(tqdm):
        """A silent tqdm that forwards byte counts to ``progress``."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)
            self._size = kwargs.get("total")
            progress(filename, self._done, self._size)

        def update(self, n: float | None = 1) -> bool:
            self._done += int(n or 0)
            progress(filename, self._done, self._size)
            return True

    return _ProgressBridge


def _one_line(exc: BaseException) -> str:
    """First line of the error, plus its cause: huggingface_hub wraps HTTP errors (403, 5xx) in a
    generic "cannot find the requested files" error whose own text hides the status."""
    parts = []
    while exc is not None and len(parts) < 2:
        text = str(exc).strip().splitlines()
        parts.append(f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "))
        exc = exc.__cause__
    return "; caused by ".join(parts)


def fetch(sources: Sequence[KnownFile], dest_dir: Path, *, endpoint: str | None = None,
          progress: Progress | None = None) -> Path:
    """Download one file into ``dest_dir`` from the first source that works; return its path.

    A mirror's file is kept only if its sha256 is the expected one (the official repos are trusted
    as they are; ``verify_sha256`` in ``ensure_weights`` checks them on request).
    """
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: run `pip install huggingface_hub`, "
                            "or put the files in place by hand") from None
    endpoint = hub_endpoint(endpoint)
    errors = _transport_errors()
    accepts_tqdm = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    failures = []
    for source in sources:
        size = f"{fmt_bytes(source.size)}, " if source.size else ""
        log.info("[FlashVSR] Downloading %s (%s%s@%s) to %s", source.filename, size, source.repo_id,
                 source.revision[:12], dest_dir)
        kwargs = {}
        if progress is not None and accepts_tqdm:
            kwargs["tqdm_class"] = _progress_class(progress, source.filename)
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            path = Path(hf_hub_download(source.repo_id, source.filename, revision=source.revision,
                                        local_dir=dest_dir, endpoint=endpoint, **kwargs))
        except errors as exc:
            failures.append(f"{source.url(endpoint)}: {_one_line(exc)}")
            continue
        if source.mirror and source.sha256:
            actual = sha256_of(path)
            if actual != source.sha256:
                path.unlink()
                failures.append(f"{source.url(endpoint)}: served a file with sha256 {actual}, not the "
                                f"official {source.sha256}; discarded it")
                continue
        return path
    raise DownloadError("; ".join(failures))
