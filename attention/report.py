"""Per-run record of what attention ran: calls and seconds per (operation, backend), and why
SageAttention was not used when it was asked for.

Timing without a host sync per call: on CUDA each call records a pair of CUDA events on the current
stream (asynchronous); pairs are turned into seconds only when they have already completed (checked
with a non-blocking query once 256 are pending) or when ``as_dict`` / ``summary`` is called, which
waits for the outstanding ones. Under CUDA graph capture calls are counted but not timed. On the CPU
work is synchronous and a wall clock is used.
"""
from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import torch

_FOLD_AT = 256


class _Tally:
    __slots__ = ("calls", "seconds", "pending")

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.pending: deque = deque()

    def fold(self, wait: bool) -> None:
        # Events on one stream complete in order, so stop at the first unfinished pair.
        while self.pending:
            start, end = self.pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self.seconds += start.elapsed_time(end) / 1000.0
            self.pending.popleft()


class RunReport:
    def __init__(self, time_calls: bool = True) -> None:
        self._time_calls = time_calls
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._sage_reasons: dict[str, dict[str, int]] = {}     # op -> reason -> calls

    @contextmanager
    def record(self, op: str, backend: str, device: torch.device) -> Iterator[None]:
        """Count (and time) the body as one call of ``backend`` for ``op``. Only counts finished calls."""
        tally = self._tallies.setdefault((op, backend), _Tally())
        if not self._time_calls:
            yield
        elif device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            tally.pending.append((start, end))
            if len(tally.pending) >= _FOLD_AT:
                tally.fold(wait=False)
        elif device.type == "cuda":
            yield
        else:
            t0 = time.perf_counter()
            yield
            tally.seconds += time.perf_counter() - t0
        tally.calls += 1

    def sage_not_used(self, op: str, reason: str) -> None:
        reasons = self._sage_reasons.setdefault(op, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def as_dict(self) -> dict:
        """{"calls": {"dense/sage": {"calls": n, "seconds": s}, ...}, "sage_not_used": {op: {reason: n}}}.

        Waits for the outstanding CUDA events of this run.
        """
        calls = {}
        for (op, backend), tally in self._tallies.items():
            tally.fold(wait=True)
            if tally.calls:
                calls[f"{op}/{backend}"] = {"calls": tally.calls, "seconds": tally.seconds}
        return {"calls": calls, "sage_not_used": {op: dict(r) for op, r in self._sage_reasons.items()}}

    def backends(self, op: str) -> list[str]:
        """Backends that ran ``op``, most calls first."""
        ran = [(t.calls, b) for (o, b), t in self._tallies.items() if o == op and t.calls]
        return [b for _, b in sorted(ran, key=lambda x: -x[0])]

    def summary(self) -> str:
        """One line, e.g. ``attention: sage (dense) / triton (sparse)``, with the reason SageAttention
        was not used where it was asked for."""
        parts = []
        for op, label in (("dense", "dense"), ("block_sparse", "sparse")):
            ran = self.backends(op)
            if ran:
                parts.append(f"{'+'.join(ran)} ({label})")
        line = "attention: " + (" / ".join(parts) if parts else "no calls")
        reasons = sorted({r for per_op in self._sage_reasons.values() for r in per_op})
        if reasons:
            line += "; sage not used: " + "; ".join(reasons)
        return line
