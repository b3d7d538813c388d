"""One video on several processes (GPUs): the process group, the control messages, the workers' loop.

Rank 0 is the pipeline everybody knows: it reads the frames, upsamples them, runs the colour fix,
and writes. For the DiT of every chunk it embeds the tokens, hands each rank its windows and gets
the head's output back (``ParallelDiT``); the blocks run on all ranks at once
(``models/sequence_parallel.py``). The LQ projector and the decoder run on every rank's band of
rows (``parallel_bands.py``). The other ranks answer rank 0's messages (``serve``).

Control messages go through the rendezvous store (torch.distributed's key-value store), never
through the GPUs' collectives: rank 0 never waits for a worker to read one, and a worker waiting
for the next run holds no GPU stream. The tensors go through the process group (NCCL on CUDA,
gloo on the CPU).

Launch: ``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
(``ParallelConfig.from_env``); ``flashvsr upscale --gpus N`` sets the same variables for N children
(``flashvsr/cli/launch.py``).
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
from dataclasses import dataclass

import torch

from ...models.dit import DiTConstants, DiTStreamState, SparseParams, WanDiT
from ...models.dit_ops import BlockSteps
from ...models.lcsa import WINDOW

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# A worker waiting for the next message wakes up this often only to wait again (a store wait needs
# a timeout); an idle worker costs nothing, so it is long.
IDLE_WAIT = datetime.timedelta(hours=1)
STORE_PREFIX = "flashvsr/control"


@dataclass(frozen=True)
class ParallelConfig:
    """Where this process stands in a run over several processes (torchrun's variables).

    ``init_method``: torch.distributed's rendezvous, "env://" (MASTER_ADDR, MASTER_PORT) or
    "file:///path" (one machine, tests). ``local_rank`` picks the GPU (cuda:local_rank).
    """
    rank: int
    world: int
    local_rank: int = 0
    init_method: str = "env://"
    timeout_s: float = 1800.0      # a collective waiting longer than this fails (torch's default)
    # Rank 0's share of the DiT's windows relative to another rank's: below 1 leaves it time for the
    # LQ upsampling, the embedding and the colour fix, which only it runs (sequence_parallel.window_split;
    # the projector's and decoder's bands stay even). Rank 0's value is the one every rank uses.
    rank0_share: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, {self.world}), got {self.rank}")
        if not 0.0 <= self.rank0_share <= 1.0:
            raise ValueError(f"rank0_share must be in [0, 1], got {self.rank0_share}")

    @classmethod
    def from_env(cls, environ=None, rank0_share: float = 1.0) -> "ParallelConfig | None":
        """The config torchrun's variables describe, or None for a run of one process."""
        env = os.environ if environ is None else environ
        if int(env.get("WORLD_SIZE", "1")) <= 1:
            return None
        missing = [k for k in ENV_VARS if k not in env]
        if missing:
            raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start the processes "
                             "with torchrun or `flashvsr ... --gpus N`")
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), rank0_share=rank0_share)


