"""``--gpus N``: start N processes of the same command, one per GPU, as torchrun would.

Each child runs ``python -m comfyui_flashvsr <the same arguments>`` with torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT), so a child cannot tell this
launcher from ``torchrun --nproc-per-node N``; torch.distributed's rendezvous does the rest.
This process only waits: when a child fails, the others are stopped (SIGTERM, then SIGKILL after
``GRACE_S``), and ``cleanup`` removes what a killed rank 0 left (its partial output).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Sequence

log = logging.getLogger(__name__)

PACKAGE = __name__.split(".")[0]     # comfyui_flashvsr once installed
GRACE_S = 10.0                       # SIGTERM lets rank 0 remove its partial output; then SIGKILL
POLL_S = 0.1


def parallel_config(gpus: int, rank0_share: float = 1.0):
    """This process's ``ParallelConfig`` when torchrun or ``--gpus`` started it, else None (one
    process, or the launcher of ``gpus`` processes)."""
    from ..engine.parallel import ParallelConfig
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    parallel = ParallelConfig.from_env(rank0_share=rank0_share)
    if parallel is not None and gpus not in (1, parallel.world):
        raise ValueError(f"--gpus {gpus} under a launcher of {parallel.world} processes (torchrun "
                         f"--nproc-per-node): leave --gpus out, the launcher decides")
    if parallel is not None:
        refuse_unsplittable(parallel.world)
    return parallel


def refuse_unsplittable(world: int) -> None:
    """Refuse a process count the official DiT's heads do not split over, before any weights load
    (the pipeline checks the loaded DiT's own head count again)."""
    from ...models.dit import DiTConfig
    from ...models.sequence_parallel import check_heads
    check_heads(DiTConfig.num_heads, world)


def without_gpus(argv: Sequence[str]) -> list[str]:
    """``argv`` less its ``--gpus N`` / ``--gpus=N``: the children are one process each."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--gpus":
            skip = True
        elif not arg.startswith("--gpus="):
            out.append(arg)
    return out


def free_port() -> int:
    """A TCP port nobody listens on now, for rank 0's rendezvous store (as torchrun --standalone picks one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, base: "dict[str, str] | None" = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def launch(argv: Sequence[str], world: int, cleanup: Callable[[], None] | None = None) -> int:
    """Run ``flashvsr <argv>`` as ``world`` ranks on this machine; the exit code of the run.
    A count the official DiT's heads do not split over is refused before any process starts (the
    ranks would otherwise each load the weights first)."""
    refuse_unsplittable(world)
    command = [sys.executable, "-m", PACKAGE, *without_gpus(argv)]
    port = free_port()
    log.info("starting %d processes (one per GPU); rank 0 reads and writes", world)
    return supervise([subprocess.Popen(command, env=rank_env(r, world, port)) for r in range(world)], cleanup)


def supervise(procs: list[subprocess.Popen], cleanup: Callable[[], None] | None = None,
              grace_s: float = GRACE_S) -> int:
    """Wait for every rank. The first failure stops the others and is the result (rank 0's own
    code when it failed: its message is the one the user needs); Ctrl-C stops all and gives 130."""
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first = 0 if 0 in failed else failed[0]
                if first != 0:
                    log.error("process %d stopped with exit code %d; stopping the others", first, codes[first])
                stop(procs, grace_s)
                return codes[first] if codes[first] > 0 else 1
            if all(c == 0 for c in codes):
                return 0
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        stop(procs, grace_s)      # from a terminal they had the Ctrl-C too; this covers SIGTERM and the rest
        return 130
    finally:
        if cleanup is not None and any(p.returncode not in (None, 0) for p in procs):
            cleanup()


def stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every running rank (rank 0 then removes its partial output), SIGKILL those still running."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
