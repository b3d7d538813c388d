"""The ``flashvsr`` command as a user runs it: ``python -m comfyui_flashvsr ...`` in a subprocess.

Nothing a user owns is lost (only the exact output named with ``--overwrite`` is replaced, and only
after the run succeeded; every refusal comes before the weights load), and the command line says
what it does. Where a run needs an engine, the child swaps in a stand-in (a nearest-neighbour
upscaler with FlashVSR's streaming shape, or the real engine on random micro-width networks)
before it runs the package's ``__main__`` exactly as ``python -m`` does.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "assets" / "sample.mp4"
hub_helpers = sys.modules["flashvsr_tests_fake_hub"]

# Engines the child can put in place of the weights loader.
ENGINES = {
    "nearest": """
        import numpy as np, torch
        class Engine:
            def upscale_stream(self, frames, cfg, n_frames=None, on_progress=None):
                s, held = int(cfg.scale), []
                for f in frames:
                    held.append(np.asarray(f))
                    if len(held) == 8:
                        yield torch.from_numpy(np.stack(held).repeat(s, 1).repeat(s, 2)); held = []
                if held:
                    yield torch.from_numpy(np.stack(held).repeat(s, 1).repeat(s, 2))
        cli.load_pipeline = lambda job: Engine()
    """,
    "fails": """
        import numpy as np, torch
        class Engine:
            def upscale_stream(self, frames, cfg, n_frames=None, on_progress=None):
                for i, f in enumerate(frames):
                    yield torch.from_numpy(np.asarray(f)[None])
                    if i == 10:
                        raise ValueError("the engine failed mid-run")
        cli.load_pipeline = lambda job: Engine()
    """,
    # the real loader and engine, on random networks instead of files
    "random": """
        import torch
        from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
        FlashVSR.from_pretrained = classmethod(lambda cls, roots, mode, version, device, dtype, download, progress=None:
            cls.random(mode=mode, version=version, device=device, dtype=dtype, size="micro"))
    """,
}
CHILD = """
import runpy, sys
from comfyui_flashvsr.flashvsr.cli import main as cli
{engine}
sys.argv = ["flashvsr", *{args!r}]
runpy.run_module("comfyui_flashvsr", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def import_path(tmp_path_factory):
    """A folder where the repository is importable as ``comfyui_flashvsr``, as after a pip install."""
    folder = tmp_path_factory.mktemp("importable")
    (folder / "comfyui_flashvsr").symlink_to(ROOT, target_is_directory=True)
    return folder


@pytest.fixture
def flashvsr(import_path, tmp_path):
    """Run the command: ``flashvsr(*args, engine=None | "nearest" | "fails" | "random", env={})``."""
    def run(*args, engine=None, env=None, timeout=300):
        args = [str(a) for a in args]
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "FLASHVSR_MODELS")}
        full_env.update(PYTHONPATH=str(import_path), PYTHONDONTWRITEBYTECODE="1", **(env or {}))
        if engine is None:
            cmd = [sys.executable, "-m", "comfyui_flashvsr", *args]
        else:
            code = CHILD.format(engine=textwrap.dedent(ENGINES[engine]), args=args)
            cmd = [sys.executable, "-c", code]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                              env=full_env)
    return run


@pytest.fixture
def no_weights(tmp_path):
    """An empty models folder: a command that gets as far as loading weights fails on it."""
    folder = tmp_path / "no-models"
    folder.mkdir()
    return ["--models", folder, "--no-download"]


def _frames(folder: Path, n: int = 12, size=(16, 16)) -> Path:
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), i * 10, np.uint8)).save(folder / f"f{i:03d}.png")
    return folder


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused_before_loading(done, message: str) -> None:
    assert done.returncode == 2, done.stderr
    assert message in done.stderr, done.stderr
    assert "loading weights" not in done.stderr and "--no-download" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.startswith("ERROR")]) == 1


# ---- nothing lost (issue #12 B) ---------------------------------------------------------------