class ProcessGroup:
    """This process's place in a joined group: rank, world, device, and the control messages."""

    def __init__(self, config: ParallelConfig, device: torch.device, store, group=None) -> None:
        self.config, self.device = config, device
        self.rank, self.world = config.rank, config.world
        self.group = group
        self._store = store
        self._sent = 0          # rank 0: messages sent; others: messages read
        self.closed = False
        self.failed = ""        # why the ranks may be out of step (a run stopped inside a chunk)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def send(self, message: tuple) -> None:
        """Rank 0: post a control message for every worker (no waiting)."""
        self._store.set(str(self._sent), pickle.dumps(message))
        self._sent += 1

    def receive(self) -> tuple:
        """A worker: the next control message, waiting as long as it takes."""
        key = str(self._sent)
        while True:
            try:
                self._store.wait([key], IDLE_WAIT)
                break
            except torch.distributed.DistStoreError:       # the wait's timeout; other errors end the worker
                continue
        message = pickle.loads(self._store.get(key))
        self._sent += 1
        return message

    def expect(self, kind: str) -> None:
        """A worker: wait for rank 0's message ``kind`` (a step every rank passes in order)."""
        message = self.receive()
        if message[0] != kind:
            raise RuntimeError(f"process {self.rank} expected {kind!r} from rank 0, got {message[0]!r}")

    def end_run(self) -> None:
        """Rank 0, after a run: the workers may drop its state (KV rings)."""
        if self.is_main and not self.closed:
            self.send(("end",))

    def release(self) -> None:
        """Rank 0: every worker's ``serve`` returns (the group stays joined)."""
        if self.is_main and not self.closed:
            self.send(("exit",))

    def close(self) -> None:
        """Rank 0 releases the workers; every rank leaves the process group."""
        if self.closed:
            return
        self.release()
        self.closed = True
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def join(config: ParallelConfig, device: "str | torch.device") -> ProcessGroup:
    """Join the group: ``device`` "cuda" means this rank's GPU (cuda:local_rank) and NCCL, "cpu" gloo."""
    import torch.distributed as dist
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"device {device} with several processes: each process takes the GPU of its "
                             "LOCAL_RANK; choose the GPUs with CUDA_VISIBLE_DEVICES and pass --device cuda")
        count = torch.cuda.device_count()
        if config.local_rank >= count:
            raise ValueError(f"process {config.rank} wants GPU {config.local_rank}, but {count} "
                             f"{'is' if count == 1 else 'are'} visible: start at most {count} processes per machine")
        device = torch.device("cuda", config.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ValueError(f"several processes need CUDA GPUs (or the CPU, for tests); got device {device}")
    timeout = datetime.timedelta(seconds=config.timeout_s)
    store, _, _ = next(dist.rendezvous(config.init_method, config.rank, config.world, timeout=timeout))
    dist.init_process_group(backend, store=dist.PrefixStore("flashvsr/pg", store), rank=config.rank,
                            world_size=config.world, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    log.info("process %d of %d joined (%s on %s)", config.rank, config.world, backend, device)
    return ProcessGroup(config, device, dist.PrefixStore(STORE_PREFIX, store))


@dataclass(frozen=True)
class RunOptions:
    """What a worker needs to run the DiT of one run (one tile) like rank 0."""
    sparse: SparseParams
    sageattention: str
    compile: bool
    rank0_share: float


class ParallelDiT:
    """Rank 0's DiT over all ranks, in ``WanDiT.forward_chunk``'s place (``EngineModels.dit``)."""

    def __init__(self, dit: WanDiT, group: ProcessGroup, exchange, sageattention: str, compile: bool) -> None:
        self.dit, self.group, self.exchange = dit, group, exchange
        self.sageattention, self.compile = sageattention, compile

    def forward_chunk(self, latents, lq_tokens, consts: DiTConstants, state: DiTStreamState,
                      sparse: SparseParams, attn, steps: BlockSteps | None = None) -> torch.Tensor:
        if self.group.failed:
            raise RuntimeError(f"the processes of this run are out of step since an earlier failure "
                               f"({self.group.failed}); start them again")
        dit = self.dit
        if state.chunk_index == 0:          # a new run (or tile): the workers start fresh state
            self.group.send(("begin", RunOptions(sparse, self.sageattention, self.compile, self.exchange.rank0_share)))
        x, grid = dit.embed(latents, lq_tokens, state)
        self.group.send(("chunk", grid))
        windows = _windows(grid)
        try:
            x = self.exchange.scatter(x, windows, x.shape[-1], x.dtype, x.device)
            y = dit.forward_tokens(x, grid, consts, state, sparse, attn, steps, self.exchange)
            return dit.denoised(latents, self.exchange.gather(y, windows), grid, state)
        except BaseException as err:
            # Stopped between two collectives (a worker died, Ctrl-C): the workers may still wait
            # inside one, so no later run can line up with them.
            self.group.failed = f"{type(err).__name__}: {err}"
            raise


def _windows(grid: tuple[int, int, int]) -> int:
    f, h, w = grid
    return (f // WINDOW[0]) * (h // WINDOW[1]) * (w // WINDOW[2])


def serve(group: ProcessGroup, dit: WanDiT, consts: DiTConstants, exchange, session, steps_for,
          bands=None) -> None:
    """A worker's loop: run the DiT's blocks of every chunk rank 0 announces, until rank 0 closes.

    ``session(mode)``: a new attention session; ``steps_for(compile)``: the block steps rank 0 uses;
    ``bands``: the worker's projector and decoder bands (``parallel_bands.BandWorker``), which
    answer the ``project`` and ``decode`` messages.
    """
    state = run = attn = steps = None
    dtype = dit.patch_embedding.weight.dtype
    while True:
        message = group.receive()
        kind = message[0]
        if kind == "exit":
            return
        if kind == "begin":
            run = message[1]
            state, attn, steps = DiTStreamState(), session(run.sageattention), steps_for(run.compile)
            exchange.rank0_share = run.rank0_share
        elif kind in ("project", "decode") and bands is not None:
            bands.handle(message)
        elif kind == "end":
            state = attn = None
            if bands is not None:
                bands.reset()
            if group.device.type == "cuda":
                torch.cuda.empty_cache()
        elif kind == "chunk":
            grid = message[1]
            windows = _windows(grid)
            with torch.no_grad():
                x = exchange.scatter(None, windows, dit.cfg.dim, dtype, group.device)
                y = dit.forward_tokens(x, grid, consts, state, run.sparse, attn, steps, exchange)
                exchange.gather(y, windows)
        else:
            raise RuntimeError(f"unknown control message {kind!r} from rank 0")
