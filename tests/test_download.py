"""Downloading weight files through huggingface_hub against a local fake Hub (tests/fake_hub.py).

Every test passes the fake hub's address (or sets HF_ENDPOINT to it), so nothing reaches the internet.
"""
import hashlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
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


# ---------------------------------------------------------------- silence, offline, cancel, litter

BIG_DIT = "diffusion_pytorch_model_streaming_dmd.safetensors"


def big_contents(mib: int) -> dict:
    """The tiny files, with a DiT of about ``mib`` MiB: huggingface_hub reports bytes per 10 MiB read."""
    big = hub_helpers.tiny_dit(11)
    big["blocks.0.ffn.0.weight"] = torch.randn(mib * 2**18)
    contents = dict(CONTENTS)
    contents["v1.1", "dit"] = save_safetensors(big)
    return contents


def left_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden ones included), relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def run_bounded(seconds: float, fn):
    """(what fn returned or raised, seconds it took); fails if fn is still running after ``seconds``."""
    out = {}

    def target():
        t0 = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # the outcome under test
            out["value"] = exc
        out["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return out["value"], out["elapsed"]


def hub_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and not r.name.startswith("comfyui_flashvsr")]


@pytest.mark.parametrize("silent", [{"HEAD", "GET"}, {"GET"}], ids=["no-answer-at-all", "no-file-body"])
def test_a_hub_that_accepts_and_never_answers_gives_up_after_the_timeout_with_one_message(
        tmp_path, fake_hub, monkeypatch, caplog, silent):
    monkeypatch.setenv("FLASHVSR_DOWNLOAD_TIMEOUT", "1")
    fake_hub.silent = silent
    err, elapsed = run_bounded(30, lambda: ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG,
                                                           endpoint=fake_hub.endpoint))
    assert isinstance(err, MissingWeights), err
    assert f"downloading {BIG_DIT} failed" in str(err) and "no answer from the hub for 1 s" in str(err)
    assert "FLASHVSR_DOWNLOAD_TIMEOUT" in str(err)
    assert elapsed < 15                 # 1 s of silence, plus a loaded machine's slack; not minutes
    assert hub_warnings(caplog) == []   # huggingface_hub's retry lines stay out of the log
    assert left_in(tmp_path) == []


def test_the_timeout_argument_overrides_the_environment(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("FLASHVSR_DOWNLOAD_TIMEOUT", "600")
    fake_hub.silent_all = True
    err, elapsed = run_bounded(30, lambda: ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG,
                                                           endpoint=fake_hub.endpoint, timeout=0.5))
    assert isinstance(err, MissingWeights) and "no answer from the hub for 0.5 s" in str(err)


def test_a_timeout_that_is_not_a_number_is_one_clear_line(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("FLASHVSR_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(MissingWeights, match=r"FLASHVSR_DOWNLOAD_TIMEOUT='soon' is not a number of seconds"):
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


def test_no_network_fails_at_once_with_one_message_and_no_retry_lines(tmp_path, caplog):
    with socket.socket() as s:              # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    err, elapsed = run_bounded(60, lambda: ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG,
                                                           endpoint=closed))
    assert isinstance(err, MissingWeights) and f"downloading {BIG_DIT} failed" in str(err)
    assert "cannot connect to the hub (ConnectError: " in str(err)
    assert elapsed < 10                     # huggingface_hub alone retries for 23 s
    assert hub_warnings(caplog) == [] and left_in(tmp_path) == []


class Cancelled(Exception):
    """Stands in for ComfyUI's InterruptProcessingException."""


