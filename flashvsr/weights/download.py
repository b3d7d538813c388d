"""Fetching official weight files from the Hugging Face Hub with ``hf_hub_download``.

Only single files are fetched (never a whole repo), at the pinned revision, straight into a folder
(``local_dir``), so nothing lands in the user's HF cache. What "resumable" means here:

* files already present are never fetched again, so an interrupted multi-file download continues
  with the files still missing;
* within one call, huggingface_hub retries a dropped connection and resumes with an HTTP range
  request from the data it had already written;
* huggingface_hub writes to a temporary file and renames it when complete, so a folder never holds
  a partial file under a weight's name. A failed, cancelled or timed-out file starts again next time.

Each file is fetched on a worker thread while the calling thread watches it (``_Transfer``): every
``POLL_S`` it hands a ``DownloadStatus`` to the caller's progress callback, which may raise to
cancel (ComfyUI's Cancel, Ctrl-C), and it gives up when the hub stays silent for the download
timeout (``FLASHVSR_DOWNLOAD_TIMEOUT``, default ``DEFAULT_TIMEOUT_S``). A hub that accepts the
connection and never answers would otherwise hold a download for minutes: huggingface_hub retries a
timed-out metadata request five more times with a 60 s timeout each. So the metadata request is
made once, without retries, before ``hf_hub_download`` runs, and huggingface_hub's retry warnings
from our worker are kept out of the log: a failure is reported once, by us.

After every attempt, successful or not, the bookkeeping huggingface_hub left in the models folder
for this file (``.cache/huggingface/download/<file>.lock``, ``.metadata``, ``*.incomplete``) is
removed, and the folders it created for it when they are empty again.

``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` are read when a download starts (not when huggingface_hub was
imported), so a mirror or offline mode set later still applies.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .checks import fmt_bytes, sha256_of
from .catalog import KnownFile

log = logging.getLogger(__name__)

TIMEOUT_ENV = "FLASHVSR_DOWNLOAD_TIMEOUT"
DEFAULT_TIMEOUT_S = 60.0   # longest the hub may stay silent: no answer to a request, no bytes
POLL_S = 0.25              # how often the progress callback runs (and so how soon Cancel is seen)
GRACE_S = 2.0              # how long a cancelled worker gets to stop before we clean up around it

_TRUE = {"1", "ON", "YES", "TRUE"}  # the values huggingface_hub itself treats as true


class DownloadError(Exception):
    """Every source of one file failed; the message lists each URL and why."""


@dataclass(frozen=True)
class DownloadStatus:
    """Where one file's download stands; handed to the progress callback every ``POLL_S``."""

    filename: str
    done: int                # bytes on disk for this file
    total: int | None        # bytes expected, once the hub said
    rate: float              # bytes per second since this file's transfer started
    index: int = 1           # this file's number among the files being fetched (1-based)
    count: int = 1
    finished: bool = False

    def line(self) -> str:
        """E.g. 'LQ_proj_in.ckpt (2/4): 1.20 GB of 5.67 GB (21%), 35.20 MB/s, ETA 0:02:07'."""
        text = f"{self.filename} ({self.index}/{self.count}): {fmt_bytes(self.done)}"
        if self.total:
            text += f" of {fmt_bytes(self.total)} ({100 * self.done // self.total}%)"
        if self.finished:
            return text + " done"
        text += f", {fmt_bytes(int(self.rate))}/s"
        if self.total and self.rate > 0 and self.done < self.total:
            left = int((self.total - self.done) / self.rate)
            text += f", ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
        return text


# Called on the thread that asked for the download; raising from it cancels the download.
Progress = Callable[[DownloadStatus], None]


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


def download_timeout(timeout: float | None = None) -> float:
    """Seconds the hub may stay silent: ``timeout``, else ``FLASHVSR_DOWNLOAD_TIMEOUT``, else 60."""
    if timeout is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT_S
        try:
            timeout = float(raw)
        except ValueError:
            raise DownloadError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. "
                                f"{DEFAULT_TIMEOUT_S:g}, or unset it") from None
    if not timeout > 0:
        raise DownloadError(f"the download timeout must be more than 0 seconds, got {timeout:g} "
                            f"(from {TIMEOUT_ENV} or the timeout argument)")
    return float(timeout)


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


