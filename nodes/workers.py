"""Several GPUs from one node: the worker processes the pack starts for the DiT (``gpus`` > 1).

The node's own process is rank 0: it holds the loaded pipeline on the node's device, reads the
frames, runs the projector, the decoder and the colour fix, and its share of the DiT. For ``gpus``
= N the pack starts N-1 worker processes, one per other visible GPU, with torchrun's variables (as
``flashvsr --gpus N`` does, ``flashvsr/cli/launch.py``). Each loads the same weights from the same
model folders and runs the DiT's share of every chunk rank 0 announces (``FlashVSR.serve``,
docs/parallel.md) until the pipeline is released. The model cache keeps them between runs;
releasing the pipeline (keep_model_loaded off, other weights, precision, device or GPU count,
ComfyUI's unload, server exit) stops them. A worker whose parent process is gone exits by itself.

ComfyUI imports the pack by its folder path, under a name no child process can import; a worker
first registers the pack folder as ``comfyui_flashvsr`` (as ``tests/conftest.py`` does), then runs
:func:`worker_main`.

A watchdog thread runs beside every run. When a worker exits, or when a Cancel is not reached
within ``CANCEL_GRACE_S`` (rank 0 waiting inside a collective for a worker that does not answer),
it stops the workers and aborts the collectives, so the node fails with one line or cancels
instead of hanging; the next run starts fresh workers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..flashvsr.cli.launch import free_port, rank_env, stop

log = logging.getLogger(__name__)

PACK_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_flashvsr"     # the name a worker gives the pack folder
POLL_S = 0.1
START_TIMEOUT_S = 600.0          # the workers' interpreter, torch and the pack must start within this
CANCEL_GRACE_S = 15.0            # a Cancel that no chunk boundary reached by then stops the workers
STOP_GRACE_S = 10.0              # released workers exit at once; SIGTERM after this,
TERM_GRACE_S = 5.0               # and SIGKILL after this
DEAD_WAIT_S = 2.0                # a collective failed: the time a dying worker may take to exit
LOG_TAIL_LINES = 20              # a stopped worker's last output lines, for the server log

# ``python -c`` program of a worker: argv = pack folder, package name, WorkerSpec as JSON.
BOOTSTRAP = """\
import importlib, importlib.util, os, sys
root, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                              submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
raise SystemExit(importlib.import_module(name + ".nodes.workers").worker_main(sys.argv[3]))
"""


@dataclass(frozen=True)
class CancelHooks:
    """How a run learns of the user's Cancel. ``requested`` is read from the watchdog thread and
    never clears the request; ``raise_if_requested`` raises the host's own "cancelled" exception
    (ComfyUI: ``InterruptProcessingException``)."""

    requested: Callable[[], bool]
    raise_if_requested: Callable[[], None]


NO_CANCEL = CancelHooks(lambda: False, lambda: None)


class WorkerStopped(RuntimeError):
    """A worker process exited (or was stopped) while the pipeline needed it."""


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker loads; travels to the child as JSON."""

    roots: tuple[str, ...]
    version: str
    mode: str
    device: str       # "cuda" (each worker takes cuda:LOCAL_RANK) or "cpu" (gloo processes, tests)
    dtype: str        # bf16, fp16 or fp32 (resolved on rank 0)
    parent: int       # the node's process: a worker whose parent is gone exits
    threads: int      # CPU: rank 0's torch threads, so every rank runs the same kernels


def local_ranks(device: str, world: int, visible: int) -> list[int]:
    """The GPU index of every rank: rank 0 keeps the node's GPU, the workers take the other visible
    GPUs in order. CPU processes: 0, 1, ... (unused)."""
    kind, _, index = device.partition(":")
    if kind != "cuda":
        return list(range(world))
    if index:
        first = int(index)
    else:
        import torch
        first = torch.cuda.current_device()
    others = [i for i in range(visible) if i != first]
    if len(others) < world - 1:
        raise ValueError(f"FlashVSR ⚡: gpus is {world}, but only {visible} GPUs are visible")
    return [first] + others[:world - 1]


