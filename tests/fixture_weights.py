"""Rebuild the golden fixtures' seeded bf16 weights from their recipe, and check them by sha256.

The fixtures' weights are random, so they hardly compress; the slimmed cases in tests/fixtures/ store
no weights, only the recipe (in each case's JSON) and the sha256 of the result. Every parameter is
drawn on its own from a CPU generator seeded by its name, so the values do not depend on the order of
the keys: value = a + b * N(0, 1) in float32, rounded once to bf16. The (a, b) of a parameter follow
from its component, its name and its shape (see ``scale_and_offset``).
"""
from __future__ import annotations

import hashlib
import math

import torch

COMPONENTS = ("dit", "lq_proj", "tcdecoder")


def _generator(seed: int, component: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{component}/{name}".encode()).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def scale_and_offset(component: str, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(a, b) of value = a + b * N(0, 1) for one parameter of the fixture models."""
    leaf = name.rsplit(".", 1)[-1]
    fan_in = math.prod(shape[1:])
    if component == "tcdecoder":
        return (0.0, 0.05) if leaf == "bias" else (0.0, 0.8 * math.sqrt(2.0 / fan_in))
    if leaf == "modulation":
        return 0.0, 1.0 / math.sqrt(shape[-1])
    if leaf == "gamma" or (leaf == "weight" and len(shape) == 1):
        return 1.0, 0.1                                   # norm gains
    if leaf == "bias":
        # large query/key biases in self-attention spread the draft scores, so the top-k is well conditioned
        big = component == "dit" and (".self_attn.q." in f".{name}" or ".self_attn.k." in f".{name}")
        return 0.0, 1.0 if big else 0.1
    return 0.0, 1.0 / math.sqrt(fan_in)


def regenerate(recipe: dict, listing: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The ``weights/<component>/<key>`` tensors named in ``listing`` (the case JSON's ``tensors``)."""
    seed = int(recipe["seed"])
    out = {}
    for full, info in listing.items():
        parts = full.split("/", 2)
        if parts[0] != "weights" or len(parts) != 3 or parts[1] not in COMPONENTS:
            continue
        if info["dtype"] not in ("bf16", "bfloat16", "BF16", "torch.bfloat16"):
            raise ValueError(f"{full}: the recipe makes bf16 tensors, the listing says {info['dtype']}")
        _, component, name = parts
        shape = tuple(int(s) for s in info["shape"])
        a, b = scale_and_offset(component, name, shape)
        x = torch.randn(shape, generator=_generator(seed, component, name), dtype=torch.float32)
        out[full] = (a + b * x).to(torch.bfloat16)
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, shapes and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).flatten().numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