def test_output_folder_holding_the_input_and_other_files_is_refused_and_kept(tmp_path, flashvsr, no_weights):
    project = tmp_path / "p"
    _frames(project / "frames")
    (project / "notes.txt").write_text("x")
    before = _tree(project)
    done = flashvsr("upscale", project / "frames", project, "--overwrite", *no_weights)
    _refused_before_loading(done, "contains the input")
    assert _tree(project) == before


def test_output_folder_with_foreign_files_is_refused_even_with_overwrite(tmp_path, flashvsr, no_weights):
    src = _frames(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "frame_000000.png").write_bytes(b"ours")
    (out / "holiday.jpg").write_bytes(b"theirs")
    done = flashvsr("upscale", src, out, "--overwrite", *no_weights)
    _refused_before_loading(done, "holds files this command did not write (e.g. holiday.jpg)")
    assert _tree(out) == {"frame_000000.png": b"ours", "holiday.jpg": b"theirs"}


@pytest.mark.parametrize("where", ["equal", "inside"])
def test_output_equal_to_or_inside_the_input_is_refused(tmp_path, flashvsr, no_weights, where):
    src = _frames(tmp_path / "in")
    before = _tree(src)
    out = src if where == "equal" else src / "up"
    done = flashvsr("upscale", src, out, "--overwrite", *no_weights)
    _refused_before_loading(done, "the input itself" if where == "equal" else "inside the input")
    assert _tree(src) == before


def test_a_file_where_a_frame_folder_is_needed_is_refused(tmp_path, flashvsr, no_weights):
    out = tmp_path / "notes"
    out.write_text("keep")
    done = flashvsr("upscale", SAMPLE, out, "--overwrite", *no_weights)
    _refused_before_loading(done, "is a file, but a name without suffix means a folder")
    assert out.read_text() == "keep"


def test_a_folder_where_a_video_file_is_needed_is_refused(tmp_path, flashvsr, no_weights):
    out = tmp_path / "clip.mp4"
    out.mkdir()
    (out / "a.txt").write_text("keep")
    done = flashvsr("upscale", SAMPLE, out, "--overwrite", *no_weights)
    _refused_before_loading(done, "is a folder, but .mp4 means a video file")
    assert (out / "a.txt").read_text() == "keep"


def test_missing_destination_folder_is_refused(tmp_path, flashvsr, no_weights):
    done = flashvsr("upscale", SAMPLE, tmp_path / "nowhere" / "o.mp4", *no_weights)
    _refused_before_loading(done, "output folder does not exist")


def test_read_only_destination_is_refused(tmp_path, flashvsr, no_weights):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        probe.write_bytes(b"")            # root ignores the mode bits: use a read-only kernel folder
        probe.unlink()
        folder = Path("/sys")
    except PermissionError:
        pass
    try:
        done = flashvsr("upscale", SAMPLE, folder / "o.mp4", *no_weights)
    finally:
        (tmp_path / "ro").chmod(0o755)
    _refused_before_loading(done, f"cannot write to {folder}")


