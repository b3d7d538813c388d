"""Test helpers: tiny stand-ins for the FlashVSR weight files, and a local fake Hugging Face Hub.

The fake hub is a real HTTP server on 127.0.0.1 speaking the part of the Hub protocol that
``hf_hub_download`` uses: ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` answered with
``X-Repo-Commit``, ``ETag`` (the sha256, as the Hub does for LFS files) and ``Content-Length``;
``Range`` requests (206); 404s carrying ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``). Faults can be injected: an error status per file, a first GET cut off after
some bytes, a hub that accepts connections and never answers (``silent``: for every request, or
for ``{"GET"}`` only), and a slow hub (``rate``: bytes per second for every body).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import torch
from safetensors.torch import save as save_safetensors

from comfyui_flashvsr.flashvsr.weights.catalog import CATALOG, VERSIONS, Catalog


def _pickle(obj) -> bytes:
    # Saving to a buffer (not a path) keeps the bytes independent of the file name.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _tensors(seed: int, shapes: dict[str, tuple[int, ...]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in shapes.items()}


def tiny_dit(seed: int) -> dict[str, torch.Tensor]:
    return _tensors(seed, {"patch_embedding.weight": (8, 16, 1, 2, 2), "patch_embedding.bias": (8,),
                           "blocks.0.self_attn.q.weight": (8, 8), "head.head.weight": (64, 8)})


def tiny_lq_proj(seed: int) -> dict[str, torch.Tensor]:
    return _tensors(seed, {"conv1.weight": (4, 768, 4, 3, 3), "conv1.bias": (4,), "norm1.gamma": (4, 1, 1, 1),
                           "conv2.weight": (6, 4, 4, 3, 3), "linear_layers.0.weight": (8, 6)}, torch.bfloat16)


def tiny_tcdecoder() -> dict[str, torch.Tensor]:
    return _tensors(3, {"decoder.1.weight": (4, 784, 3, 3), "decoder.26.weight": (3, 4, 3, 3),
                        "decoder.26.bias": (3,)})


def tiny_vae() -> dict[str, torch.Tensor]:
    return _tensors(4, {"conv2.weight": (16, 16, 1, 1, 1), "decoder.conv1.weight": (8, 16, 3, 3, 3),
                        "decoder.head.2.weight": (3, 8, 3, 3, 3)})


def tiny_prompt() -> torch.Tensor:
    return torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)


def tiny_official_bytes() -> dict[tuple[str, str], bytes]:
    """(version, role) -> bytes of a tiny file in the official format; v1 and v1.1 differ where real ones do."""
    out = {}
    for i, version in enumerate(VERSIONS):
        out[version, "dit"] = save_safetensors(tiny_dit(10 + i))
        out[version, "lq_proj"] = _pickle(tiny_lq_proj(20 + i))
        out[version, "tcdecoder"] = _pickle(tiny_tcdecoder())
        out[version, "vae"] = _pickle({"model_state": tiny_vae()})  # the Wan VAE may be nested so
        out[version, "prompt"] = _pickle(tiny_prompt())
    return out


def tiny_catalog(contents: dict[tuple[str, str], bytes]) -> Catalog:
    """The real catalog (names, repos, revisions) with sizes and hashes of the tiny files."""
    official = tuple(
        dataclasses.replace(f, size=len(contents[f.version, f.role]),
                            sha256=hashlib.sha256(contents[f.version, f.role]).hexdigest())
        for f in CATALOG.official)
    return Catalog(official=official, repacks=CATALOG.repacks)


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class FakeHub:
    """``with FakeHub() as hub: ... hub.endpoint``; add files with ``add`` or ``from_catalog``."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.status: dict[tuple[str, str], int] = {}
        self.drop_first_get_after: dict[tuple[str, str], int] = {}
        self.silent: set[str] = set()       # request methods read and never answered
        self.rate: float | None = None      # bytes per second for a body; None = as fast as possible
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.endpoint = ""

    def add(self, repo_id: str, revision: str, filename: str, data: bytes) -> None:
        commit = revision if _COMMIT.match(revision) else hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos.setdefault(repo_id, (commit, {}))[1][filename] = data

    @classmethod
    def from_catalog(cls, catalog: Catalog, contents: dict[tuple[str, str], bytes]) -> "FakeHub":
        hub = cls()
        for f in catalog.official:
            hub.add(f.repo_id, f.revision, f.filename, contents[f.version, f.role])
        return hub

    @property
    def silent_all(self) -> bool:
        return self.silent == {"HEAD", "GET"}

    @silent_all.setter
    def silent_all(self, value: bool) -> None:
        self.silent = {"HEAD", "GET"} if value else set()

    def gets(self, filename: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + filename)]

    def _lookup(self, path: str) -> tuple[int, str, str, bytes | None, tuple[str, str] | None]:
        """(status, X-Error-Code, commit, data, key) for a resolve URL."""
        m = _RESOLVE.match(unquote(path.split("?")[0]))
        if not m or m["repo"] not in self.repos:
            return 404, "RepoNotFound", "", None, None
        commit, files = self.repos[m["repo"]]
        if m["rev"] not in ("main", commit):
            return 404, "RevisionNotFound", "", None, None
        key = (m["repo"], m["file"])
        if m["file"] not in files:
            return 404, "EntryNotFound", commit, None, key
        if key in self.status:
            return self.status[key], "", commit, None, key
        return 200, "", commit, files[m["file"]], key

    def _handler(hub):  # noqa: N805 - a class factory closing over the hub
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                return

            def _answer(self, body: bool) -> None:
                with hub._lock:
                    hub.requests.append((self.command, self.path, self.headers.get("Range")))
                if self.command in hub.silent:
                    hub._closing.wait()         # the connection stays open, nothing is sent
                    self.close_connection = True
                    return
                status, code, commit, data, key = hub._lookup(self.path)
                if data is None:
                    self.send_response(status)
                    if code:
                        self.send_header("X-Error-Code", code)
                    if commit:
                        self.send_header("X-Repo-Commit", commit)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if match and body:
                    start = int(match[1])
                payload = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(payload)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                with hub._lock:
                    cut = hub.drop_first_get_after.pop(key, None)
                if cut is not None:
                    self.wfile.write(payload[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                rate = hub.rate                 # a response keeps the rate it started with
                if rate is None:
                    self.wfile.write(payload)
                    return
                piece = 64 * 1024
                try:
                    for i in range(0, len(payload), piece):
                        if hub._closing.is_set():
                            break
                        self.wfile.write(payload[i:i + piece])
                        self.wfile.flush()
                        time.sleep(piece / rate)
                except (BrokenPipeError, ConnectionError):  # the client gave up: that is the test
                    self.close_connection = True

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

        return Handler

    def __enter__(self) -> "FakeHub":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
