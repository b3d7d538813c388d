"""The ComfyUI server API as the integration tests use it: one JSON request, one prompt run to its end."""
from __future__ import annotations

import json
import os
import pathlib
import time
from dataclasses import dataclass
import urllib.error
import urllib.request


class ComfyClient:
    def __init__(self, url: str) -> None:
        self.url = url

    def http(self, path: str, body: dict | None = None, timeout: float = 60):
        """(status, JSON body, or the text when the body is not JSON)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw or b"null")
        except json.JSONDecodeError:
            return status, raw.decode("utf-8", "replace")

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue ``prompt`` and return its history entry once it succeeded or failed."""
        status, body = self.http("/prompt", {"prompt": prompt})
        assert status == 200, body
        pid, t_end = body["prompt_id"], time.monotonic() + timeout
        while time.monotonic() < t_end:
            _, hist = self.http(f"/history/{pid}")
            if pid in hist and hist[pid]["status"].get("status_str") in ("success", "error"):
                return hist[pid]
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s")


@dataclass(frozen=True)
class HarnessSettings:
    """Where the optional real-ComfyUI tests find ComfyUI and the harness, from the environment."""
    comfy_git: str | None
    harness: pathlib.Path
    workdir: pathlib.Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def usable(self) -> bool:
        return bool(self.comfy_git) and self.harness.is_dir()

    @classmethod
    def from_env(cls, repo_root: pathlib.Path) -> "HarnessSettings":
        env = os.environ
        return cls(env.get("FLASHVSR_COMFYUI_GIT"),
                   pathlib.Path(env.get("FLASHVSR_HARNESS", repo_root.parent / "shared" / "tools" / "comfyui-harness")),
                   pathlib.Path(env.get("FLASHVSR_HARNESS_WORKDIR", "/tmp/comfy-harness-flashvsr")),
                   int(env.get("FLASHVSR_COMFYUI_PORT", "8190")))
