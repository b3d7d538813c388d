"""``flashvsr upscale``: options reach the engine, frames stream, output is atomic, errors are clear.

The engine is replaced by a fake with the real ``upscale_stream`` contract (lazy input, one output
frame per input frame, first chunk after 25 input frames, then 8 at a time), so these tests run in
about a second and still see what the command line does with frames, files and errors.
"""
import io
import signal
import subprocess
import sys
import time
from fractions import Fraction
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_flashvsr.flashvsr.cli import main as cli
from comfyui_flashvsr.flashvsr.cli.video_io import iter_frames, probe

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "sample.mp4"


class FakePipe:
    """Nearest-neighbour upscaler with FlashVSR's streaming shape: 21 frames, then chunks of 8."""

    def __init__(self, interrupt_after_chunks=None):
        self.configs, self.interrupt_after_chunks = [], interrupt_after_chunks

    def upscale_stream(self, frame_iter, cfg, n_frames=None, on_progress=None):
        self.configs.append(cfg)
        s = int(cfg.scale)
        held, chunks, first = [], 0, True
        for frame in frame_iter:
            held.append(np.asarray(frame))
            need = 25 if first else 8 + 4           # 4 frames of look-ahead, as the real engine
            if len(held) >= need:
                take = 21 if first else 8
                out, held, first = held[:take], held[take:], False
                yield torch.from_numpy(np.stack(out).repeat(s, 1).repeat(s, 2))
                chunks += 1
                if chunks == self.interrupt_after_chunks:
                    raise KeyboardInterrupt
        if held:
            yield torch.from_numpy(np.stack(held).repeat(s, 1).repeat(s, 2))

    def upscale(self, frames, cfg, on_progress=None):
        self.configs.append(cfg)
        s = int(cfg.scale)
        for done in (1, 2, 3):
            on_progress(done, 3)
        return SimpleNamespace(frames=frames.repeat_interleave(s, 1).repeat_interleave(s, 2))


@pytest.fixture
def fake_loader(monkeypatch):
    pipes = []

    def load(job):
        pipes.append(FakePipe())
        return pipes[-1]
    monkeypatch.setattr(cli, "load_pipeline", load)
    return pipes


def test_upscale_writes_video_with_input_fps_frame_count_and_audio(tmp_path, fake_loader, capsys):
    out = tmp_path / "x2.mp4"
    assert cli.main(["upscale", str(SAMPLE), str(out), "--scale", "2"]) == 0
    src, got = probe(SAMPLE), probe(out)
    assert (got.width, got.height) == (2 * src.width, 2 * src.height)
    assert (got.frames, got.fps, got.audio) == (src.frames, src.fps, "aac")
    assert "wrote" in capsys.readouterr().out


def test_options_reach_the_engine_config(tmp_path, fake_loader):
    out = tmp_path / "o.mkv"
    code = cli.main(["upscale", str(SAMPLE), str(out), "--scale", "2", "--sageattention", "disable",
                     "--color-fix", "wavelet", "--seed", "7", "--sparse-ratio", "1.5",
                     "--local-range", "9", "--tile-size", "256", "--tile-overlap", "64",
                     "--vae-tiling", "--vae-tile", "320x640", "--vae-stride", "160x320", "--no-compile"])
    assert code == 0
    cfg = fake_loader[0].configs[0]
    assert (cfg.scale, cfg.sageattention, cfg.color_fix, cfg.seed) == (2.0, "disable", "wavelet", 7)
    assert (cfg.sparse_ratio, cfg.local_range, cfg.tile_size, cfg.tile_overlap) == (1.5, 9, 256, 64)
    assert (cfg.vae_tiling, cfg.vae_tile, cfg.vae_stride, cfg.compile) == (True, (40, 80), (20, 40), False)


def test_job_carries_mode_version_device_precision_and_models():
    args = cli.build_parser().parse_args(
        ["upscale", "in.mp4", "out.mp4", "--mode", "tiny-long", "--weights", "v1",
         "--device", "cpu", "--precision", "fp16", "--models", "/m1", "--models", "/m2",
         "--no-download", "--no-audio", "--fps", "30000/1001"])
    job = cli.job_from_args(args)
    assert (job.mode, job.version, job.device, job.precision) == ("tiny-long", "v1", "cpu", "fp16")
    assert job.models == (Path("/m1"), Path("/m2")) and not job.download and not job.audio
    assert job.fps == Fraction(30000, 1001)