class WorkerPool:
    """The worker processes of one parallel pipeline (ranks 1 .. world-1) and their logs."""

    def __init__(self, procs: dict[int, subprocess.Popen], world: int, logs: Path) -> None:
        self.procs, self.world, self.logs = procs, world, logs

    @classmethod
    def spawn(cls, spec: WorkerSpec, world: int, gpus: Sequence[int], port: int) -> "WorkerPool":
        """Start ranks 1 .. world-1; ``gpus``: their GPU indices (LOCAL_RANK)."""
        logs = Path(tempfile.mkdtemp(prefix="flashvsr-workers-"))
        procs: dict[int, subprocess.Popen] = {}
        command = [sys.executable, "-c", BOOTSTRAP, str(PACK_ROOT), PACKAGE, json.dumps(asdict(spec))]
        try:
            for rank, gpu in enumerate(gpus, start=1):
                env = rank_env(rank, world, port)
                env["LOCAL_RANK"] = str(gpu)      # torchrun's LOCAL_RANK picks the GPU (engine.parallel.join)
                with open(logs / f"worker{rank}.log", "wb") as out:
                    procs[rank] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                   stderr=subprocess.STDOUT)
        except BaseException:
            cls(procs, world, logs).stop()
            raise
        log.info("[FlashVSR] started %d GPU worker process%s (pids %s)", len(procs), "es" * (len(procs) != 1),
                 ", ".join(str(p.pid) for p in procs.values()))
        return cls(procs, world, logs)

    def first_dead(self) -> tuple[int, str] | None:
        """(rank, why) of the first worker that has exited, or None."""
        for rank, p in self.procs.items():
            code = p.poll()
            if code is not None:
                return rank, self._why(rank, code)
        return None

    def wait_dead(self, seconds: float) -> tuple[int, str] | None:
        """``first_dead``, giving a worker that is going down ``seconds`` to finish exiting."""
        deadline = time.monotonic() + seconds
        while True:
            dead = self.first_dead()
            if dead is not None or time.monotonic() >= deadline:
                return dead
            time.sleep(POLL_S)

    def stopped(self, dead: tuple[int, str]) -> WorkerStopped:
        """The node's error for a worker that stopped; its last output goes to the server log."""
        rank, why = dead
        tail = self.output(rank)[-LOG_TAIL_LINES:]
        if tail:
            log.warning("[FlashVSR] GPU worker %d's last output:\n%s", rank, "\n".join(tail))
        return WorkerStopped(f"FlashVSR ⚡: GPU worker {rank} of {self.world} stopped: {why}; the run was cancelled")

    def _why(self, rank: int, code: int) -> str:
        if code < 0:        # a signal: whatever it printed before is not why
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        lines = self.output(rank)
        return f"exit code {code} ({lines[-1].strip()[:300]})" if lines else f"exit code {code}"

    def output(self, rank: int) -> list[str]:
        """The worker's output lines (warnings and, when it failed, its traceback)."""
        try:
            return (self.logs / f"worker{rank}.log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return []

    def kill(self) -> None:
        """SIGKILL every running worker (they may be stuck: a stopped process ignores SIGTERM)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait ``grace_s`` for the released workers to exit, then SIGTERM (and SIGKILL) those still
        running; remove the logs."""
        deadline = time.monotonic() + grace_s
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        stop(list(self.procs.values()), TERM_GRACE_S)
        for rank, p in self.procs.items():
            if p.returncode not in (0, None, -signal.SIGTERM, -signal.SIGKILL):
                log.warning("[FlashVSR] GPU worker %d exited with code %s: %s", rank, p.returncode,
                            "\n".join(self.output(rank)[-LOG_TAIL_LINES:]))
        shutil.rmtree(self.logs, ignore_errors=True)


def start(roots: Sequence[str], version: str, mode: str, device: str, dtype: str, world: int, visible: int,
          on_download: Callable[[Any], None] | None = None, cancel: CancelHooks = NO_CANCEL) -> "ParallelPipeline":
    """Start ``world`` - 1 workers, join them as rank 0 on ``device`` and load the pipeline (rank 0
    downloads what is missing; the workers wait for it, then load the same files)."""
    import torch
    from ..flashvsr.devices import torch_dtype
    from ..flashvsr.engine.parallel import ParallelConfig
    from ..flashvsr.pipeline import FlashVSR
    kind = device.partition(":")[0]
    ranks = local_ranks(device, world, visible)
    if kind == "cuda":
        # A collective that times out must not end ComfyUI's process (torch's default tears it
        # down): abort the communicators and raise instead. Read when the process group is made.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    spec = WorkerSpec(tuple(roots), version, mode, kind, dtype, os.getpid(), torch.get_num_threads())
    port = free_port()
    pool = WorkerPool.spawn(spec, world, ranks[1:], port)
    group = None
    try:
        group = _join(ParallelConfig(0, world, ranks[0], init_method=f"tcp://127.0.0.1:{port}"), kind, pool, cancel)
        pipe = FlashVSR.from_pretrained(list(roots), mode=mode, version=version, device=kind,
                                        dtype=torch_dtype(dtype, device), download=True, progress=on_download,
                                        parallel=group)
    except BaseException:           # a Cancel, a failed download or load: no worker outlives it
        pool.kill()
        if group is not None:
            _leave(group)
        pool.stop()
        raise
    return ParallelPipeline(pipe, pool)


def _join(config, kind: str, pool: WorkerPool, cancel: CancelHooks):
    """Rank 0 joins the workers. The rendezvous waits for every worker, so it runs on a helper
    thread while this one watches the workers, Cancel and the clock; the helper also keeps
    ``join``'s ``torch.cuda.set_device`` away from ComfyUI's thread (its "current device")."""
    from ..flashvsr.engine.parallel import join
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["group"] = join(config, kind)
        except BaseException as err:     # handed to the waiting thread
            box["error"] = err

    helper = threading.Thread(target=run, name="flashvsr-join", daemon=True)
    helper.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    # Given up (a worker died, Cancel, timeout): the workers are stopped, and the helper's
    # rendezvous fails at the latest when its own timeout runs out; it holds nothing else.
    while helper.is_alive():
        helper.join(POLL_S)
        if not helper.is_alive():
            break
        dead = pool.first_dead()
        if dead is not None:
            raise pool.stopped(dead)
        if cancel.requested():
            cancel.raise_if_requested()
        if time.monotonic() > deadline:
            raise RuntimeError(f"FlashVSR ⚡: the GPU workers did not start within {START_TIMEOUT_S:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["group"]


def _leave(group) -> None:
    try:
        group.close()
    except Exception as err:       # the group is gone either way; the workers are stopped next
        log.warning("[FlashVSR] leaving the GPU workers' process group: %s", err)


def _abort_collectives(group) -> None:
    """Make rank 0's pending NCCL collectives fail now instead of waiting for peers that are gone.
    Over gloo (CPU) a collective fails at once when a peer exits."""
    if group.device.type != "cuda":
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group
        _abort_process_group()
    except Exception as err:
        log.warning("[FlashVSR] could not abort the GPU collectives: %s", err)


class _Watchdog:
    """Beside one run: stops the workers and aborts the collectives when a worker exits, or when a
    Cancel is not reached within ``grace_s``. ``dead`` / ``cancelled`` say what happened."""

    def __init__(self, pool: WorkerPool, group, cancel: CancelHooks, grace_s: float) -> None:
        self.pool, self.group, self.cancel, self.grace_s = pool, group, cancel, grace_s
        self.dead: tuple[int, str] | None = None
        self.cancelled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="flashvsr-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        since = None
        while not self._done.wait(POLL_S):
            self.dead = self.pool.first_dead()
            if self.dead is None and self.cancel.requested():
                since = since or time.monotonic()
                self.cancelled = time.monotonic() - since > self.grace_s
            else:
                since = None
            if self.dead is not None or self.cancelled:
                self.pool.kill()
                _abort_collectives(self.group)
                return


class ParallelPipeline:
    """Rank 0's pipeline with its workers, in the model cache's hands like a ``FlashVSR``."""

    cancel_grace_s = CANCEL_GRACE_S

    def __init__(self, pipe, pool: WorkerPool) -> None:
        self.pipe, self.pool = pipe, pool
        self.broken = ""           # why the workers cannot serve another run

    @property
    def world(self) -> int:
        return self.pool.world

    def unusable(self) -> str | None:
        """Why this pipeline cannot run again (the cache then starts fresh workers), or None."""
        if self.broken:
            return self.broken
        if self.pipe.parallel.failed:
            return f"the GPU processes are out of step ({self.pipe.parallel.failed})"
        dead = self.pool.first_dead()
        if dead is not None:
            return f"GPU worker {dead[0]} of {self.world} had stopped: {dead[1]}"
        return None

    def upscale(self, frames, config=None, on_progress=None, cancel: CancelHooks = NO_CANCEL):
        """``FlashVSR.upscale`` over the workers; ``cancel`` is this run's Cancel (see ``_Watchdog``)."""
        dead = self.pool.first_dead()
        if dead is not None:           # e.g. a worker that could not load its weights
            self.broken = "a GPU worker stopped"
            raise self.pool.stopped(dead)
        failure = None
        with _Watchdog(self.pool, self.pipe.parallel, cancel, self.cancel_grace_s) as watch:
            try:
                return self.pipe.upscale(frames, config, on_progress=on_progress)
            except BaseException as err:
                failure = err
        if watch.cancelled:
            self.broken = "the GPU workers were stopped after a Cancel"
            cancel.raise_if_requested()             # the host's own "cancelled"
            raise failure
        # A failure inside a chunk (a worker gone, gloo/NCCL errors) leaves the processes out of step;
        # one between chunks (Cancel from on_progress, bad frames) leaves them ready for the next run.
        dead = watch.dead or (self.pool.wait_dead(DEAD_WAIT_S) if self.pipe.parallel.failed else self.pool.first_dead())
        if dead is not None:
            self.broken = "a GPU worker stopped"
            raise self.pool.stopped(dead) from None
        raise failure

    def switch_mode(self, mode, roots=(), download: bool = True) -> bool:
        """Only rank 0 decodes: the workers, which run only the DiT, stay as they are."""
        return self.pipe.switch_mode(mode, roots, download=download)

    def unload(self) -> None:
        """Release the workers (their ``serve`` returns), leave the group, free rank 0's weights."""
        if self.unusable():
            self.pool.kill()           # gone, stuck or out of step: they could not take "exit"
        _leave(self.pipe.parallel)
        self.pool.stop()
        self.pipe.unload()


def worker_main(spec_json: str) -> int:
    """A worker process: load the weights of ``spec_json`` (a WorkerSpec) and serve rank 0."""
    spec = WorkerSpec(**json.loads(spec_json))
    rank = os.environ.get("RANK", "?")
    logging.basicConfig(level=logging.WARNING, format=f"FlashVSR GPU worker {rank}: %(levelname)s: %(message)s")
    _exit_with_parent(spec.parent)
    import torch
    from ..flashvsr.devices import torch_dtype
    from ..flashvsr.engine.parallel import ParallelConfig
    from ..flashvsr.pipeline import FlashVSR
    if spec.device == "cpu":
        torch.set_num_threads(spec.threads)
    pipe = FlashVSR.from_pretrained(list(spec.roots), mode=spec.mode, version=spec.version, device=spec.device,
                                    dtype=torch_dtype(spec.dtype, spec.device), download=False,
                                    parallel=ParallelConfig.from_env())
    try:
        pipe.serve()
    finally:
        pipe.close()
    return 0


def _exit_with_parent(parent: int) -> None:
    """End this worker when the node's process is gone (ComfyUI killed): nothing else would."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="flashvsr-parent-watch", daemon=True).start()
