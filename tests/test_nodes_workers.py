"""The Advanced node's `gpus`: GPU worker processes started, kept, stopped and recovered by the node's
runner, on the CPU (gloo processes; the server is made to "see" 2 GPUs, and device cpu runs the
same parallel path, as `flashvsr --device cpu --gpus 2` does).

The real worker processes run here: they import the pack from its folder, load the weights from the
same models folder and serve rank 0 (this test process). In float32 on the CPU the frames equal the
one-process frames within the band tolerance (tests/parallel_checks.py; docs/parallel.md, "Why the
frames are the same").
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashvsr_tests_parallel_checks import BAND_TOLERANCE, max_difference
from flashvsr_tests_tiny_weights import write_tiny_weights
from comfyui_flashvsr.flashvsr import devices
from comfyui_flashvsr.nodes import workers
from comfyui_flashvsr.nodes.options import NodeSettings
from comfyui_flashvsr.nodes.runner import PipelineCache, run_upscale


def _same(frames: torch.Tensor, alone: torch.Tensor) -> bool:
    return frames.shape == alone.shape and max_difference(frames, alone) <= BAND_TOLERANCE

NO_SAGE = {"installed": False, "version": None, "flavour": None, "reason": "not here"}
# 37 frames: 3 chunks. Rank 0 hands a chunk's frames on one chunk late, so the first progress call
# comes after chunk 2's DiT, and chunk 3 still needs the workers.
FRAMES = torch.rand((37, 8, 12, 3), generator=torch.Generator().manual_seed(3))


class UserCancel(BaseException):
    """Stands for ComfyUI's InterruptProcessingException (a BaseException)."""


