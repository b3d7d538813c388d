"""``flashvsr doctor``: can this machine run the pack, which attention backends will it use, and why.

One command instead of a verification guide: versions (Python, torch, CUDA, Triton, SageAttention,
PyAV), the GPU and its compute capability, each attention backend's eligibility with the reason when
it is not eligible, a tiny numerical check of every backend that runs here against an fp32 SDPA
reference, and the state of every weight file in the models folder.

Exit code 0 only when nothing is FAIL, i.e. the pack can run (WARN = it runs, but read the line).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from .. import config

log = logging.getLogger(__name__)

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"
MIN_PYTHON = (3, 10)
MIN_TORCH = (2, 5)
REQUIRED = ("numpy", "einops", "safetensors", "huggingface_hub", "PIL")
# Pass thresholds for one attention call against an fp32 reference (docs/model.md §14: what other
# projects use as hard failures; SageAttention's INT8 QK measures ~0.013 relL2, bf16 SDPA ~0.004).
MAX_REL_L2, MIN_COSINE = 0.05, 0.99


@dataclass(frozen=True)
class Check:
    section: str
    name: str
    status: str        # OK / WARN / FAIL / INFO
    detail: str


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def system_checks() -> list[Check]:
    out = []
    py = sys.version_info[:3]
    out.append(Check("system", "python", OK if py[:2] >= MIN_PYTHON else FAIL,
                     ".".join(map(str, py)) + ("" if py[:2] >= MIN_PYTHON else
                                               f" (needs >= {'.'.join(map(str, MIN_PYTHON))})")))
    out.append(Check("system", "platform", INFO, platform.platform()))
    try:
        import torch
    except ImportError as exc:
        return out + [Check("system", "torch", FAIL, f"not importable ({exc}): install PyTorch "
                            "(https://pytorch.org/get-started/locally/)")]
    good = _version_tuple(torch.__version__)[:2] >= MIN_TORCH
    cuda = f", CUDA build {torch.version.cuda}" if torch.version.cuda else ", CPU-only build"
    out.append(Check("system", "torch", OK if good else FAIL, torch.__version__ + cuda + (
        "" if good else f": needs torch >= {'.'.join(map(str, MIN_TORCH))}")))
    for mod in REQUIRED:
        try:
            __import__(mod)
        except ImportError as exc:
            out.append(Check("system", mod, FAIL, f"missing ({exc}): pip install -r requirements.txt"))
    av = _dist_version("av")
    out.append(Check("system", "PyAV", OK if av else WARN, av or
                     "not installed: the command line cannot read or write video files "
                     "(image folders still work; ComfyUI nodes are unaffected): pip install av"))
    return out


def gpu_checks() -> tuple[list[Check], str]:
    """GPU lines, and the device the attention checks should run on."""
    import torch
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build: install a CUDA build of PyTorch"
               if not torch.version.cuda else
               "CUDA build, but no usable GPU/driver (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        return [Check("gpu", "cuda", WARN, f"no CUDA GPU: {why}. CPU runs work but are far too "
                                           "slow for real videos")], "cpu"
    out = [Check("gpu", "cuda", OK, f"{torch.cuda.device_count()} GPU(s), CUDA {torch.version.cuda}")]
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cc = f"sm{props.major}{props.minor}"
        bf16 = "bf16 ok" if props.major >= 8 else "no native bf16 (pre-Ampere): use --precision fp16"
        out.append(Check("gpu", f"cuda:{i}", OK if props.major >= 8 else WARN,
                         f"{props.name}, {cc}, {props.total_memory / 2**30:.1f} GiB, {bf16}"))
    return out, "cuda:0"


def package_checks() -> list[Check]:
    from ...attention.fa4 import probe_fa4
    from ...attention.probe import probe_sage, probe_triton
    triton, sage, fa4 = probe_triton(), probe_sage(), probe_fa4()
    return [
        Check("attention", "flash-attn-4", INFO, (fa4.version or "installed") if fa4.available else
              f"not usable ({fa4.reason}); optional, Hopper/datacenter Blackwell: pip install "
              "'flashvsr-bolt[fa4]' (the fastest block-sparse kernel there)"),
        Check("attention", "triton", INFO, triton.version if triton.available else
              f"not usable ({triton.reason}): the Triton block-sparse kernel is unavailable"),
        Check("attention", "sageattention", INFO,
              f"{sage.version or 'unknown version'} ({sage.flavour})" if sage.available else
              f"not usable ({sage.reason}); optional: pip install sageattention"),
    ]


def _compare(got, ref) -> tuple[float, float]:
    got, ref = got.float().flatten(), ref.float().flatten()
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    cos = float((got @ ref) / (got.norm() * ref.norm()).clamp_min(1e-12))
    return rel, cos


def _reference(q, k, v, block_mask=None):
    """fp32 SDPA; with a block mask: only selected 128x128 blocks, empty query blocks exactly 0."""
    import torch
    import torch.nn.functional as F
    q, k, v = q.float(), k.float(), v.float()
    if block_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    tok = block_mask.repeat_interleave(128, -2).repeat_interleave(128, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=tok)
    rows = block_mask.any(-1).repeat_interleave(128, -1)[..., None]
    return torch.where(rows, out, torch.zeros_like(out))


def judge(name: str, run, ref, last_resort: bool = False) -> Check:
    """Run one backend; wrong numbers FAIL (they would reach the video). An exception only WARNs
    when the dispatcher can fall back to another backend, i.e. unless this is the last resort."""
    import torch
    try:
        got = run()
    except Exception as exc:             # any kernel/compiler error is the finding here
        if last_resort:
            return Check("attention", name, FAIL, f"raised {type(exc).__name__}: {exc}; nothing "
                                                  "to fall back to")
        return Check("attention", name, WARN, f"eligible but raised {type(exc).__name__}: {exc}; "
                                              "the dispatcher falls back to the next backend")
    rel, cos = _compare(got, ref)
    good = rel <= MAX_REL_L2 and cos >= MIN_COSINE and bool(torch.isfinite(got).all())
    return Check("attention", name, OK if good else FAIL,
                 f"eligible; vs fp32 SDPA: relL2 {rel:.4f}, cos {cos:.5f} "
                 f"(limits {MAX_REL_L2} / {MIN_COSINE})")


def attention_checks(device: str) -> list[Check]:
    """Each backend: eligible here for FlashVSR's calls (and why not), and if so, is it correct?

    Small random inputs shaped like the real calls (head_dim 128, lengths in 128-token blocks,
    2 heads, 2 query x 4 key blocks, one query block with no key block). Then the block each
    ``sageattention`` setting actually selects, as the pipeline will see it.
    """
    import torch
    import torch.nn.functional as F
    from ...attention import AttentionDispatcher
    from ...attention.block_sparse import build_lut, masked_reference
    from ...attention.probe import probe_sage
    from ...attention.sage import DenseCall, run_sage, sage_refusal
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 256, 128, generator=gen).to(dev, dtype)
    k = torch.randn(1, 2, 512, 128, generator=gen).to(dev, dtype)
    v = torch.randn(1, 2, 512, 128, generator=gen).to(dev, dtype)
    mask = torch.tensor([[[1, 0, 1, 1], [0, 1, 0, 0]], [[1, 1, 1, 1], [0, 0, 0, 0]]],
                        dtype=torch.bool, device=dev)[None]
    ref_dense, ref_sparse = _reference(q, k, v), _reference(q, k, v, mask)
    dispatcher = AttentionDispatcher()
    out = [judge("dense: sdpa", lambda: F.scaled_dot_product_attention(q, k, v), ref_dense, True)]
    sage = probe_sage()
    why = sage_refusal(sage, DenseCall.of(q, k, v, dispatcher.capability(dev)))
    out.append(Check("attention", "dense: sage", INFO, f"not eligible: {why}") if why else
               judge("dense: sage", lambda: run_sage(sage, q, k, v), ref_dense))
    slower = dispatcher.sage_slower_than_sdpa() if not why else None
    if slower and dispatcher.config.dense_sage_where_slower:
        out.append(Check("attention", "sageattention speed", WARN, f"enable is slower here: {slower}"))
    elif slower:
        int8 = dispatcher.uses_int8("enable", dev)
        out.append(Check("attention", "sageattention speed", INFO,
                         f"{slower}: enable runs SDPA for the dense calls"
                         + (" and the INT8 Triton kernel for the block-sparse ones" if int8 else "")))
    lut, counts = build_lut(mask)
    for name in dispatcher.sparse_order(dev):
        label = f"block-sparse: {name}"
        if name == "reference":
            out.append(judge(label, lambda: masked_reference(q, k, v, mask), ref_sparse, True))
            continue
        refusal, run = dispatcher.sparse_runners[name]
        why = refusal(q, k, v, "disable")
        out.append(Check("attention", label, INFO, f"not eligible: {why}") if why else
                   judge(label, lambda run=run: run(q, k, v, lut, counts, "disable", None), ref_sparse))
        if name == "triton" and not why and dispatcher.uses_int8("enable", dev):
            # what sageattention=enable runs for the sparse layers on this GPU (Sage-style INT8 QK)
            out.append(judge("block-sparse: triton-int8 (enable)",
                              lambda run=run: run(q, k, v, lut, counts, "enable", None), ref_sparse))
    if dev.type != "cuda":
        out.append(Check("attention", "block-sparse: fa4, triton, flex", INFO,
                         "used on CUDA only; on this device the sparse calls take the gathered path"))
    for mode in config.SAGE_CHOICES:
        session = dispatcher.session(mode=mode)
        try:
            session.dense(q, k, v)
            session.block_sparse(q, k, v, mask)
            out.append(Check("attention", f"sageattention={mode} runs", INFO, session.summary()))
        except Exception as exc:         # the dispatcher itself failing is a hard stop
            out.append(Check("attention", f"sageattention={mode} runs", FAIL,
                             f"{type(exc).__name__}: {exc}"))
    return out


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the weights hub cannot be reached from here, or None when it answers (any HTTP status)."""
    import urllib.error
    import urllib.request
    from ..weights.catalog import HF_ENDPOINT
    from ..weights.download import hub_endpoint
    url = hub_endpoint() or HF_ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None                       # it answered, which is all a download needs to start
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a bad URL
        return f"{url} is unreachable ({getattr(exc, 'reason', exc)})"
    return None