def test_progress_reports_bytes_total_and_rate_while_a_slow_hub_serves(tmp_path):
    contents = big_contents(24)
    catalog = hub_helpers.tiny_catalog(contents)
    seen = []
    with hub_helpers.FakeHub.from_catalog(catalog, contents) as hub:
        hub.rate = 12 * 2**20
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=catalog, endpoint=hub.endpoint, progress=seen.append)
    dit = [s for s in seen if s.filename == BIG_DIT]
    size = len(contents["v1.1", "dit"])
    assert all(s.total == size and (s.index, s.count) == (1, 4) for s in dit)
    middle = [s for s in dit if 0 < s.done < size]
    assert middle and all(s.rate > 0 for s in middle)       # progress while bytes arrive, not only at the end
    assert [s.done for s in dit] == sorted(s.done for s in dit) and dit[-1].finished
    assert "MB of " in middle[0].line() and "MB/s" in middle[0].line()


def test_cancel_from_the_progress_callback_stops_at_once_and_leaves_nothing(tmp_path):
    contents = big_contents(24)
    catalog = hub_helpers.tiny_catalog(contents)
    calls = []

    def cancel_on_third_status(status):
        calls.append(status)
        if len(calls) == 3:
            raise Cancelled

    with hub_helpers.FakeHub.from_catalog(catalog, contents) as hub:
        hub.rate = 2 * 2**20                # 12 s for the DiT: the cancel comes mid-file
        err, elapsed = run_bounded(30, lambda: ensure_weights([tmp_path], "v1.1", "tiny", catalog=catalog,
                                                               endpoint=hub.endpoint, progress=cancel_on_third_status))
        assert isinstance(err, Cancelled)   # the caller's own exception, unchanged
        assert elapsed < 6 and len(calls) == 3
        assert left_in(tmp_path) == []      # no weight, no partial file, no lock
        hub.rate = None                     # the next run starts that file again and completes
        files = ensure_weights([tmp_path], "v1.1", "tiny", catalog=catalog, endpoint=hub.endpoint)
        # The cancelled transfer's worker may end only now (at its next 10 MiB): it must neither
        # disturb the later download of the same file nor leave anything when it ends.
        deadline = time.monotonic() + 30
        while any(t.name.startswith("flashvsr-download-") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "the cancelled download's worker never ended"
            time.sleep(0.1)
    assert files.dit.read_bytes() == contents["v1.1", "dit"]
    assert left_in(tmp_path) == sorted(f"v1.1/{name}" for name in MODE_FILES["tiny"])


def test_a_failed_download_leaves_no_lock_or_metadata_in_the_models_folder(tmp_path, fake_hub):
    fake_hub.status[V11, "LQ_proj_in.ckpt"] = 403
    with pytest.raises(MissingWeights):
        ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert left_in(tmp_path) == [f"v1.1/{BIG_DIT}"]     # the file that did come, and nothing else
    assert not (tmp_path / "v1.1" / ".cache").exists()


def test_a_partial_download_left_by_a_killed_run_is_removed_and_nothing_else(tmp_path, fake_hub):
    download_dir = tmp_path / "v1.1" / ".cache" / "huggingface" / "download"
    download_dir.mkdir(parents=True)
    sha = next(f.sha256 for f in CATALOG.official if f.version == "v1.1" and f.role == "dit")
    stale = download_dir / f"Xy12.{sha}.0a1b2c3d.incomplete"
    stale.write_bytes(b"half a DiT")
    foreign = download_dir / f"Zz99.{'0' * 64}.incomplete"      # not one of our files
    foreign.write_bytes(b"someone else's")
    (download_dir / "notes.txt").write_text("the user's")
    ensure_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG, endpoint=fake_hub.endpoint)
    assert not stale.exists() and foreign.exists() and (download_dir / "notes.txt").exists()
    assert sorted(p.name for p in download_dir.iterdir()) == sorted([foreign.name, "notes.txt"])