def test_overwrite_replaces_our_frame_folder_only_after_success(tmp_path, flashvsr):
    src = _frames(tmp_path / "in", n=12)
    out = tmp_path / "out"
    out.mkdir()
    for i in range(20):                   # a previous, longer run
        (out / f"frame_{i:06d}.png").write_bytes(b"old")
    failed = flashvsr("upscale", src, out, "--overwrite", "--scale", "2", engine="fails")
    assert failed.returncode == 2 and "the engine failed mid-run" in failed.stderr
    assert _tree(out) == {f"frame_{i:06d}.png": b"old" for i in range(20)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]
    done = flashvsr("upscale", src, out, "--overwrite", "--scale", "2", engine="nearest")
    assert done.returncode == 0, done.stderr
    assert sorted(_tree(out)) == [f"frame_{i:06d}.png" for i in range(12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_failed_run_keeps_the_previous_video(tmp_path, flashvsr):
    src = _frames(tmp_path / "in", n=12)
    out = tmp_path / "o.mkv"
    out.write_bytes(b"previous video")
    done = flashvsr("upscale", src, out, "--overwrite", engine="fails")
    assert done.returncode == 2
    assert out.read_bytes() == b"previous video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o.mkv"]


def test_leftovers_of_killed_runs_are_cleaned_and_live_ones_reported(tmp_path, flashvsr):
    src = _frames(tmp_path / "in", n=12)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".o.partial-{dead}.mkv").write_bytes(b"half a video")
    frames = tmp_path / f".f.partial-{dead}"
    frames.mkdir()
    (frames / "frame_000000.png").write_bytes(b"half")
    live = tmp_path / f".o.partial-{os.getpid()}.mkv"       # this test's process is running
    live.write_bytes(b"being written")
    unrelated = tmp_path / ".o.partial-notes.mkv"
    unrelated.write_bytes(b"not ours")
    done = flashvsr("upscale", src, tmp_path / "o.mkv", engine="nearest")
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp_path / f'.o.partial-{dead}.mkv'}, left by a killed run" in done.stderr
    assert not (tmp_path / f".o.partial-{dead}.mkv").exists()
    assert f"{live} belongs to process {os.getpid()}, which is still running" in done.stderr
    assert live.read_bytes() == b"being written" and unrelated.read_bytes() == b"not ours"
    assert frames.exists()                # another output's leftovers wait for a run of that output
    done = flashvsr("upscale", src, tmp_path / "f", engine="nearest")
    assert done.returncode == 0, done.stderr
    assert not frames.exists() and len(list((tmp_path / "f").iterdir())) == 12


# ---- the command line says what it does (issue #13 item 6) -----------------------------------

@pytest.fixture(scope="module")
def real_run(import_path, tmp_path_factory):
    """One run of the real loader and engine (random micro networks) on 25 small frames, stderr
    not a terminal."""
    folder = tmp_path_factory.mktemp("real")
    src = _frames(folder / "in", n=25, size=(16, 24))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(import_path))
    code = CHILD.format(engine=textwrap.dedent(ENGINES["random"]),
                        args=["upscale", str(src), str(folder / "o.mkv"), "--scale", "2",
                              "--device", "cpu", "--models", str(folder)])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=env, cwd=folder)


def test_upscale_prints_a_run_summary_with_backends_fps_and_device(real_run):
    assert real_run.returncode == 0, real_run.stderr
    (summary,) = [line for line in real_run.stdout.splitlines() if line.startswith("FlashVSR tiny v1.1: ")]
    assert "attention: " in summary and "(sparse)" in summary and " fps" in summary
    assert "25 frames in " in summary and "device cpu" in summary


def test_default_enable_on_cpu_prints_no_warning_about_sageattention(real_run):
    assert real_run.returncode == 0, real_run.stderr
    assert "SageAttention was requested" not in real_run.stderr, real_run.stderr   # info level
    assert "WARNING" not in real_run.stderr.replace("WARNING: no CUDA GPU found", ""), real_run.stderr
    assert "sage not used" in real_run.stdout                         # the summary says why


def test_shows_weights_loading_and_first_chunk_then_the_last_line_once(real_run):
    err = real_run.stderr.splitlines()
    loading = [i for i, line in enumerate(err) if line.startswith("INFO: loading weights")]
    warming = [i for i, line in enumerate(err) if "warming up" in line]
    assert loading and warming and loading[0] < warming[0], real_run.stderr
    progress = [line for line in err if line.startswith("25/25 frames")]
    assert len(progress) == 1, real_run.stderr


def test_no_download_error_names_the_flag(flashvsr, no_weights, tmp_path):
    done = flashvsr("upscale", SAMPLE, tmp_path / "o.mp4", *no_weights)
    assert done.returncode == 2
    assert "(--no-download)" in done.stderr and "download=False" not in done.stderr
    assert "Traceback" not in done.stderr