def weight_checks(roots: list[Path], deep: bool = False,
                  unreachable: Callable[[], str | None] | None = None) -> list[Check]:
    from ..weights.download import offline_reason
    from ..weights.store import check_models_folder
    offline = offline_reason(True)
    out = [Check("weights", "models folder", INFO, ", ".join(map(str, roots)))]
    statuses = check_models_folder(roots, deep=deep)
    # A file shared by both versions may sit in several folders; the loader takes the first.
    first: dict[str, int] = {}
    missing = []
    for st in statuses:
        if st.label in first:
            shown = out[first[st.label]]
            out[first[st.label]] = Check(shown.section, shown.name, shown.status,
                                         f"{shown.detail}; unused copy at {st.path}")
            continue
        first[st.label] = len(out)
        if st.state == "present":
            out.append(Check("weights", st.label, OK, f"{st.path}{'; ' + st.detail if st.detail else ''}"))
        elif st.state == "missing":
            missing.append((len(out), st))
            out.append(None)              # decided below, once we know whether they can download
        else:
            out.append(Check("weights", st.label, FAIL, st.detail or f"{st.state}: {st.path}"))
    # A missing file only blocks a run when it cannot be downloaded on first use.
    cut_off = None if offline or not missing else (unreachable or hub_unreachable)()
    how = (offline or (f"{cut_off}, so it cannot download: put it there by hand, or run again "
                       "where the hub is reachable" if cut_off else "downloaded on first use"))
    for i, st in missing:
        out[i] = Check("weights", st.label, FAIL if offline or cut_off else WARN,
                       f"missing at {st.path} ({how}); {st.detail}".rstrip("; "))
    return out


