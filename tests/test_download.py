"""Downloading weight files through huggingface_hub against a local fake Hub (tests/fake_hub.py).

Every test passes the fake hub's address (or sets HF_ENDPOINT to it), so nothing reaches the internet.
"""
import hashlib
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from comfyui_flashvsr.flashvsr.weights.store import MissingWeights, ensure_weights


hub_helpers = importlib.import_module("flashvsr_tests_fake_hub")
CONTENTS = hub_helpers.tiny_official_bytes()
CATALOG = hub_helpers.tiny_catalog(CONTENTS)
V11 = "JunhaoZhuang/FlashVSR-v1.1"
PROMPT_MIRRORS = ("deAPI-ai/flashvsr-v1-1", "varb15/posi_prompt")
MODE_FILES = {
    "tiny": {"diffusion_pytorch_model_streaming_dmd.safetensors", "LQ_proj_in.ckpt", "posi_prompt.pth",
             "TCDecoder.ckpt"},
    "full": {"diffusion_pytorch_model_streaming_dmd.safetensors", "LQ_proj_in.ckpt", "posi_prompt.pth",
             "Wan2.1_VAE.pth"},
}


@pytest.fixture(autouse=True)
def online(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def fake_hub():
    with hub_helpers.FakeHub.from_catalog(CATALOG, CONTENTS) as hub:
        yield hub


def fetched(hub) -> set[str]:
    return {path.rsplit("/", 1)[1] for method, path, _ in hub.requests if method == "GET"}


@pytest.mark.parametrize("mode", ["tiny", "full"])
def test_downloads_only_the_files_the_variant_needs(tmp_path, fake_hub, caplog, mode):
    caplog.set_level(logging.INFO)
    files = ensure_weights([tmp_path], "v1.1", mode, catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert fetched(fake_hub) == MODE_FILES[mode]
    for name in MODE_FILES[mode]:
        data = (tmp_path / "v1.1" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() in {f.sha256 for f in CATALOG.official if f.version == "v1.1"}
    assert files.dit == tmp_path / "v1.1" / "diffusion_pytorch_model_streaming_dmd.safetensors"
    assert (files.vae is None) == (mode != "full") and (files.tcdecoder is None) == (mode == "full")
    ours = [r for r in caplog.records if r.getMessage().startswith("[FlashVSR]")]
    assert all(r.levelno == logging.INFO for r in ours)
    for verb in ("Downloading", "Downloaded"):  # one line as each file starts, one as it ends
        assert sorted(r.getMessage().split()[2].rstrip(":") for r in ours
                      if r.getMessage().split()[1] == verb) == sorted(MODE_FILES[mode])
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("httpx")]


def test_files_already_present_are_not_fetched_again(tmp_path, fake_hub):
    (tmp_path / "v1.1").mkdir()
    (tmp_path / "v1.1" / "diffusion_pytorch_model_streaming_dmd.safetensors").write_bytes(CONTENTS["v1.1", "dit"])
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert fetched(fake_hub) == MODE_FILES["tiny"] - {"diffusion_pytorch_model_streaming_dmd.safetensors"}
    fake_hub.requests.clear()
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_offline_mode_lists_the_exact_paths_and_touches_no_network(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeights) as err:
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    text = str(err.value)
    assert "HF_HUB_OFFLINE=1" in text
    for name in MODE_FILES["tiny"]:
        assert str(tmp_path / "v1.1" / name) in text
    assert f"/{V11}/resolve/" in text
    assert fake_hub.requests == []


@pytest.mark.parametrize("offline", ["env", "download=False"])
def test_offline_with_files_present_needs_no_network(tmp_path, fake_hub, monkeypatch, offline):
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    fake_hub.requests.clear()
    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = ensure_weights([tmp_path], "v1.1", "tiny", download=offline == "env", catalog=CATALOG,
                           endpoint=fake_hub.endpoint)
    assert files.tcdecoder == tmp_path / "v1.1" / "TCDecoder.ckpt" and fake_hub.requests == []


def test_download_false_raises_missing_weights_saying_so(tmp_path, fake_hub):
    with pytest.raises(MissingWeights, match=r"download=False") as err:
        ensure_weights([tmp_path], "v1", "full", download=False, catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert len(err.value.missing) == 4 and fake_hub.requests == []


def test_a_hub_error_becomes_missing_weights_with_the_reason(tmp_path, fake_hub):
    fake_hub.status[V11, "LQ_proj_in.ckpt"] = 403
    with pytest.raises(MissingWeights) as err:
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    text = str(err.value)
    assert "downloading LQ_proj_in.ckpt failed" in text and "403" in text
    assert [m.filename for m in err.value.missing][0] == "LQ_proj_in.ckpt"
    assert "diffusion_pytorch_model_streaming_dmd.safetensors" not in {m.filename for m in err.value.missing}


def test_an_unknown_revision_is_reported_not_retried_forever(tmp_path, fake_hub):
    fake_hub.repos[V11] = ("0" * 40, fake_hub.repos[V11][1])  # the pinned commit is gone from the hub
    with pytest.raises(MissingWeights, match=r"RevisionNotFound"):
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)


def test_prompt_mirror_with_wrong_bytes_is_discarded_and_the_next_mirror_used(tmp_path, fake_hub):
    fake_hub.add(PROMPT_MIRRORS[0], "main", "posi_prompt.pth", b"\x80\x02" + b"not the prompt" * 10)
    files = ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert files.prompt.read_bytes() == CONTENTS["v1.1", "prompt"]
    assert [p for m, p, _ in fake_hub.requests if m == "GET" and "posi_prompt" in p] == [
        f"/{PROMPT_MIRRORS[0]}/resolve/main/posi_prompt.pth", f"/{PROMPT_MIRRORS[1]}/resolve/main/posi_prompt.pth"]


def test_no_mirror_with_the_right_prompt_leaves_it_missing(tmp_path, fake_hub):
    for repo in PROMPT_MIRRORS:
        fake_hub.add(repo, "main", "posi_prompt.pth", b"\x80\x02 wrong bytes")
    with pytest.raises(MissingWeights, match=r"sha256 .* not the official") as err:
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert [m.filename for m in err.value.missing] == ["posi_prompt.pth", "TCDecoder.ckpt"]
    assert not (tmp_path / "v1.1" / "posi_prompt.pth").exists()


def test_hf_endpoint_environment_variable_is_honoured_at_call_time(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.endpoint)
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG)
    assert fetched(fake_hub) == MODE_FILES["tiny"]


def test_progress_reports_bytes_until_each_file_is_complete(tmp_path, fake_hub):
    calls = []
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint,
                   progress=calls.append)
    last = {s.filename: s for s in calls}
    assert set(last) == MODE_FILES["tiny"]
    assert sorted((s.index, s.count) for s in last.values()) == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for name, status in last.items():
        assert status.finished and status.done == status.total == (tmp_path / "v1.1" / name).stat().st_size
        assert status.line().endswith(" done")


def test_an_interrupted_transfer_resumes_with_a_range_request(tmp_path):
    # huggingface_hub counts resumable bytes per 10 MiB read, so the file must be larger than that.
    big = hub_helpers.tiny_dit(11)
    big["blocks.0.ffn.0.weight"] = torch.randn(11 * 2**18)
    contents = dict(CONTENTS)
    contents["v1.1", "dit"] = save_safetensors(big)
    catalog = hub_helpers.tiny_catalog(contents)
    with hub_helpers.FakeHub.from_catalog(catalog, contents) as hub:
        hub.drop_first_get_after[V11, "diffusion_pytorch_model_streaming_dmd.safetensors"] = 10 * 2**20 + 12345
        files = ensure_weights([tmp_path], "v1.1", "tiny", catalog=catalog, endpoint=hub.endpoint)
        ranges = [r for _, _, r in hub.gets("diffusion_pytorch_model_streaming_dmd.safetensors")]
    assert ranges == [None, f"bytes={10 * 2**20}-"]
    assert files.dit.read_bytes() == contents["v1.1", "dit"]
