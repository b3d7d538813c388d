"""One video over several processes (issue #16), on the CPU: gloo ranks, small random networks.

The ranks split the DiT's windows and heads (models/sequence_parallel.py) and the projector's and
decoders' rows (models/row_bands.py, tests/test_parallel_bands.py). The DiT's split is bit for bit
in float32 on the CPU: each GEMM row, norm, softmax and attention row is computed from the same
values in the same order. The bands compute every value from the same inputs too, but torch's CPU
convolutions and SiLU may round a pixel differently when a call has fewer rows (oneDNN picks its
algorithm by shape; SiLU's scalar tail loop rounds unlike its vector loop), so whole runs are
checked within ``BAND_TOLERANCE`` (docs/parallel.md, "Why the frames are the same").
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_flashvsr.flashvsr.cli import launch
from comfyui_flashvsr.flashvsr.engine.schedule import total_chunks
from comfyui_flashvsr.models import sequence_parallel
from comfyui_flashvsr.models.row_bands import band_split
from flashvsr_tests_parallel_checks import CHILD_ENV, assert_same_frames, run_ranks
from comfyui_flashvsr.models.sequence_parallel import SequenceParallel, check_heads, window_split

ROOT = Path(__file__).resolve().parent.parent
RANK_SCRIPT = Path(__file__).with_name("parallel_rank.py")


def _job(tmp_path, world, **overrides) -> Path:
    job = {"init": f"file://{tmp_path}/store", "world": world, "out": str(tmp_path), "heads": 6,
           "modes": ["tiny"], "frames": 37, "size": [32, 64], "scale": 4} | overrides
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


def _ranks(job: Path, world: int, timeout: float = 120) -> list[tuple[int, str]]:
    return run_ranks(RANK_SCRIPT, job, world, timeout)


def _alone_and_together(tmp_path, world, **job):
    results = _ranks(_job(tmp_path, world, **job), world)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{out}"
    return torch.load(tmp_path / "rank0.pt")


def _assert_same_frames(mode: str, alone: torch.Tensor, together: torch.Tensor) -> None:
    assert_same_frames(mode, alone, together)


def test_two_ranks_give_the_one_process_frames_in_every_mode(tmp_path):
    # 128x384 model frame: 3 windows per group; rank 0 takes half a share, so chunk 0 splits 3/6 and
    # later chunks 1/2; 29 frames are 2 chunks, and the second evicts the oldest KV group
    # (3 cached + 1 new > kv_ratio 3)
    assert total_chunks(29, False) == 2 and window_split(9, 2, 0.5) == [3, 6]
    got = _alone_and_together(tmp_path, 2, modes=["tiny", "tiny-long", "full"], frames=29, size=[32, 96],
                              rank0_share=0.5)
    for mode, (alone, together) in got.items():
        assert alone.shape == (29, 128, 384, 3), mode
        _assert_same_frames(mode, alone, together)


def test_three_ranks_with_an_idle_rank_give_the_one_process_frames(tmp_path):
    # 128x256: 2 windows per group, so after chunk 0 (2/2/2) the third rank holds no window (1/1/0)
    # and only serves its heads; 37 frames are 3 chunks, two of them evicting. Bands of unequal
    # heights: 16 latent rows are 6/5/5, 8 token rows 3/3/2.
    assert total_chunks(37, False) == 3 and window_split(2, 3) == [1, 1, 0]
    assert band_split(16, 3) == [6, 5, 5] and band_split(8, 3) == [3, 3, 2]
    got = _alone_and_together(tmp_path, 3, modes=["tiny", "tiny-long"], frames=37, size=[32, 64])
    for mode, (alone, together) in got.items():
        assert alone.shape == (37, 128, 256, 3), mode
        _assert_same_frames(mode, alone, together)


def test_windows_split_contiguously_with_sizes_differing_by_one_at_most():
    assert window_split(9, 2) == [5, 4]
    assert window_split(66, 4) == [17, 17, 16, 16]
    assert window_split(12, 12) == [1] * 12
    assert window_split(66, 4, rank0_share=0.5) == [9, 19, 19, 19]     # rank 0 also decodes
    assert window_split(66, 4, rank0_share=0.0) == [0, 22, 22, 22]


def test_heads_that_do_not_split_over_the_processes_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"12 attention heads, which do not split over 5 processes: "
                                         r"use 1, 2, 3, 4, 6, 12 GPUs"):
        check_heads(12, 5)
    monkeypatch.setattr(sequence_parallel.dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(sequence_parallel.dist, "get_world_size", lambda group=None: 3)
    with pytest.raises(ValueError, match="2 attention heads, which do not split over 3 processes: use 1, 2 GPUs"):
        SequenceParallel(2)
    assert SequenceParallel(6).heads == 2


def test_a_failing_worker_stops_rank_0(tmp_path):
    started = time.monotonic()
    (code0, out0), (code1, out1) = _ranks(_job(tmp_path, 2, fail_rank=1), 2, timeout=90)
    assert code1 != 0 and "rank 1 fails on purpose" in out1
    assert code0 != 0, out0                 # gloo tells rank 0 that its peer is gone: no hang
    assert time.monotonic() - started < 80
    assert not (tmp_path / "rank0.pt").exists()


def test_launcher_stops_every_rank_when_one_fails(tmp_path):
    # rank 0 sleeps as if stuck inside a collective (NCCL has no timeout to save it): the launcher
    # must stop it, and run the cleanup (the CLI removes the killed rank 0's partial output there)
    job = _job(tmp_path, 2, init="env://", fail_rank=1, fail_at_start=True, rank0_sleeps=True)
    port = launch.free_port()
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(job)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=launch.rank_env(r, 2, port, os.environ | CHILD_ENV))
             for r in range(2)]
    cleaned = []
    started = time.monotonic()
    try:
        code = launch.supervise(procs, cleanup=lambda: cleaned.append(True), grace_s=5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert code == 1 and cleaned == [True]
    assert all(p.returncode is not None for p in procs) and procs[0].returncode != 0
    assert time.monotonic() - started < 60


def test_gpus_flag_is_removed_from_the_childrens_arguments():
    assert launch.without_gpus(["upscale", "a", "b", "--gpus", "2", "--mode", "tiny"]) == ["upscale", "a", "b",
                                                                                            "--mode", "tiny"]
    assert launch.without_gpus(["bench", "--gpus=4"]) == ["bench"]


def test_a_gpu_count_the_heads_do_not_split_over_is_refused_before_any_process_starts(monkeypatch, capsys):
    from comfyui_flashvsr.flashvsr.cli import main as cli

    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")
    monkeypatch.setattr(subprocess, "Popen", no_process)
    code = cli.main(["bench", "--widths", "tiny", "--device", "cpu", "--gpus", "5"])
    assert code != 0
    assert "the DiT has 12 attention heads, which do not split over 5 processes: use 1, 2, 3, 4, 6, 12 GPUs" \
        in capsys.readouterr().err


def test_gpus_must_match_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch.parallel_config(1).rank == 1
    with pytest.raises(ValueError, match="leave --gpus out"):
        launch.parallel_config(4)


# ---- the command line: `flashvsr upscale --gpus 2` ------------------------------------------------

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    """An importable package folder, reduced weights (2 heads) and a folder of PNG frames."""
    from PIL import Image
    from flashvsr_tests_tiny_weights import write_tiny_weights
    base = tmp_path_factory.mktemp("cli")
    (base / "importable").mkdir()
    (base / "importable" / "comfyui_flashvsr").symlink_to(ROOT, target_is_directory=True)
    write_tiny_weights(base / "models", "v1.1", include_vae=False)
    frames = base / "in"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(frames / f"f{i:03d}.png")
    return base


def _flashvsr(base: Path, *args, env=None, timeout=180):
    full_env = os.environ | CHILD_ENV | {"PYTHONPATH": str(base / "importable")} | (env or {})
    return subprocess.run([sys.executable, "-m", "comfyui_flashvsr", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=base, env=full_env)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _assert_same_pngs(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """8-bit frames of two runs whose values differ within BAND_TOLERANCE: a value at the edge
    of a rounding step may land one level apart, nothing more."""
    import io
    from PIL import Image
    assert sorted(got) == sorted(want)
    for name in want:
        a, b = (np.asarray(Image.open(io.BytesIO(d)), dtype=np.int16) for d in (got[name], want[name]))
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, name


CLI_COMMON = ["--device", "cpu", "--no-download", "--scale", "4"]


@pytest.fixture(scope="module")
def one_process(cli_setup):
    out = cli_setup / "one"
    done = _flashvsr(cli_setup, "upscale", cli_setup / "in", out, *CLI_COMMON, "--models", cli_setup / "models")
    assert done.returncode == 0, done.stderr
    return _pngs(out)


def test_cli_gpus_2_writes_the_frames_of_one_process(cli_setup, one_process, tmp_path):
    two = _flashvsr(cli_setup, "upscale", cli_setup / "in", tmp_path / "two", *CLI_COMMON,
                    "--models", cli_setup / "models", "--gpus", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 1      # rank 0 alone writes and reports
    assert len(_pngs(tmp_path / "two")) == 12
    _assert_same_pngs(_pngs(tmp_path / "two"), one_process)


def test_torchrun_runs_the_same_command(cli_setup, one_process, tmp_path):
    env = os.environ | CHILD_ENV | {"PYTHONPATH": str(cli_setup / "importable")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "comfyui_flashvsr", "upscale", str(cli_setup / "in"), str(tmp_path / "out"), *CLI_COMMON,
                           "--models", str(cli_setup / "models")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    _assert_same_pngs(_pngs(tmp_path / "out"), one_process)


def test_cli_rank_0_leaves_no_partial_output_when_a_worker_dies(cli_setup, tmp_path):
    # rank 0 is the real command; rank 1 a stand-in worker that dies at the first chunk
    job = _job(tmp_path, 2, init="env://", fail_rank=1, heads=2, expect_weights=True)
    port = launch.free_port()
    out = tmp_path / "out"
    worker = subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(job)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=launch.rank_env(1, 2, port, os.environ | CHILD_ENV))
    try:
        done = _flashvsr(cli_setup, "upscale", cli_setup / "in", out, "--device", "cpu", "--models",
                         cli_setup / "models", "--no-download", env=launch.rank_env(0, 2, port, {}), timeout=120)
    finally:
        worker_out = worker.communicate(timeout=60)[0]
    assert "rank 1 fails on purpose" in worker_out
    assert done.returncode != 0
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