def collect(roots: list[Path], device: str | None = None, numeric: bool = True,
            deep: bool = False) -> list[Check]:
    checks = system_checks()
    if any(c.name == "torch" and c.status == FAIL for c in checks):
        return checks
    gpu, auto_device = gpu_checks()
    checks += gpu + package_checks()
    if numeric:
        checks += attention_checks(device or auto_device)
    return checks + weight_checks(roots, deep)


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines, section = [], None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(f"\n{section}")
        lines.append(f"  [{c.status:<4}] {c.name:<{width}}  {c.detail}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    verdict = ("ready: the pack can run" if not fails else
               f"NOT ready: {fails} problem(s) marked FAIL above")
    lines.append(f"\n{verdict} ({warns} warning(s))")
    return "\n".join(lines).lstrip("\n")


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check this machine: versions, GPU, attention backends, weights",
                       description="Exit code 0 only when the pack can run here.")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="models folder(s) to check (default $FLASHVSR_MODELS or ~/.cache/flashvsr/models)")
    p.add_argument("--device", default=None, help="device for the attention checks (default cuda:0 or cpu)")
    p.add_argument("--no-numeric", dest="numeric", action="store_false",
                   help="skip the attention section (eligibility and correctness checks)")
    p.add_argument("--deep", action="store_true",
                   help="also read every weight file in full and compare its sha256 (slow: ~7 GB)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from .common import default_models_roots
    roots = [Path(m) for m in args.models] or default_models_roots()
    checks = collect(roots, args.device, args.numeric, args.deep)
    if args.json:
        sys.stdout.write(json.dumps({"ready": exit_code(checks) == 0,
                                     "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
    else:
        sys.stdout.write(render(checks) + "\n")
    return exit_code(checks)