def _named(exc: BaseException | None, *words: str) -> bool:
    """Whether ``exc`` or what caused it has a class named with one of ``words``: the HTTP clients
    differ between huggingface_hub versions, but all name their timeouts and connect errors so."""
    while exc is not None:
        if any(w in cls.__name__ for cls in type(exc).__mro__ for w in words):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_timeout(exc: BaseException | None) -> bool:
    return _named(exc, "Timeout")


def _one_line(exc: BaseException) -> str:
    """First line of the error, plus its cause: huggingface_hub wraps HTTP errors (403, 5xx) in a
    generic "cannot find the requested files" error whose own text hides the status."""
    parts, first = [], exc
    while exc is not None and len(parts) < 2:
        text = str(exc).strip().splitlines()
        part = f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
        if part not in parts:
            parts.append(part)
        exc = exc.__cause__
    text = "; caused by ".join(parts)
    if _named(first, "ConnectError", "ConnectionError"):
        return f"cannot connect to the hub ({text}); check the network, proxy or HF_ENDPOINT"
    return text


def _silence_message(timeout: float) -> str:
    return (f"no answer from the hub for {timeout:g} s (it accepted the connection but sent nothing); "
            f"check the network, proxy or HF_ENDPOINT, or allow longer with {TIMEOUT_ENV}=<seconds>")


class _Cancelled(Exception):
    """Raised inside the worker's progress hook once the caller gave up on the transfer."""


class _QuietHub(logging.Filter):
    """Keeps one thread's records from huggingface_hub and its HTTP client (retry warnings, a line per
    request) out of the log; they go to our debug log instead."""

    def __init__(self, thread_name: str) -> None:
        super().__init__()
        self.thread_name = thread_name

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName != self.thread_name:
            return True
        log.debug("[FlashVSR] huggingface_hub: %s", record.getMessage())
        return False


def _hub_loggers() -> list[logging.Logger]:
    names = [n for n in list(logging.root.manager.loggerDict)
             if n.split(".")[0] in ("huggingface_hub", "httpx2", "httpx", "httpcore", "urllib3")]
    return [logging.getLogger(n) for n in names]