def test_memory_stays_flat_for_a_long_input(tmp_path):
    """2,000 frames through the command line: never more than a chunk's worth held at once."""
    decoded, written = [0], []

    def source():
        for i in range(2000):
            decoded[0] += 1
            yield np.full((8, 8, 3), i % 256, np.uint8)

    class CountingProgress(cli.Progress):
        def update(self, done):
            written.append(decoded[0] - done)       # frames decoded but not yet written
            super().update(done)

    info = probe(SAMPLE)
    job = cli.UpscaleJob(input=SAMPLE, output=tmp_path / "long.mkv", audio=False,
                         upscale=cli.config.UpscaleConfig(scale=1.0))
    done = cli.run_upscale(job, FakePipe(), info, CountingProgress(2000, io.StringIO()), frames=source())
    assert done.frames == 2000
    assert max(written) <= 25                       # look-ahead of the engine, nothing more


def test_spatial_tiling_runs_on_the_whole_clip_and_still_writes_every_frame(tmp_path, fake_loader,
                                                                            caplog):
    out = tmp_path / "tiled.mp4"
    assert cli.main(["upscale", str(SAMPLE), str(out), "--scale", "2", "--tile-size", "384"]) == 0
    assert fake_loader[0].configs[0].tile_size == 384
    got, src = probe(out), probe(SAMPLE)
    assert (got.frames, got.width, got.audio) == (src.frames, 2 * src.width, "aac")
    first = next(iter_frames(out)).astype(int)
    assert np.abs(first[::2, ::2] - next(iter_frames(SAMPLE))).mean() < 3   # values survive 0..1 floats
    assert "holds all 72 frames in memory" in caplog.text


def test_ctrl_c_mid_run_leaves_no_file_and_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", lambda job: FakePipe(interrupt_after_chunks=2))
    out = tmp_path / "never.mp4"
    assert cli.main(["upscale", str(SAMPLE), str(out), "--scale", "1"]) == 130
    assert list(tmp_path.iterdir()) == []
    assert "no output file was left behind" in capsys.readouterr().err


def test_existing_output_is_refused_before_loading_weights(tmp_path, monkeypatch, caplog):
    def must_not_load(job):
        raise AssertionError("weights loaded before the paths were checked")
    monkeypatch.setattr(cli, "load_pipeline", must_not_load)
    out = tmp_path / "exists.mp4"
    out.write_bytes(b"keep me")
    assert cli.main(["upscale", str(SAMPLE), str(out)]) == 2
    assert "pass --overwrite" in caplog.text and out.read_bytes() == b"keep me"


def test_bad_output_name_or_folder_is_refused_before_loading_weights(tmp_path, fake_loader, caplog):
    assert cli.main(["upscale", str(SAMPLE), str(tmp_path / "o.avi")]) == 2
    assert cli.main(["upscale", str(SAMPLE), str(tmp_path / "no" / "o.mp4")]) == 2
    assert "cannot write o.avi" in caplog.text and "output folder does not exist" in caplog.text
    assert fake_loader == []


def test_weight_errors_are_reported_without_traceback(tmp_path, monkeypatch, caplog):
    from comfyui_flashvsr.flashvsr.weights.checks import WeightError

    def offline(job):
        raise WeightError("FlashVSR v1.1 weights are missing and HF_HUB_OFFLINE is set: put them in /x")
    monkeypatch.setattr(cli, "load_pipeline", offline)
    assert cli.main(["upscale", str(SAMPLE), str(tmp_path / "o.mp4")]) == 2
    assert "HF_HUB_OFFLINE is set: put them in /x" in caplog.text
    assert "Traceback" not in caplog.text


def test_invalid_tiling_is_rejected_with_the_config_message(tmp_path, fake_loader, caplog):
    assert cli.main(["upscale", str(SAMPLE), str(tmp_path / "o.mp4"), "--tile-size", "100"]) == 2
    assert "tile_size is 100; use 0 (off) or a multiple of 128" in caplog.text
    assert fake_loader == []


def test_image_folder_input_uses_the_fps_option(tmp_path, fake_loader):
    from PIL import Image
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(np.full((16, 16, 3), i * 8, np.uint8)).save(folder / f"f{i}.png")
    out = tmp_path / "o.mp4"
    assert cli.main(["upscale", str(folder), str(out), "--scale", "2", "--fps", "12"]) == 0
    got = probe(out)
    assert (got.frames, got.fps, got.width, got.audio) == (30, 12, 32, None)