def test_a_cancelled_download_in_a_node_run_leaves_nothing_loaded_and_the_next_run_loads(tmp_path, monkeypatch):
    from flashvsr_tests_tiny_weights import write_tiny_weights
    from comfyui_flashvsr.nodes.options import NodeSettings
    from comfyui_flashvsr.nodes.runner import PipelineCache, run_upscale
    ready = write_tiny_weights(tmp_path / "ready", "v1.1")   # loadable reduced weights for the hub
    models = tmp_path / "FlashVSR"
    (models / "v1.1").mkdir(parents=True)
    # The prompt comes from mirrors checked against the real file's sha256: put it in place instead.
    (models / "v1.1" / "posi_prompt.pth").write_bytes((ready / "posi_prompt.pth").read_bytes())
    cache, statuses = PipelineCache(), []

    def cancel_at_once(status):
        statuses.append(status)
        raise Cancelled

    def run(on_download):
        return run_upscale(torch.rand(2, 16, 16, 3), NodeSettings(scale=2.0, device="cpu"), cache=cache,
                           roots=[str(models)], auto_device="cpu", on_progress=lambda d, t: None,
                           sage_status=lambda: {"installed": False}, on_download=on_download)

    with hub_helpers.FakeHub() as hub:
        for f in CATALOG.official:
            if f.version == "v1.1" and not f.mirror and (ready / f.filename).exists():
                hub.add(f.repo_id, f.revision, f.filename, (ready / f.filename).read_bytes())
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        hub.rate = 64 * 2**10
        with pytest.raises(Cancelled):
            run(cancel_at_once)
        assert cache.key is None and len(statuses) == 1 and left_in(models) == ["v1.1/posi_prompt.pth"]
        hub.rate = None
        outcome = run(statuses.append)
    assert cache.key is not None and outcome.frames.shape == (2, 32, 32, 3)
    assert {s.filename for s in statuses[1:] if s.finished} == MODE_FILES["tiny"] - {"posi_prompt.pth"}


# ---------------------------------------------------------------- through the `flashvsr` command

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"
# What the `flashvsr` console script runs (pyproject: flashvsr = ...cli.main:main), under the test name.
FLASHVSR = ("import sys; sys.path.insert(0, {tests!r}); import conftest; "
            "from comfyui_flashvsr.flashvsr.cli.main import main; sys.argv[0] = 'flashvsr'; sys.exit(main())")


def flashvsr(tmp_path, hub, *args, **env):
    code = FLASHVSR.format(tests=str(Path(__file__).parent))
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    environ.update(HF_ENDPOINT=hub.endpoint, **env)
    return subprocess.Popen([sys.executable, "-c", code, "upscale", str(SAMPLE), str(tmp_path / "out.mp4"),
                             "--models", str(tmp_path / "models"), "--device", "cpu", *args],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_a_silent_hub_ends_with_one_error_line_and_exit_2(tmp_path, fake_hub):
    fake_hub.silent_all = True
    child = flashvsr(tmp_path, fake_hub, FLASHVSR_DOWNLOAD_TIMEOUT="1")
    _, err = child.communicate(timeout=120)         # huggingface_hub alone would take 397 s
    assert child.returncode == 2, err
    errors = [line for line in err.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and "no answer from the hub for 1 s" in errors[0], err
    assert "Traceback" not in err and "WARNING" not in err and "Retrying" not in err, err
    assert left_in(tmp_path / "models") == [] and not (tmp_path / "out.mp4").exists()


def test_cli_ctrl_c_during_a_download_exits_130_and_leaves_no_partial_file(tmp_path):
    contents = big_contents(12)
    catalog = hub_helpers.tiny_catalog(contents)
    with hub_helpers.FakeHub.from_catalog(catalog, contents) as hub:
        hub.rate = 256 * 2**10                      # 48 s for the DiT
        child = flashvsr(tmp_path, hub)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any(f"{BIG_DIT} (1/4): " in line for line in lines):    # the progress line
            assert child.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        child.send_signal(signal.SIGINT)
        child.wait(timeout=60)
        reader.join(10)
    assert child.returncode == 130, "".join(lines)
    assert "Traceback" not in "".join(lines)
    assert left_in(tmp_path / "models") == []
