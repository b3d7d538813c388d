"""torch.compile with a safety net: compiled when it works, the eager function when it does not."""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def triton_usable() -> bool:
    """Inductor's GPU code generator needs Triton; a missing or broken one only costs speed."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        log.info("[FlashVSR] torch.compile is off: triton unavailable (%s: %s)", type(exc).__name__, exc)
        return False
    return True


def compile_with_fallback(fn, what: str, **options):
    return CompiledWithFallback(what, torch.compile(fn, dynamic=False, **options), fn)


class CompiledWithFallback:
    """Compiled first; if compiling or running the compiled graph fails, the eager function from then on.

    Only pure functions are wrapped, so retrying the same call eagerly is exact. Out-of-memory is not a
    compile problem and propagates.
    """

    def __init__(self, what: str, compiled, eager):
        self.what, self.compiled, self.eager, self.failed = what, compiled, eager, False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:
                self.failed = True
                log.warning("[FlashVSR] torch.compile failed for %s, running it eagerly: %s: %s",
                            self.what, type(exc).__name__, exc)
        return self.eager(*args)
