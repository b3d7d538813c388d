"""First use inside a real ComfyUI: the weight download shows progress on the node and stops on Cancel.

Optional, like ``test_comfyui_integration.py`` (skipped without a ComfyUI checkout)::

    FLASHVSR_COMFYUI_GIT=/path/to/ComfyUI(.git) FLASHVSR_HARNESS=/path/to/comfyui-harness \\
        python -m pytest tests/integration/test_comfyui_download.py -v

The server starts with an empty ``FlashVSR`` models folder (only the prompt embedding, whose mirrors
are checked against the real file's hash) and ``HF_ENDPOINT`` pointing at the local fake hub of
``tests/fake_hub.py``, which serves a 24 MiB DiT slowly. The first run is cancelled the way the
front end does it (``ws_cancel.py``) once the node's progress bar has moved; then the hub serves
small loadable weights at full speed and the next run downloads them and succeeds.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import time

import pytest
import torch
from safetensors.torch import save as save_safetensors

from flashvsr_tests_tiny_weights import write_tiny_weights
from comfyui_flashvsr.flashvsr.weights.catalog import CATALOG
from comfyui_flashvsr.nodes import options as o
from flashvsr_tests_comfy_client import ComfyClient, HarnessSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = HarnessSettings.from_env(ROOT)
COMFY_GIT, HARNESS, WORKDIR, PORT, URL = (SETTINGS.comfy_git, SETTINGS.harness, SETTINGS.workdir, SETTINGS.port,
                                          SETTINGS.url)
DIT = "diffusion_pytorch_model_streaming_dmd.safetensors"
SLOW_DIT_MIB = 24        # huggingface_hub reports bytes per 10 MiB read: the bar moves twice
SLOW_RATE = 2 * 2**20    # bytes per second: 12 s for the DiT, so Cancel comes mid-file

pytestmark = pytest.mark.skipif(not COMFY_GIT or not HARNESS.is_dir(),
                                reason="optional: set FLASHVSR_COMFYUI_GIT to a ComfyUI git repository and "
                                       "FLASHVSR_HARNESS to the ComfyUI harness")
fake_hub = importlib.import_module("flashvsr_tests_fake_hub")


_client = ComfyClient(URL)
http, run_prompt = _client.http, _client.run_prompt


def basic_prompt(seed: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 0}},
            "2": {"class_type": o.NODE_ID_BASIC,
                  "inputs": {"frames": ["1", 0], "preset": "Tiny", "scale": 2.0, "seed": seed}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


def files_in(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def serve(hub, files: dict[str, bytes]) -> None:
    for f in CATALOG.official:
        if f.version == "v1.1" and f.filename in files and not f.mirror:
            hub.add(f.repo_id, f.revision, f.filename, files[f.filename])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy-download")
    ready = write_tiny_weights(tmp / "ready", "v1.1")        # what the hub serves on the second run
    models = tmp / "models" / "FlashVSR"
    (models / "v1.1").mkdir(parents=True)
    (models / "v1.1" / "posi_prompt.pth").write_bytes((ready / "posi_prompt.pth").read_bytes())
    loadable = {p.name: p.read_bytes() for p in ready.iterdir() if p.name != "posi_prompt.pth"}
    junk = save_safetensors({"blocks.0.ffn.0.weight": torch.zeros(SLOW_DIT_MIB * 2**18)})
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"flashvsr_download_test:\n  is_default: true\n  FlashVSR: {models}\n")
    link = tmp / "ComfyUI-FlashVSR"
    link.symlink_to(ROOT, target_is_directory=True)
    with fake_hub.FakeHub() as hub:
        serve(hub, {**loadable, DIT: junk})
        hub.rate = SLOW_RATE
        cmd = [str(HARNESS / "comfy_harness.sh"), "--comfy-git", COMFY_GIT, "--workdir", str(WORKDIR),
               "--port", str(PORT), "--pack", str(link), "--keep-running", "--expect-node", o.NODE_ID_BASIC,
               "--server-arg", "--extra-model-paths-config", "--server-arg", str(yaml)]
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        env["HF_ENDPOINT"] = hub.endpoint
        started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
        try:
            assert started.returncode == 0, started.stdout[-4000:] + started.stderr[-4000:]
            yield {"tmp": tmp, "hub": hub, "models": models, "loadable": loadable, "junk": junk,
                   "venv_python": WORKDIR / "venv" / "bin" / "python", "log": WORKDIR / "server.log"}
        finally:
            subprocess.run([str(HARNESS / "comfy_harness.sh"), "--stop", "--workdir", str(WORKDIR)], timeout=120)


def test_first_run_download_shows_progress_on_the_node_and_cancel_stops_it_leaving_nothing(server):
    prompt = server["tmp"] / "first.api.json"
    prompt.write_text(json.dumps(basic_prompt(1)))
    t0 = time.monotonic()
    res = subprocess.run([server["venv_python"], HERE / "ws_cancel.py", "--url", URL, "--prompt", prompt,
                          "--node", "2", "--after", "1", "--timeout", "300"],   # Cancel once bytes arrived
                         capture_output=True, text=True, timeout=400)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["ended"] == "interrupted" and seen["interrupted_node"] == "2", seen
    assert seen["total"] == len(server["junk"])               # the bar counts the DiT's bytes
    assert 0 < max(seen["before"]) < seen["total"], seen      # it moved before the end
    assert elapsed < len(server["junk"]) / SLOW_RATE + 10     # stopped, not waited out
    assert files_in(server["models"]) == ["v1.1/posi_prompt.pth"]   # no weight, partial file or lock
    log = server["log"].read_text()
    assert f"[FlashVSR] downloading {DIT} (1/3): " in log
    assert "Retrying" not in log and "Traceback" not in log.split(f"downloading {DIT}")[-1]


def test_the_next_run_downloads_the_weights_and_runs(server):
    hub = server["hub"]
    serve(hub, server["loadable"])
    hub.rate = None
    hist = run_prompt(basic_prompt(2))
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    assert files_in(server["models"]) == sorted(f"v1.1/{name}" for name in
                                                ("posi_prompt.pth", DIT, "LQ_proj_in.ckpt", "TCDecoder.ckpt"))