def test_version_prints_the_pack_version_and_weights_have_their_own_flag(flashvsr, tmp_path):
    import tomllib
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = flashvsr("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"flashvsr {version}"
    old = flashvsr("upscale", SAMPLE, tmp_path / "o.mp4", "--version", "v1")
    assert old.returncode == 2 and "use --weights v1" in old.stderr
    assert flashvsr("bench", "--weights", "v2").returncode == 2          # choices are checked


def test_verbose_works_after_the_subcommand(flashvsr, tmp_path, no_weights):
    out = tmp_path / "o.avi"
    after = flashvsr("upscale", SAMPLE, out, *no_weights, "-v")
    before = flashvsr("-v", "upscale", SAMPLE, out, *no_weights)
    plain = flashvsr("upscale", SAMPLE, out, *no_weights)
    assert "Traceback" in after.stderr and "Traceback" in before.stderr     # -v: full tracebacks
    assert "Traceback" not in plain.stderr and plain.returncode == 2


def test_help_has_examples_and_every_option_explained(flashvsr):
    top = flashvsr("--help").stdout
    assert "examples:" in top and "flashvsr upscale clip.mp4" in top
    upscale = flashvsr("upscale", "--help").stdout
    assert "examples:" in upscale
    for flag, words in (("--seed", "noise seed"), ("--tile-overlap", "overlap of neighbouring tiles"),
                        ("--weights", "weights version")):
        assert words in upscale.split(flag, 2)[-1][:300], flag
    bench = flashvsr("bench", "--help").stdout
    assert "upscale factor" in bench.split("--scale", 2)[-1][:200]


def test_doctor_is_not_ready_when_weights_are_missing_and_the_hub_unreachable(flashvsr, tmp_path):
    with hub_helpers.FakeHub() as hub:
        closed = hub.endpoint                 # a port nobody listens on once the hub is gone
    done = flashvsr("doctor", "--no-numeric", "--models", tmp_path, env={"HF_ENDPOINT": closed})
    assert done.returncode == 1, done.stdout
    assert "NOT ready" in done.stdout and f"{closed} is unreachable" in done.stdout
    with hub_helpers.FakeHub() as hub:
        done = flashvsr("doctor", "--no-numeric", "--models", tmp_path, env={"HF_ENDPOINT": hub.endpoint})
    assert done.returncode == 0 and "ready: the pack can run" in done.stdout, done.stdout


def test_doctor_lists_each_shared_file_once(flashvsr, tmp_path):
    for version in ("v1", "v1.1"):                    # both versions downloaded: shared files twice
        (tmp_path / version).mkdir()
        for name, data in (("TCDecoder.ckpt", hub_helpers.tiny_official_bytes()["v1.1", "tcdecoder"]),
                           ("posi_prompt.pth", hub_helpers.tiny_official_bytes()["v1.1", "prompt"])):
            (tmp_path / version / name).write_bytes(data)
    done = flashvsr("doctor", "--no-numeric", "--json", "--models", tmp_path,
                    env={"HF_HUB_OFFLINE": "1"})
    names = [c["name"] for c in json.loads(done.stdout)["checks"] if c["section"] == "weights"]
    assert len(names) == len(set(names)), names
    (tc,) = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "TCDecoder"]
    assert tc["status"] == "OK" and "unused copy at" in tc["detail"]


def test_a_frame_folder_moved_aside_by_a_killed_swap_comes_back(tmp_path, flashvsr, no_weights):
    src = _frames(tmp_path / "in", n=3)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".f.replaced-{dead}"          # killed between the two renames of a swap
    aside.mkdir()
    (aside / "frame_000000.png").write_bytes(b"previous")
    done = flashvsr("upscale", src, tmp_path / "f", *no_weights)
    _refused_before_loading(done, "exists: pass --overwrite")
    assert _tree(tmp_path / "f") == {"frame_000000.png": b"previous"} and not aside.exists()