class _Transfer:
    """One ``hf_hub_download`` on a worker thread; the calling thread watches it in ``wait``."""

    def __init__(self, source: KnownFile, dest_dir: Path, endpoint: str | None, timeout: float) -> None:
        self.source, self.dest_dir, self.endpoint, self.timeout = source, dest_dir, endpoint, timeout
        self.done, self.total = 0, source.size
        self.started = self.last_news = time.monotonic()
        self.start_bytes = 0
        self.abort = threading.Event()
        self.ended = threading.Event()
        self.path: Path | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"flashvsr-download-{source.filename}-{id(self):x}")
        self._quiet = _QuietHub(self._thread.name)
        self._loggers = _hub_loggers()
        self._before = _snapshot(dest_dir)
        self._tidy = threading.Lock()

    def tidy(self, *, late: bool = False) -> None:
        """Remove huggingface_hub's bookkeeping for this file; safe to call from both threads.

        ``late``: the worker ending after the caller gave up on it. By then a later download of the
        same file may be running; it holds the file's download lock, and its files are left alone.
        """
        with self._tidy:
            if not late:
                _clean_bookkeeping(self.dest_dir, self._before, self.source)
                return
            from filelock import FileLock, Timeout  # a dependency of huggingface_hub
            try:
                with FileLock(str(_lock_path(self.dest_dir, self.source))).acquire(timeout=0):
                    _clean_bookkeeping(self.dest_dir, self._before, self.source)
            except Timeout:
                return

    # ---- worker side
    def _run(self) -> None:
        try:
            self.path = self._download()
        except BaseException as exc:  # handed to the calling thread, which decides what it means
            self.error = exc
        finally:
            self.ended.set()
            if self.abort.is_set():
                # The caller gave up on us (Cancel, timeout) and may be gone: what a late end of
                # huggingface_hub left is ours to remove, and its warnings stayed quiet until now.
                self.tidy(late=True)
            for logger in self._loggers:
                logger.removeFilter(self._quiet)

    def _download(self) -> Path:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        s = self.source
        # One metadata request without retries: hf_hub_download's own one is retried for minutes.
        head_kwargs = {"timeout": self.timeout}
        head_params = inspect.signature(get_hf_file_metadata).parameters
        if "retry_on_errors" in head_params:
            head_kwargs["retry_on_errors"] = False
        if "endpoint" in head_params:
            head_kwargs["endpoint"] = self.endpoint
        meta = get_hf_file_metadata(hf_hub_url(s.repo_id, s.filename, revision=s.revision,
                                               endpoint=self.endpoint), **head_kwargs)
        self.total = meta.size or self.total
        self.last_news = time.monotonic()
        kwargs = {}
        if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
            kwargs["tqdm_class"] = self._progress_class()
        return Path(hf_hub_download(s.repo_id, s.filename, revision=s.revision, local_dir=self.dest_dir,
                                    endpoint=self.endpoint, etag_timeout=self.timeout, **kwargs))

    def _progress_class(self):
        from tqdm.std import tqdm  # a dependency of huggingface_hub
        transfer = self

        class _ProgressBridge(tqdm):
            """A silent tqdm that records byte counts and stops the transfer once it is abandoned."""

            def __init__(self, *args, **kwargs) -> None:
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)
                transfer.done = transfer.start_bytes = int(kwargs.get("initial") or 0)
                transfer.total = kwargs.get("total") or transfer.total
                transfer.started = transfer.last_news = time.monotonic()

            def update(self, n: float | None = 1) -> bool:
                if transfer.abort.is_set():
                    raise _Cancelled
                transfer.done += int(n or 0)
                transfer.last_news = time.monotonic()
                return True

            # With these two, huggingface_hub treats the bar as one that aggregates: Xet downloads
            # then report the file's bytes through ``update`` and the network's (compressed) bytes
            # here, instead of a second bar whose bytes would be counted twice.
            def update_transfer(self, n: float | None = 1) -> None:
                if transfer.abort.is_set():
                    raise _Cancelled
                transfer.last_news = time.monotonic()

            def set_transfer_postfix_str(self, *args, **kwargs) -> None:
                return

        return _ProgressBridge

    # ---- calling side
    def status(self, index: int, count: int) -> DownloadStatus:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start_bytes) / elapsed if elapsed > 0 else 0.0
        return DownloadStatus(self.source.filename, self.done, self.total, rate, index, count,
                              finished=self.path is not None)

    def wait(self, progress: Progress | None, index: int, count: int) -> Path:
        """Run the transfer to its end; raise what it raised, or DownloadError when the hub fell silent."""
        for logger in self._loggers:   # removed by the worker when it ends, which may be later
            logger.addFilter(self._quiet)
        try:
            self._thread.start()
            while not self.ended.wait(POLL_S):
                if progress is not None:
                    progress(self.status(index, count))
                if time.monotonic() - self.last_news > self.timeout:
                    raise DownloadError(_silence_message(self.timeout))
            if self.error is not None:
                if _is_timeout(self.error):
                    raise DownloadError(_silence_message(self.timeout)) from self.error
                raise self.error
            if progress is not None:
                progress(self.status(index, count))
            return self.path
        except BaseException:
            self.abort.set()
            self.ended.wait(GRACE_S)
            raise
        finally:
            self.tidy()


# ---------------------------------------------------------------- huggingface_hub's bookkeeping

_HUB_MARKERS = (".gitignore", "CACHEDIR.TAG")  # huggingface_hub marks its folder with these


def _hub_dir(dest_dir: Path) -> Path:
    return dest_dir / ".cache" / "huggingface"


def _lock_path(dest_dir: Path, source: KnownFile) -> Path:
    """huggingface_hub's lock for downloading this file into ``dest_dir`` (held while it downloads)."""
    return _hub_dir(dest_dir) / "download" / f"{source.filename}.lock"


def _snapshot(dest_dir: Path) -> set[Path]:
    root = dest_dir / ".cache"
    return {root, *root.rglob("*")} if root.exists() else set()