class Cancel:
    """The user's Cancel button, as ComfyUI's model_management holds it."""

    def __init__(self):
        self.pressed = False

    def raise_if_pressed(self):
        if self.pressed:
            self.pressed = False
            raise UserCancel()

    def hooks(self):
        return workers.CancelHooks(lambda: self.pressed, self.raise_if_pressed)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per process (the workers take rank 0's count): on a small shared CPU, the
    gloo processes' spinning thread pools would otherwise take turns for seconds per chunk."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "FlashVSR"
    write_tiny_weights(root, "v1.1", include_vae=False)      # 2 heads: 2 processes split them
    return [str(root)]


@pytest.fixture(scope="module")
def alone(models):
    """The one-process frames (the node with gpus 1)."""
    return _run(PipelineCache(), models, gpus=1).frames


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    cache = PipelineCache()
    yield cache
    cache.release("test over")


def _run(cache, models, gpus=2, on_progress=lambda done, total: None, cancel=workers.NO_CANCEL, **settings):
    return run_upscale(FRAMES, NodeSettings(scale=2.0, gpus=gpus, **settings), cache=cache, roots=models,
                       auto_device="cpu", on_progress=on_progress, sage_status=lambda: NO_SAGE, cancel=cancel)


def _worker(cache):
    [proc] = cache.pipeline.pool.procs.values()
    return proc


def test_two_processes_give_the_one_process_frames_and_keep_their_worker_until_released(models, alone, two_gpus):
    cache = two_gpus
    first = _run(cache, models)
    assert _same(first.frames, alone)
    assert "fp32 on cpu; the DiT on 2 CPU processes" in first.lines[1]
    worker = _worker(cache)
    again = _run(cache, models, mode="tiny-long")      # only rank 0 decodes: the worker stays
    assert _same(again.frames, alone) and again.lines[-1] == "weights: already loaded"
    assert _worker(cache) is worker and worker.poll() is None
    logs = cache.pipeline.pool.logs
    _run(cache, models, gpus=1)                         # another GPU count: the worker is stopped
    assert worker.wait(timeout=30) == 0 and not logs.exists()


def test_keep_model_loaded_off_stops_the_worker_after_the_run(models, alone, two_gpus):
    seen = []
    out = _run(two_gpus, models, keep_model_loaded=False,
               on_progress=lambda done, total: seen.append(_worker(two_gpus)))
    assert _same(out.frames, alone)
    assert two_gpus.pipeline is None and seen[0].wait(timeout=30) == 0


def test_a_killed_worker_fails_the_run_with_one_line_and_the_next_run_starts_a_fresh_one(models, alone, two_gpus):
    cache = two_gpus
    _run(cache, models)
    dead = _worker(cache)

    def kill_worker(done, total):
        if dead.poll() is None:
            dead.send_signal(signal.SIGKILL)
            dead.wait(timeout=30)

    with pytest.raises(workers.WorkerStopped) as err:
        _run(cache, models, on_progress=kill_worker)
    assert str(err.value) == "FlashVSR ⚡: GPU worker 1 of 2 stopped: killed by SIGKILL; the run was cancelled"
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert cache.pipeline is None                         # nothing half-usable stays cached
    after = _run(cache, models)
    assert _same(after.frames, alone) and _worker(cache).pid != dead.pid


def test_a_worker_gone_between_runs_is_replaced_by_the_next_run(models, alone, two_gpus):
    _run(two_gpus, models)
    gone = _worker(two_gpus)
    gone.kill()
    gone.wait(timeout=30)
    out = _run(two_gpus, models)
    assert _same(out.frames, alone) and _worker(two_gpus).pid != gone.pid
    assert out.lines[-1].startswith("weights: loaded in")


def test_cancel_between_chunks_keeps_the_worker_in_step_for_the_next_run(models, alone, two_gpus):
    cancel = Cancel()
    _run(two_gpus, models)
    worker = _worker(two_gpus)

    def press_cancel(done, total):
        cancel.pressed = True
        cancel.raise_if_pressed()     # what the node's progress callback does

    with pytest.raises(UserCancel):
        _run(two_gpus, models, on_progress=press_cancel, cancel=cancel.hooks())
    after = _run(two_gpus, models, cancel=cancel.hooks())
    assert _same(after.frames, alone) and _worker(two_gpus) is worker


def test_cancel_while_a_worker_does_not_answer_stops_it_and_the_next_run_starts_fresh(models, alone, two_gpus,
                                                                                        monkeypatch):
    # The worker stops answering (SIGSTOP) while rank 0 is in the next chunk's collectives, which no
    # Cancel check can interrupt: the watchdog stops the worker once the Cancel is not reached in time.
    monkeypatch.setattr(workers.ParallelPipeline, "cancel_grace_s", 0.5)
    cancel = Cancel()
    _run(two_gpus, models)
    stuck = _worker(two_gpus)

    def freeze_worker_and_press_cancel(done, total):
        if not cancel.pressed and stuck.poll() is None:
            os.kill(stuck.pid, signal.SIGSTOP)
            cancel.pressed = True     # ... and return: the progress bar does not check Cancel here

    with pytest.raises(UserCancel):
        _run(two_gpus, models, on_progress=freeze_worker_and_press_cancel, cancel=cancel.hooks())
    assert stuck.wait(timeout=30) == -signal.SIGKILL and two_gpus.pipeline is None
    after = _run(two_gpus, models, cancel=cancel.hooks())
    assert _same(after.frames, alone) and _worker(two_gpus).pid != stuck.pid


def test_more_gpus_than_the_server_sees_are_refused_before_anything_loads(models, monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    cache = PipelineCache(load=pytest.fail, start=pytest.fail)
    with pytest.raises(ValueError, match=r"^FlashVSR ⚡: gpus is 4, but this server sees 2 CUDA GPUs; "
                                         r"choose one of \['1', '2'\]$"):
        _run(cache, models, gpus=4)
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    with pytest.raises(ValueError, match="gpus is 2, but this server sees 0 CUDA GPUs; choose one of \\['1'\\]"):
        _run(cache, models, gpus=2)


def test_a_worker_that_cannot_start_is_named_with_its_last_words(models, monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    monkeypatch.setattr(workers, "BOOTSTRAP", "raise SystemExit('no pack here')")
    with pytest.raises(workers.WorkerStopped, match=r"^FlashVSR ⚡: GPU worker 1 of 2 stopped: exit code 1 "
                                                     r"\(no pack here\); the run was cancelled$"):
        _run(PipelineCache(), models)


SERVER_KILLED = r"""
import importlib.util, os, sys, torch
spec = importlib.util.spec_from_file_location("conftest", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
from comfyui_flashvsr.flashvsr import devices
from comfyui_flashvsr.nodes.options import NodeSettings
from comfyui_flashvsr.nodes.runner import PipelineCache, run_upscale
devices.cuda_count = lambda: 2
torch.set_num_threads(1)
cache = PipelineCache()
run_upscale(torch.rand(2, 8, 8, 3), NodeSettings(scale=2.0, gpus=2), cache=cache, roots=[sys.argv[2]],
            auto_device="cpu", on_progress=lambda done, total: None, sage_status=lambda: {})
[worker] = cache.pipeline.pool.procs.values()
print(cache.pipeline.pool.logs, worker.pid, flush=True)
os._exit(0)      # as when the server is killed: nothing releases the pipeline
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"     # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_worker_exits_by_itself_when_the_server_process_is_killed(models):
    done = subprocess.run([sys.executable, "-c", SERVER_KILLED, str(Path(__file__).with_name("conftest.py")),
                           models[0]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    logs, pid = done.stdout.split()[-2:]
    pid = int(pid)
    shutil.rmtree(logs)                   # a killed server leaves its workers' log folder behind
    deadline = time.monotonic() + 30
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(pid)