def test_progress_line_shows_fps_and_eta():
    now = [0.0]
    stream = io.StringIO()
    p = cli.Progress(100, stream, every_s=0, clock=lambda: now[0])
    now[0] = 5.0
    p.update(10)
    assert stream.getvalue().strip() == "10/100 frames  2.00 fps  0:00:05 elapsed  ETA 0:00:45"


def test_default_models_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHVSR_MODELS", str(tmp_path))
    assert cli.default_models_roots() == [tmp_path]
    monkeypatch.delenv("FLASHVSR_MODELS")
    assert cli.default_models_roots() == [Path.home() / ".cache" / "flashvsr" / "models"]


def test_upscale_streams_through_the_real_engine_with_reduced_networks(tmp_path, monkeypatch):
    """The real ``upscale_stream`` (random, reduced-width networks): every frame in, every frame out."""
    from PIL import Image
    from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(21):                                   # FlashVSR's first chunk
        Image.fromarray(np.full((32, 48, 3), i * 8, np.uint8)).save(folder / f"{i}.png")
    pipe = FlashVSR.random(mode="tiny-long", device="cpu", dtype=torch.float32, size="tiny")
    monkeypatch.setattr(cli, "load_pipeline", lambda job: pipe)
    out = tmp_path / "real.mkv"
    assert cli.main(["upscale", str(folder), str(out), "--scale", "2", "--device", "cpu"]) == 0
    got = probe(out)
    assert (got.width, got.height, got.fps) == (96, 64, 30)
    assert sum(1 for _ in iter_frames(out)) == 21


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import conftest
import numpy as np, torch
from comfyui_flashvsr.flashvsr.cli import main as cli

class Slow:
    def upscale_stream(self, frames, cfg, n_frames=None, on_progress=None):
        yield torch.zeros((8, 16, 16, 3), dtype=torch.uint8)
        while True:                      # a long clip: the signal arrives mid-run
            time.sleep(0.05)
            yield torch.zeros((1, 16, 16, 3), dtype=torch.uint8)

cli.load_pipeline = lambda job: Slow()
sys.exit(cli.main(["upscale", {src!r}, {out!r}]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_from_outside_leaves_no_partial_file(tmp_path, sig):
    out = tmp_path / "o.mp4"
    code = CHILD.format(tests=str(Path(__file__).parent), src=str(SAMPLE), out=str(out))
    child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".o.partial-*.mp4")):    # wait until the encoder is writing
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
        time.sleep(0.05)
    time.sleep(0.3)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert list(tmp_path.iterdir()) == []


def test_progress_says_warming_up_first_and_a_terminal_line_overwrites_it_whole():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    now = [0.0]
    stream = Terminal()
    p = cli.Progress(100, stream, clock=lambda: now[0])
    p.begin("warming up: the first chunk takes longest")
    now[0] = 5.0
    p.update(10)
    first, second = stream.getvalue().split("\r")[1:]
    assert "warming up" in first
    assert len(second) >= len(first) and second.rstrip() == "10/100 frames  2.00 fps  0:00:05 elapsed  ETA 0:00:45"


def test_progress_off_a_terminal_does_not_repeat_the_last_line():
    now = [0.0]
    stream = io.StringIO()
    p = cli.Progress(10, stream, every_s=0, clock=lambda: now[0])
    now[0] = 1.0
    p.update(10)
    p.close()
    assert stream.getvalue().count("10/10 frames") == 1


def test_a_plan_that_needs_tiles_runs_the_whole_clip_with_the_users_budget(tmp_path, fake_loader):
    class Planned(FakePipe):
        def plan(self, height, width, cfg):
            self.planned = (height, width, cfg.vram_budget)
            return SimpleNamespace(tiles=object(), describe=lambda: "2 tiles")

        def upscale_stream(self, *args, **kwargs):
            raise AssertionError("a tiled plan must not stream")

    pipe = Planned()
    info = probe(SAMPLE)
    job = cli.job_from_args(cli.build_parser().parse_args(
        ["upscale", str(SAMPLE), str(tmp_path / "planned.mp4"), "--scale", "2", "--vram-budget", "6"]))
    assert cli.run_upscale(job, pipe, info, cli.Progress(info.frames, io.StringIO())).frames == info.frames
    assert pipe.planned == (info.height, info.width, "6")
    assert [c.vram_budget for c in pipe.configs] == ["6"]