def _ours(path: Path, filename: str, sha256: str | None) -> bool:
    """huggingface_hub's files for ``filename``: its lock and metadata, and partial downloads of it
    (named ``<hash>.<etag>[.<id>].incomplete``; the etag of a large file is its sha256)."""
    name = path.name
    if name in (f"{filename}.lock", f"{filename}.metadata"):
        return True
    return bool(sha256) and name.endswith(".incomplete") and f".{sha256}." in f"{name}."


def _remove_stale_partials(dest_dir: Path, source: KnownFile) -> None:
    """Partial downloads of this file that a killed run left (a dead process cannot clean up).

    Only while nobody holds the file's download lock: another process may be downloading it now.
    """
    download_dir = _hub_dir(dest_dir) / "download"
    if not source.sha256 or not download_dir.is_dir():
        return
    stale = [p for p in download_dir.iterdir() if p.name.endswith(".incomplete")
             and _ours(p, source.filename, source.sha256)]
    if not stale:
        return
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub
    lock = FileLock(str(_lock_path(dest_dir, source)))
    try:
        with lock.acquire(timeout=0):
            for path in stale:
                log.info("[FlashVSR] removing %s, a partial download of %s left by an earlier run",
                         path, source.filename)
                path.unlink(missing_ok=True)
    except Timeout:
        log.info("[FlashVSR] another process is downloading %s into %s", source.filename, dest_dir)


def _clean_bookkeeping(dest_dir: Path, before: set[Path], source: KnownFile) -> None:
    """Remove what huggingface_hub left in ``dest_dir`` for this file, and the folders it made."""
    after = _snapshot(dest_dir)
    new = after - before
    for path in sorted(after, reverse=True):
        try:
            if path.is_file() and (_ours(path, source.filename, source.sha256) or
                                   (path in new and path.name.endswith(".incomplete"))):
                path.unlink()
            elif path in new and path.name in _HUB_MARKERS and path.parent == _hub_dir(dest_dir):
                if not [p for p in path.parent.iterdir() if p.name not in _HUB_MARKERS]:
                    path.unlink()
            elif path in new and path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        except OSError as exc:  # e.g. Windows, while a cancelled worker still holds the file
            log.debug("[FlashVSR] could not remove %s: %s", path, exc)


# ---------------------------------------------------------------- fetching

def fetch(sources: Sequence[KnownFile], dest_dir: Path, *, endpoint: str | None = None,
          progress: Progress | None = None, timeout: float | None = None,
          part: tuple[int, int] = (1, 1)) -> Path:
    """Download one file into ``dest_dir`` from the first source that works; return its path.

    ``progress`` gets a ``DownloadStatus`` every ``POLL_S`` on this thread and may raise to cancel;
    the exception then propagates, with nothing of the file left behind. ``timeout``: seconds the
    hub may stay silent (default ``FLASHVSR_DOWNLOAD_TIMEOUT`` or 60). ``part``: (this file's number,
    how many files are being fetched), for the status. A mirror's file is kept only if its sha256 is
    the expected one (the official repos are trusted as they are; ``verify_sha256`` in
    ``ensure_weights`` checks them on request).
    """
    try:
        import huggingface_hub  # noqa: F401 - only to say what to do when it is missing
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: run `pip install huggingface_hub`, "
                            "or put the files in place by hand") from None
    endpoint = hub_endpoint(endpoint)
    timeout = download_timeout(timeout)
    errors = _transport_errors()
    failures = []
    for source in sources:
        size = f"{fmt_bytes(source.size)}, " if source.size else ""
        log.info("[FlashVSR] Downloading %s (%s%s@%s) to %s", source.filename, size, source.repo_id,
                 source.revision[:12], dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(dest_dir, source)
        transfer = _Transfer(source, dest_dir, endpoint, timeout)
        try:
            path = transfer.wait(progress, *part)
        except DownloadError as exc:
            failures.append(f"{source.url(endpoint)}: {exc}")
            continue
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
        status = transfer.status(*part)
        log.info("[FlashVSR] Downloaded %s: %s in %.1f s", source.filename, fmt_bytes(status.done),
                 time.monotonic() - transfer.started)
        return path
    raise DownloadError("; ".join(failures))
