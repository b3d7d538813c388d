"""The attention dispatcher (one per loaded pipeline) and its per-run sessions.

Dense attention (cross-attention, any unmasked call): SageAttention when the session's mode is
``enable`` and the call is eligible (``sage.py``), else SDPA.
Block-sparse attention (LCSA), on CUDA in ``AttentionConfig.sparse_backends`` order: FlashAttention-4
where installed and eligible (``fa4.py``), our Triton kernels, compiled flex_attention, the pure-PyTorch
paths of ``gathered.py`` (paged varlen, gathered blocks through varlen, gathered blocks through
SDPA), the masked-SDPA reference; on other devices the gathered path,
then the reference. A backend that raises is skipped for that (device, dtype, shape) from then on,
logged once.
Block-mask bookkeeping (the draft threshold, the LUT, the kernels' launch order): on CUDA the
Triton kernels of ``mask_kernels.py`` where they work, else the torch code; the results are equal.

The mode travels in the session object, never in a module global, so two pipelines with different
modes can run one after the other in one process.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .block_sparse import (BLOCK, REFERENCE_MASK_BUDGET, CompiledFlex, Int8Tiles, QuantizedKeys, QuantizedValues,
                           build_lut, check_block_sparse_inputs, masked_reference, quantize_tiles_reference,
                           quantize_value_tiles_reference)
from .compile_guard import opaque_to_compile
from .fa4 import SPARSE_ARCHS as FA4_ARCHS, FA4Probe, fa4_block_sparse, fa4_refusal, probe_fa4
from .gathered import (GATHER_BUDGET_BYTES, gathered_attention, paged_attention, paged_refusal,
                       varlen_refusal)
from .probe import SageProbe, probe_sage, probe_triton
from .report import RunReport
from ..flashvsr.config import SAGE_CHOICES, SageAttention
from .sage import HALF_DTYPES, DenseCall, run_sage, sage_refusal

LOG = logging.getLogger(__name__)
MODES = SAGE_CHOICES  # the sageattention choices, defined once in flashvsr/config.py
# "gather-varlen" and "gather" are one path with two kernels: a build without the flash varlen kernel
# (it raises) then still gets the gathered path, not the reference.
SPARSE_BACKENDS = ("fa4", "triton", "flex", "paged", "gather-varlen", "gather", "reference")
PORTABLE_BACKENDS = ("gather", "reference")          # the ones that run on any device
SLOWER_HERE = "SageAttention 1.x is slower than SDPA on Hopper GPUs (H100: 0.38x), so SDPA runs the dense calls"


@dataclass(frozen=True)
class AttentionConfig:
    # CUDA order of block-sparse backends; "reference" must come last because it never refuses.
    sparse_backends: tuple = SPARSE_BACKENDS
    # Use the INT8-QK Triton kernel for block-sparse attention when the mode is "enable" (and keep
    # the DiT's cached keys as int8 for it). None: on Hopper only, where it beats our bf16 kernel,
    # and only where FA4 does not serve the call (FA4 bf16 beats it too; docs/benchmarks.md).
    sparse_int8_with_sage: Optional[bool] = None
    # Run SageAttention for dense calls also where it is known to be slower than SDPA (1.x on
    # Hopper, in kernel and host time; docs/benchmarks.md). Off: there ``enable`` takes SDPA for the
    # dense calls, says so, and keeps its sparse choice, so the setting never costs speed.
    dense_sage_where_slower: bool = False
    time_calls: bool = True
    reference_mask_budget: int = REFERENCE_MASK_BUDGET
    # On CUDA with Triton, the draft threshold/mask and the block LUT come from mask_kernels.py:
    # the same values as the torch code, in one kernel each instead of a sort and a handful.
    triton_masks: bool = True
    # Gathered key + value bytes the pure-PyTorch block-sparse path holds at once.
    gather_budget_bytes: int = GATHER_BUDGET_BYTES

    def __post_init__(self) -> None:
        unknown = [b for b in self.sparse_backends if b not in SPARSE_BACKENDS]
        if unknown or not self.sparse_backends or self.sparse_backends[-1] != "reference":
            raise ValueError(f"sparse_backends must be drawn from {SPARSE_BACKENDS} and end with "
                             f"'reference'; got {self.sparse_backends}")


class AttentionSession:
    """One run's view of the dispatcher: the user's mode plus the record of what ran."""

    def __init__(self, dispatcher: "AttentionDispatcher", mode: str, int8_values: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"sageattention mode must be one of {MODES}, got {mode!r}")
        self.dispatcher = dispatcher
        self.mode = mode
        self.int8_values = int8_values     # UpscaleConfig.kv_int8_values: the KV cache's values in int8 too
        self.int8_values_kept = False      # whether a KV ring of this run took them (value_rows said yes)
        self._report = RunReport(time_calls=dispatcher.config.time_calls)
        self.dense = opaque_to_compile(self._dense)
        self.block_sparse = opaque_to_compile(self._block_sparse)
        self.select_blocks = opaque_to_compile(self.dispatcher.select_blocks)

    def _dense(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, H, Lq, D), k/v (B, H, Lk, D) -> (B, H, Lq, D). Never modifies k or v."""
        return self.dispatcher.run_dense(self._report, self.mode, q, k, v)

    def _block_sparse(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      block_mask: torch.Tensor, key_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
        """block_mask (B, H, Lq/128, Lk/128) bool; head h uses block_mask[:, h]; empty query blocks -> 0.

        ``key_mean`` (B, H, D), optional: the keys' mean, if the caller has it for free; the INT8
        kernel subtracts it before quantising K (any vector gives the same softmax). ``k`` may be a
        ``QuantizedKeys`` (int8 keys of a KV cache, see ``key_rows``) and ``v`` a ``QuantizedValues``
        (see ``value_rows``); backends that need real keys or values dequantise them.
        """
        return self.dispatcher.run_block_sparse(self._report, self.mode, q, k, v, block_mask, key_mean)

    def key_rows(self, keys: torch.Tensor) -> Optional[int]:
        """Keys per int8 scale if this run's block-sparse calls take int8 keys like ``keys`` (see the dispatcher)."""
        return self.dispatcher.key_rows(self.mode, keys)

    def quantize_keys(self, keys: torch.Tensor, shift: torch.Tensor, rows: int, out) -> None:
        self.dispatcher.quantize_keys(keys, shift, rows, out)

    def value_rows(self, values: torch.Tensor) -> Optional[int]:
        """Values per int8 scale if this run keeps the KV cache's values in int8 (asked for, and the
        INT8 kernel runs here), else None (the reason, when asked for, is logged once)."""
        rows = self.dispatcher.value_rows(self.mode, self.int8_values, values)
        self.int8_values_kept = self.int8_values_kept or rows is not None
        return rows

    def quantize_values(self, values: torch.Tensor, rows: int, out) -> None:
        self.dispatcher.quantize_values(values, rows, out)

    def summary(self) -> str:
        line = self._report.summary()
        if self.int8_values_kept:
            line += "; KV cache values in int8"
        slow = self.dispatcher.sage_slower_than_sdpa()
        if slow and "sage" in self._report.backends("dense"):
            line += f"; note: {slow}"
        return line

    def report(self) -> dict:
        out = self._report.as_dict()
        out["mode"] = self.mode
        out["int8_values"] = {"asked": self.int8_values, "kept": self.int8_values_kept}
        if self.mode == SageAttention.ENABLE:
            out["sage"] = self.dispatcher.sage.describe()
        return out


class AttentionDispatcher:
    """Owns what outlives a run: the probes, the negative cache, the log-once set, compiled flex."""

    def __init__(self, config: AttentionConfig = AttentionConfig(), *, sage: Optional[SageProbe] = None,
                 fa4: Optional[FA4Probe] = None, log: logging.Logger = LOG) -> None:
        self.config = config
        self._sage = sage
        self._fa4 = fa4
        self._log = log
        self._failed: set = set()                 # (sparse backend, signature), ("mask", kernel) that raised
        self._sage_failures: dict = {}            # DenseCall.signature -> reason
        self._said: set = set()
        self._capabilities: dict = {}
        self._flex = CompiledFlex()
        self._without_fa4: Optional["AttentionDispatcher"] = None
        # name -> (refusal(q, k, v, mode) -> reason or None,
        #          run(q, k, v, lut, counts, mode, key_mean) -> out)
        self.sparse_runners: dict[str, tuple[Callable, Callable]] = {
            "fa4": (self._fa4_refusal, self._run_fa4),
            "triton": (self._triton_refusal, self._run_triton),
            "flex": (self._flex_refusal, self._run_flex),
            "paged": (lambda q, k, v, mode: paged_refusal(q), self._run_paged),
            "gather-varlen": (lambda q, k, v, mode: varlen_refusal(q), self._run_gather_varlen),
            "gather": (lambda q, k, v, mode: None, self._run_gather),
        }

    def session(self, mode: str = SageAttention.ENABLE.value, int8_values: bool = False) -> AttentionSession:
        return AttentionSession(self, mode, int8_values)

    def without_fa4(self) -> "AttentionDispatcher":
        """This dispatcher with FA4 set aside (same probes, same log; made once): where FA4 would
        serve, ``enable`` then runs the INT8 kernel and its int8 KV cache, which a run planner picks
        when only that cache fits (flashvsr/engine/memory.py, ``plan_run``)."""
        if "fa4" not in self.config.sparse_backends:
            return self
        if self._without_fa4 is None:
            order = tuple(b for b in self.config.sparse_backends if b != "fa4")
            self._without_fa4 = AttentionDispatcher(replace(self.config, sparse_backends=order),
                                                    sage=self._sage, fa4=self._fa4, log=self._log)
            self._without_fa4._capabilities = self._capabilities
        return self._without_fa4

    @property
    def fa4(self) -> FA4Probe:
        if self._fa4 is None:
            self._fa4 = probe_fa4()
        return self._fa4

    @property
    def sage(self) -> SageProbe:
        if self._sage is None:
            self._sage = probe_sage()
        return self._sage

    def capability(self, device: torch.device) -> Optional[tuple[int, int]]:
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._capabilities:
            self._capabilities[index] = tuple(torch.cuda.get_device_capability(index))
        return self._capabilities[index]

    @property
    def failures(self) -> frozenset:
        """What raised so far and is not tried again: (sparse backend, signature), ("mask", kernel),
        ("quantize", "keys")."""
        return frozenset(self._failed)

    def sage_slower_than_sdpa(self) -> Optional[str]:
        """Why ``enable`` costs speed on this machine, or None (issue #6: never slower unannounced).

        SageAttention 1.x is a Triton kernel; on Hopper SDPA runs cuDNN/FA3-class kernels and wins
        (docs/benchmarks.md, FlashVSR's cross-attention on an H100).
        """
        if self.sage.available and self.sage.flavour == "1.x" and any(c[0] == 9 for c in self._capabilities.values()):
            return ("SageAttention 1.x is slower than PyTorch SDPA on Hopper GPUs (H100 measured 0.38x "
                    "on FlashVSR's cross-attention)")
        return None

    def say_once(self, level: int, key: tuple, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._log.log(level, message)

    # ---- dense -------------------------------------------------------------------------------

    def dense_call(self, q, k, v) -> DenseCall:
        return DenseCall.of(q, k, v, self.capability(q.device))

    def run_dense(self, report: RunReport, mode: str, q, k, v) -> torch.Tensor:
        if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"dense attention needs q (B, H, Lq, D) and k, v (B, H, Lk, D); got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if mode == SageAttention.ENABLE:
            why = self._try_sage_reason(q, k, v)
            if why is None:
                try:
                    with report.record("dense", "sage", q.device):
                        return run_sage(self.sage, q, k, v)
                except torch.cuda.OutOfMemoryError:
                    # Memory depends on the moment, not on the call's shape: retry sage next time.
                    torch.cuda.empty_cache()
                    why = "sage ran out of GPU memory on this call"
                except Exception as exc:
                    why = f"sage raised {type(exc).__name__}: {exc}"
                    self._sage_failures[self.dense_call(q, k, v).signature(self.sage)] = why
            report.sage_not_used("dense", why)
            # Off CUDA there is nothing to fix (SageAttention is CUDA-only) and the run summary
            # names the reason: a warning on every CPU run would only be noise.
            expected = why == SLOWER_HERE or self.dense_call(q, k, v).device_type != "cuda"
            self.say_once(logging.INFO if expected else logging.WARNING, ("sage", why),
                          f"SageAttention was requested but dense attention uses SDPA: {why}")
        with report.record("dense", "sdpa", q.device):
            return F.scaled_dot_product_attention(q, k, v)

    def _try_sage_reason(self, q, k, v) -> Optional[str]:
        probe = self.sage
        call = self.dense_call(q, k, v)
        why = sage_refusal(probe, call)
        if (why is None and not self.config.dense_sage_where_slower and probe.flavour == "1.x"
                and call.capability is not None and call.capability[0] == 9):
            why = SLOWER_HERE
        if why is None:
            # A failure repeats for the same flavour, GPU, dtype and head dim: keep its first reason.
            why = self._sage_failures.get(call.signature(probe))
        if why is None:
            self.say_once(logging.INFO, ("sage", "used"), f"dense attention: {probe.describe()}")
        return why

    # ---- block-sparse ------------------------------------------------------------------------

    def sparse_order(self, device: torch.device) -> tuple:
        order = self.config.sparse_backends
        return order if device.type == "cuda" else tuple(b for b in order if b in PORTABLE_BACKENDS)

    def run_block_sparse(self, report: RunReport, mode: str, q, k, v, block_mask, key_mean=None) -> torch.Tensor:
        quantized = isinstance(k, QuantizedKeys)
        # int8 values stand for values of their shape and own dtype (QuantizedValues.like, no memory);
        # int8 keys for keys of v's shape and of their own dtype: v stands in for them in checks
        v_like = v.like() if isinstance(v, QuantizedValues) else v
        k_like = v_like if quantized else k
        check_block_sparse_inputs(q, k_like, v_like, block_mask)
        lut, counts = self.block_lut(block_mask)
        signature = (q.device, q.dtype, tuple(q.shape), tuple(k.shape), quantized, isinstance(v, QuantizedValues))
        for name in self.sparse_order(q.device):
            if name == "reference":
                break
            refusal, run = self.sparse_runners[name]
            why = refusal(q, k_like, v_like, mode)
            if why is not None:
                self.say_once(logging.INFO, (name, why), f"block-sparse backend {name} not used: {why}")
                continue
            if (name, signature) in self._failed:
                continue
            try:
                label = self._sparse_label(name, mode, q.device)
                with report.record("block_sparse", label, q.device):
                    return run(q, k, v, lut, counts, mode, key_mean)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                self.say_once(logging.WARNING, (name, "oom"),
                              f"block-sparse backend {name} ran out of GPU memory; trying the next one")
            except Exception as exc:
                self._failed.add((name, signature))
                self.say_once(logging.WARNING, (name, signature),
                              f"block-sparse backend {name} failed for q {tuple(q.shape)} k {tuple(k.shape)} "
                              f"{q.dtype}: {type(exc).__name__}: {exc}; using the next backend for this shape")
        with report.record("block_sparse", "reference", q.device):
            return masked_reference(q, _plain(k), _plain(v), block_mask, mask_budget=self.config.reference_mask_budget)

    def key_rows(self, mode: str, keys: torch.Tensor) -> Optional[int]:
        """Keys per int8 scale when this mode's block-sparse calls take int8 keys like ``keys`` (a KV
        cache can then be kept quantised: half the memory, each key quantised once), else None."""
        if not self.uses_int8(mode, keys.device, keys.dtype) or not probe_triton().available:
            return None
        device = keys.device
        from . import triton_kernels as tk
        return tk.default_config(self.capability(device) or (0, 0), int8=True).block_n

    def value_rows(self, mode: str, asked: bool, values: torch.Tensor) -> Optional[int]:
        """Values per int8 scale when the KV cache's values are asked for in int8 and this mode's
        block-sparse calls run the INT8 kernel (the only one that reads int8 values), else None.

        Elsewhere the option is ignored, not refused, with the reason logged once: int8 values only
        save memory beside the INT8 kernel (any other backend would dequantise every value of the
        cache per call), and a setting whose effect depends on the GPU found should not fail a run
        that works without it.
        """
        if not asked:
            return None
        rows = self.key_rows(mode, values)
        if rows is None:
            self.say_once(logging.INFO, ("int8 values", mode, values.device.type),
                          f"kv_int8_values ignored: the KV cache's values are kept in int8 only where the INT8 "
                          f"block-sparse kernel runs (sageattention=enable, Hopper GPU, no FA4, fp16/bf16); "
                          f"here: {self._int8_absent(mode, values)}")
        return rows

    def _int8_absent(self, mode: str, values: torch.Tensor) -> str:
        if mode != SageAttention.ENABLE:
            return f"sageattention={mode}"
        if values.device.type != "cuda":
            return f"device {values.device.type}"
        if values.dtype not in HALF_DTYPES:
            return f"dtype {values.dtype}"
        if self.fa4_serves(values.device, values.dtype):
            return "FA4 serves the block-sparse calls"
        if not probe_triton().available:
            return f"Triton unavailable ({probe_triton().reason})"
        return f"GPU capability {self.capability(values.device)}"

    def quantize_values(self, values: torch.Tensor, rows: int, out) -> None:
        """Write int8 ``values`` and their per-channel scales into ``out`` = (values, scales) views."""
        self._quantize_into("values", values.device, out,
                            lambda tk: tk.quantize_value_tiles(values, rows, out=out),
                            lambda: quantize_value_tiles_reference(values, rows))

    def quantize_keys(self, keys: torch.Tensor, shift: torch.Tensor, rows: int, out) -> None:
        """Write int8 ``keys - shift`` and their scales into ``out`` = (values, scales) views."""
        self._quantize_into("keys", keys.device, out,
                            lambda tk: tk.quantize_tiles(keys, rows, 1.0, shift, out=out),
                            lambda: quantize_tiles_reference(keys, rows, shift=shift))

    def _quantize_into(self, kind: str, device: torch.device, out, triton, reference) -> None:
        """``triton(triton_kernels)`` writes into ``out`` on CUDA; elsewhere, or once it has failed,
        ``reference()``'s (int8, scales), the same values, are copied into ``out``."""
        if device.type == "cuda" and probe_triton().available and ("quantize", kind) not in self._failed:
            try:
                from . import triton_kernels as tk
                triton(tk)
                return
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:          # the torch version gives the same values
                self._failed.add(("quantize", kind))
                self.say_once(logging.WARNING, ("quantize", kind),
                              f"Triton {kind[:-1]} quantiser failed ({type(exc).__name__}: {exc}); using torch")
        for dst, src in zip(out, reference()):
            dst.copy_(src)

    # ---- block-mask bookkeeping ----------------------------------------------------------------

    def mask_kernel(self, name: str, device: torch.device, *args):
        """``mask_kernels.<name>(*args)`` on CUDA with Triton, else None: the caller then runs the torch
        code with the same results. A kernel that raises is not tried again (logged once)."""
        if device.type != "cuda" or not self.config.triton_masks or ("mask", name) in self._failed:
            return None
        if not probe_triton().available:
            return None
        try:
            from . import mask_kernels
            return getattr(mask_kernels, name)(*args)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:
            self._failed.add(("mask", name))
            self.say_once(logging.WARNING, ("mask", name),
                          f"Triton mask kernel {name} failed ({type(exc).__name__}: {exc}); "
                          "using the torch code (same results, slower)")
            return None

    def select_blocks(self, flat: torch.Tensor, kept: int):
        """``lcsa.select_above_kth(flat, kept)`` by one Triton kernel, or None where it cannot serve."""
        if flat.dtype != torch.float32:
            return None
        return self.mask_kernel("select_above_kth", flat.device, flat, kept)

    def block_lut(self, block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``build_lut(block_mask)``, by one Triton kernel where it can serve."""
        got = self.mask_kernel("lut_from_mask", block_mask.device, block_mask)
        return got if got is not None else build_lut(block_mask)

    def launch_order(self, counts: torch.Tensor) -> Optional[torch.Tensor]:
        """The kernels' longest-first task order by one Triton kernel, or None (the kernels then
        run their own argsort)."""
        return self.mask_kernel("longest_first_order", counts.device, counts)

    def uses_int8(self, mode: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether the Triton block-sparse backend runs its INT8-QK kernel for this mode and device
        (and ``dtype``, when given: by default only fp16/bf16 runs take it, as the Triton kernels
        refuse float32 and an int8 key cache would only add rounding there)."""
        if mode != SageAttention.ENABLE:
            return False
        if self.config.sparse_int8_with_sage is not None:
            return self.config.sparse_int8_with_sage
        cc = self.capability(device)
        return (cc is not None and cc[0] == 9 and (dtype is None or dtype in HALF_DTYPES)
                and not self.fa4_serves(device, dtype))

    def fa4_serves(self, device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
        """Whether FA4 takes this device's block-sparse calls (installed, eligible GPU and dtype, in
        the configured order, not failed before): then no int8 key cache is kept for the INT8 kernel."""
        if "fa4" not in self.config.sparse_backends or device.type != "cuda":
            return False
        if any(name == "fa4" for name, _ in self._failed):
            return False
        if not self.fa4.available or (dtype is not None and dtype not in HALF_DTYPES):
            return False
        cc = self.capability(device)
        return cc is not None and cc[0] in FA4_ARCHS

    def _sparse_label(self, name: str, mode: str, device: torch.device) -> str:
        return "triton-int8" if name == "triton" and self.uses_int8(mode, device) else name

    def _triton_refusal(self, q, k, v, mode) -> Optional[str]:
        probe = probe_triton()
        if not probe.available:
            return probe.reason
        cc = self.capability(q.device)
        if cc is None or cc < (8, 0):
            return f"needs a CUDA GPU of compute capability >= 8.0, got {cc}"
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in HALF_DTYPES:
            return f"needs float16 or bfloat16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
        if q.shape[-1] not in (64, 128):
            return f"head_dim {q.shape[-1]} not in (64, 128)"
        if any(t.stride(-1) != 1 for t in (q, k, v)):
            return "last dim of q/k/v not contiguous"
        return None

    def _run_triton(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        from . import triton_kernels as tk

        int8 = self.uses_int8(mode, q.device)
        if not int8:
            k, v = _plain(k), _plain(v)
        config = tk.default_config(self.capability(q.device), int8=int8)
        order = self.launch_order(counts) if config.longest_first else None
        if int8:
            return tk.block_sparse_attention_int8(q, k, v, lut, counts, config, order=order, key_mean=key_mean)
        return tk.block_sparse_attention(q, k, v, lut, counts, config, order=order)

    def _flex_refusal(self, q, k, v, mode) -> Optional[str]:
        try:
            from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
        except ImportError as exc:
            return f"torch {torch.__version__} has no flex_attention ({exc})"
        if q.device.type != "cuda":
            return "compiled flex_attention is used on CUDA only"
        probe = probe_triton()
        return None if probe.available else f"compiled flex_attention needs Triton ({probe.reason})"

    def _run_flex(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        return self._flex(q, _plain(k), _plain(v), lut, counts)


    def _fa4_refusal(self, q, k, v, mode) -> Optional[str]:
        why = fa4_refusal(self.fa4, q, k, v, self.capability(q.device))
        if why is None and self.uses_int8(mode, q.device):
            why = "the INT8 kernel was asked for (sparse_int8_with_sage=True)"
        return why

    def _run_fa4(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        return fa4_block_sparse(self.fa4, q, _plain(k), _plain(v), lut, counts)

    def _run_paged(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        return paged_attention(q, _plain(k), _plain(v), lut, counts)

    def _run_gather_varlen(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        return gathered_attention(q, _plain(k), _plain(v), lut, counts,
                                  budget_bytes=self.config.gather_budget_bytes, method="varlen")

    def _run_gather(self, q, k, v, lut, counts, mode, key_mean=None) -> torch.Tensor:
        return gathered_attention(q, _plain(k), _plain(v), lut, counts,
                                  budget_bytes=self.config.gather_budget_bytes, method="padded")


def _plain(t):
    """Keys or values as a tensor: ``QuantizedKeys`` / ``QuantizedValues`` dequantised, a tensor as it is."""
    return t.dequantize() if isinstance(t, Int8Tiles) else t


__all__ = ["AttentionConfig", "AttentionDispatcher", "AttentionSession", "BLOCK", "MODES"]
