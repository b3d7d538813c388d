"""FlashVSR's DiT: the Wan2.1-T2V-1.3B transformer with FlashVSR's streaming forward.

Parameter names equal the keys of ``diffusion_pytorch_model_streaming_dmd.safetensors`` (standard
Wan 2.1 naming), so the official file loads with no renaming. Numerics follow the official
DiffSynth port (docs/model.md §6): everything in the compute dtype except RMSNorm (float32
inside), RoPE (float64) and the sparse-attention draft softmax (float32).

Streaming (docs/model.md §4, §7): chunk 0 carries 6 latent frames and sees only itself; every later chunk
carries 2 and also sees the post-RoPE keys/values of the last ``int(kv_ratio)`` groups of 2 frames.
Temporal RoPE positions are absolute: 0..5, then 4+2k, 5+2k.

Reading order: :meth:`WanDiT.forward_chunk` embeds a chunk and builds its :class:`ChunkPass`
(what all blocks of the chunk share, and their sparse self-attention over the KV cache and
cross-attention to the prompt); each :class:`DiTBlock` then runs Wan's block on the chunk, with the
work between its attention calls in ``dit_ops`` steps (eager, or compiled on CUDA).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..attention.block_sparse import QuantizedKeys, QuantizedValues
from . import dit_ops, tile_batch
from .dit_ops import QKV, BlockSteps, Rope, affine, heads_view, merge_heads
from .lcsa import WINDOW, draft_block_mask, local_bias, local_block_mask, topk_count

if TYPE_CHECKING:
    from .sequence_parallel import SequenceParallel

HEAD_DIM = 128   # Wan2.1 uses 128-wide heads; head count is not recorded in the checkpoint


@dataclass(frozen=True)
class DiTConfig:
    dim: int = 1536
    in_dim: int = 16
    out_dim: int = 16
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    num_heads: int = 12
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @classmethod
    def from_state_dict(cls, sd) -> "DiTConfig":
        """Infer the widths from tensor shapes (so small test checkpoints use the same code)."""
        try:
            patch = sd["patch_embedding.weight"]
            dim, in_dim = patch.shape[0], patch.shape[1]
            patch_size = tuple(int(s) for s in patch.shape[2:])
            layers = 0
            while f"blocks.{layers}.modulation" in sd:
                layers += 1
            out_dim = sd["head.head.weight"].shape[0] // math.prod(patch_size)
            return cls(dim=dim, in_dim=in_dim, out_dim=out_dim,
                       ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
                       freq_dim=sd["time_embedding.0.weight"].shape[1],
                       text_dim=sd["text_embedding.0.weight"].shape[1],
                       num_heads=max(1, dim // HEAD_DIM), num_layers=layers, patch_size=patch_size)
        except KeyError as err:
            raise ValueError(f"not a FlashVSR/Wan2.1 DiT state dict: key {err} is missing") from None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    """q/k/v/o projections with RMS-normalised q and k (names as in the checkpoint). The attention
    itself runs in :class:`ChunkPass` (self-attention: sparse, over the KV cache) and on the
    prompt's keys and values from :meth:`context_kv` (cross-attention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def qkv(self) -> QKV:
        return QKV(affine(self.q), affine(self.k), affine(self.v), self.norm_q.weight, self.norm_k.weight)

    def context_kv(self, context: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the (fixed) prompt, (1, heads, L_ctx, d) each."""
        return heads_view(self.norm_k(self.k(context)), heads), heads_view(self.v(context), heads)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.dim
        self.self_attn = Attention(d, cfg.eps)
        self.cross_attn = Attention(d, cfg.eps)
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x: torch.Tensor, chunk: "ChunkPass", layer: int) -> torch.Tensor:
        """Wan's block on one chunk's window-ordered tokens (1, L, dim): modulated self-attention
        with a gated residual, cross-attention to the prompt, modulated FFN with a gated residual.

        The work between the attention calls runs in ``chunk.steps`` (eager or compiled, see
        dit_ops); norm1 and norm2 carry no weights and are applied there.
        """
        steps, heads = chunk.steps, chunk.heads
        sa, ca = self.self_attn, self.cross_attn
        q, k, v, pooled_q, pooled_k, mods = steps.pre_attention(x, self.modulation, chunk.t_mod, sa.qkv(),
                                                                chunk.rope, heads)
        gate_msa, ffn_mod = mods[2], mods[3:]
        o = chunk.self_attention(layer, q, k, v, pooled_q, pooled_k)
        x, q = steps.post_self_attention(x, o, affine(sa.o), gate_msa, affine(self.norm3), affine(ca.q),
                                         ca.norm_q.weight)
        o = chunk.cross_attention(layer, q)
        return steps.post_cross_attention(x, o, affine(ca.o), ffn_mod, affine(self.ffn[0]), affine(self.ffn[2]))


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + t.unsqueeze(1)).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


def sinusoidal_embedding(dim: int, position: torch.Tensor) -> torch.Tensor:
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=position.device).div(half))
    angles = torch.outer(position.to(torch.float64), freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(position.dtype)


def _axis_inv_freq(axis_dim: int) -> torch.Tensor:
    return 1.0 / (10000.0 ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].double() / axis_dim))


def rope_angles(head_dim: int, t_pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Complex128 rotations (f*h*w, 1, head_dim/2) for absolute temporal positions ``t_pos``.

    Computed from the positions rather than looked up in a 1024-entry table, so clips longer than
    the official ~4093-frame limit keep working (the values inside the table range are identical).
    """
    t_dim = head_dim - 2 * (head_dim // 3)
    s_dim = head_dim // 3
    dev = t_pos.device

    def rot(pos, axis_dim):
        # the host-computed frequencies go up without blocking (a blocking copy drains the GPU queue)
        ang = torch.outer(pos.to(torch.float64), _axis_inv_freq(axis_dim).to(dev, non_blocking=True))
        return torch.polar(torch.ones_like(ang), ang)

    ft, fh, fw = rot(t_pos, t_dim), rot(torch.arange(h, device=dev), s_dim), rot(torch.arange(w, device=dev), s_dim)
    f = t_pos.numel()
    table = torch.cat([ft.view(f, 1, 1, -1).expand(f, h, w, -1),
                       fh.view(1, h, 1, -1).expand(f, h, w, -1),
                       fw.view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
    return table.reshape(f * h * w, 1, -1)


@dataclass
class DiTConstants:
    """Per-prompt tensors computed once: time embedding, modulation and cross-attention K/V."""
    t: torch.Tensor                      # (1, dim)
    t_mod: torch.Tensor                  # (1, 6, dim)
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]   # per block (1, H, L_ctx, d) each


@dataclass
class KVRing:
    """One block's post-RoPE key/value windows of the last groups, in fixed slots (no copying).

    The official cache concatenates [cached groups, new group] every chunk and drops the oldest
    group when more than ``int(kv_ratio)`` remain. Here each group keeps its slot until evicted; the
    mask is computed on the groups in the official (logical) order and then moved to the slots.
    The attention kernels only read selected key blocks, so slot order does not matter to them.
    """
    k: torch.Tensor           # (slots*s1, 128, C), int8 when key_rows is set
    v: torch.Tensor           # (slots*s1, 128, C), int8 when value_rows is set
    pooled: torch.Tensor      # (slots*s1, C) window means of the keys
    order: list[int]          # slots of the cached groups, oldest first
    _index: dict = field(default_factory=dict)   # (slots, device, inverse) -> device index tensor, built once
    # int8 keys (the INT8-QK kernel's input): key = k * scale + shift, one float32 scale per key_rows
    # keys and head, and one shift per head for every key of the run (taken from the first chunk's
    # keys; a common shift leaves every softmax unchanged). Each key is quantised once, when it
    # enters the ring, and the ring holds half the bytes.
    k_scales: torch.Tensor | None = None      # (1, H, slots*s1*128 / key_rows)
    k_shift: torch.Tensor | None = None       # (1, H, D)
    key_rows: int = 0
    # int8 values (UpscaleConfig.kv_int8_values, read by the INT8 kernel): value = v * scale, one
    # float32 scale per (value_rows values, head, channel); quantised once, as they enter the ring.
    v_scales: torch.Tensor | None = None      # (1, H, slots*s1*128 / value_rows, D)
    value_rows: int = 0

    def _slots_index(self, groups, s1: int, device, inverse: bool = False) -> torch.Tensor:
        """Physical rows of the logical windows of ``groups``, or with ``inverse`` the logical
        window of every physical row (only when ``groups`` fill every slot)."""
        key = (tuple(groups), str(device), inverse)
        if key not in self._index:     # a handful of patterns per run; avoids a host copy per layer
            cols = [g * s1 + b for g in groups for b in range(s1)]
            if inverse:
                rows = [0] * len(cols)
                for logical, physical in enumerate(cols):
                    rows[physical] = logical
                cols = rows
            # built on the host and copied without blocking: a blocking copy would drain the GPU queue
            self._index[key] = torch.tensor(cols).to(device, non_blocking=True)
        return self._index[key]

    @classmethod
    def allocate(cls, k_w: torch.Tensor, pooled: torch.Tensor, s1: int, kv_groups: int,
                 heads: int = 1, key_rows: int | None = None, value_rows: int | None = None) -> "KVRing":
        # Chunk 0 brings 3 groups; later chunks attend to up to max(kv_groups, 2) cached groups + 1 new.
        slots = max(3, max(kv_groups, 2) + 1)
        shape = (slots * s1,) + tuple(k_w.shape[1:])
        # zeros, not empty: a dense fallback multiplies unselected values by 0, and 0 * NaN is NaN
        keys = torch.zeros(shape, dtype=torch.int8 if key_rows else k_w.dtype, device=k_w.device)
        values = torch.zeros(shape, dtype=torch.int8 if value_rows else k_w.dtype, device=k_w.device)
        ring = cls(keys, values, pooled.new_zeros((slots * s1, pooled.shape[1])), [])
        if key_rows:
            ring.k_scales = torch.zeros((1, heads, shape[0] * shape[1] // key_rows), dtype=torch.float32,
                                        device=k_w.device)
            ring.key_rows = key_rows
        if value_rows:
            ring.v_scales = torch.zeros((1, heads, shape[0] * shape[1] // value_rows, shape[2] // heads),
                                        dtype=torch.float32, device=k_w.device)
            ring.value_rows = value_rows
        return ring

    def add(self, k_w, v_w, pooled, s1: int, heads: int = 1, quantize=None, quantize_values=None) -> list[int]:
        """Put a chunk's new groups into free slots; returns the groups in logical order. Int8 keys
        need ``quantize(keys, shift, rows, out)``, int8 values ``quantize_values(values, rows, out)``
        (the attention session's)."""
        free = [s for s in range(self.k.shape[0] // s1) if s not in self.order]
        new = free[: k_w.shape[0] // s1]
        pairs = ((self.pooled, pooled),)
        if not self.value_rows:
            pairs = ((self.v, v_w),) + pairs
        if not self.key_rows:
            pairs = ((self.k, k_w),) + pairs
        if new == list(range(new[0], new[0] + len(new))):
            # adjacent slots (always so for one new group): a plain copy runs at full bandwidth,
            # index_copy_ well below it (docs/performance.md, "KV ring by plain copy")
            rows = slice(new[0] * s1, (new[-1] + 1) * s1)
            for dst, src in pairs:
                dst[rows].copy_(src)
        else:
            idx = self._slots_index(new, s1, k_w.device)
            for dst, src in pairs:
                dst.index_copy_(0, idx, src)
        if self.key_rows:
            self._quantize_into(new, k_w, pooled, s1, heads, quantize)
        if self.value_rows:
            self._quantize_values_into(new, v_w, s1, heads, quantize_values)
        return self.order + new

    def _quantize_into(self, new, k_w, pooled, s1: int, heads: int, quantize) -> None:
        if self.k_shift is None:
            self.k_shift = pooled.float().mean(0).view(1, heads, -1)
        window = k_w.shape[1]
        per_window = window // self.key_rows
        for i, slot in enumerate(new):           # each slot is a contiguous run of rows
            rows = slice(slot * s1, (slot + 1) * s1)
            out = (heads_view(self.k[rows], heads),
                   self.k_scales[:, :, slot * s1 * per_window:(slot + 1) * s1 * per_window])
            quantize(heads_view(k_w[i * s1:(i + 1) * s1], heads), self.k_shift, self.key_rows, out)

    def _quantize_values_into(self, new, v_w, s1: int, heads: int, quantize_values) -> None:
        per_window = v_w.shape[1] // self.value_rows
        for i, slot in enumerate(new):           # each slot is a contiguous run of rows
            rows = slice(slot * s1, (slot + 1) * s1)
            out = (heads_view(self.v[rows], heads),
                   self.v_scales[:, :, slot * s1 * per_window:(slot + 1) * s1 * per_window])
            quantize_values(heads_view(v_w[i * s1:(i + 1) * s1], heads), self.value_rows, out)

    def keys(self, heads: int):
        """The ring's keys for the attention call: a (1, H, L, D) view, or ``QuantizedKeys``."""
        if not self.key_rows:
            return heads_view(self.k, heads)
        return QuantizedKeys(heads_view(self.k, heads), self.k_scales, self.key_rows, self.pooled.dtype,
                             shift=self.k_shift)

    def values(self, heads: int):
        """The ring's values for the attention call: a (1, H, L, D) view, or ``QuantizedValues``."""
        if not self.value_rows:
            return heads_view(self.v, heads)
        return QuantizedValues(heads_view(self.v, heads), self.v_scales, self.value_rows, self.pooled.dtype)

    def columns(self, groups: list[int], s1: int) -> torch.Tensor:
        return self._slots_index(groups, s1, self.k.device)

    def physical_mask(self, mask: torch.Tensor, groups: list[int], s1: int) -> torch.Tensor:
        """(1, H, nq, len(groups)*s1) in logical order -> (1, H, nq, n_slots*s1); free slots are never
        selected."""
        if len(groups) * s1 == self.k.shape[0]:      # every slot in use (all steady chunks): one gather
            return mask.index_select(-1, self._slots_index(groups, s1, mask.device, inverse=True))
        out = mask.new_zeros(mask.shape[:-1] + (self.k.shape[0],))
        out[..., self.columns(groups, s1)] = mask
        return out

    def evict(self, groups: list[int], kv_groups: int) -> None:
        # The official rule drops one group at most per chunk, when more than kv_groups remain.
        self.order = groups[1:] if len(groups) > kv_groups else groups


@dataclass
class DiTStreamState:
    """What one streaming run carries between chunks (docs/model.md §7)."""
    chunk_index: int = 0
    kv: list[KVRing | None] = field(default_factory=list)
    local_mask: torch.Tensor | None = None
    local_key: tuple[int, int, int] | None = None
    biases: dict = field(default_factory=dict)     # (query groups, key groups) -> lcsa.local_bias
    observe: object | None = None        # optional callback(layer, name, tensor) for parity tests
    _orders: dict = field(default_factory=dict)

    def draft_bias(self, query_groups: int, key_groups: int) -> torch.Tensor:
        """:func:`lcsa.local_bias` of the current local mask, built once per shape (not per layer)."""
        key = (query_groups, key_groups)
        if key not in self.biases:
            self.biases[key] = local_bias(self.local_mask, query_groups, key_groups)
        return self.biases[key]

    def token_order(self, f: int, h: int, w: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Window-order permutation and its inverse for one chunk shape, built once per run."""
        key = (f, h, w, str(device))
        if key not in self._orders:
            self._orders[key] = dit_ops.window_order(f, h, w, device)
        return self._orders[key]


@dataclass(frozen=True)
class SparseParams:
    topk_ratio: float
    kv_groups: int      # int(kv_ratio)
    local_range: int


@dataclass
class ChunkPass:
    """What the 30 blocks of one chunk share, and the two attention calls of a block.

    Built by :meth:`WanDiT.forward_tokens` once per chunk; the blocks call :meth:`self_attention`
    (sparse, over the chunk's new keys and the cached ones of the last groups) and
    :meth:`cross_attention` (dense, over the prompt) with their layer index.
    """
    t_mod: torch.Tensor          # (1, 6, dim)
    rope: Rope                   # per window-ordered token (this rank's, with an exchange)
    heads: int                   # all heads: RoPE and cross-attention work per token on all of them
    query_groups: int            # groups of 2 latent frames in this chunk (3 for chunk 0, then 1)
    windows_per_group: int       # s1: 128-token windows per group
    topk: int                    # lcsa.topk_count
    kv_groups: int
    state: DiTStreamState
    consts: DiTConstants
    attn: object                 # the attention session (attention.AttentionSession)
    steps: BlockSteps
    tiles: int = 1               # spatial tiles in the batch (models/tile_batch.py)
    # Several processes (models/sequence_parallel.py): this rank holds some windows, and attends
    # over some heads of all windows. None: one process holds everything.
    exchange: "SequenceParallel | None" = None

    def self_attention(self, layer: int, q_w, k_w, v_w, pooled_q, pooled_k) -> torch.Tensor:
        """LCSA (docs/model.md §7, §8) of the chunk's windows: inputs (windows, 128, C) and window
        means (windows, C), output (1, L, C). With an exchange, this rank's windows go in and come
        out, and :meth:`lcsa` runs on all windows of this rank's heads in between. A batch of tiles:
        (tiles*windows, ...) in, (tiles, L, C) out (models/tile_batch.py)."""
        if self.tiles > 1:
            return tile_batch.self_attention(self, layer, q_w, k_w, v_w, pooled_q, pooled_k)
        ex = self.exchange
        if ex is None:
            return self.lcsa(layer, q_w, k_w, v_w, pooled_q, pooled_k, self.heads)
        windows = self.query_groups * self.windows_per_group
        o = self.lcsa(layer, *ex.to_heads(q_w, k_w, v_w, pooled_q, pooled_k, windows), ex.heads)
        return ex.to_tokens(o, windows)

    def lcsa(self, layer: int, q_w, k_w, v_w, pooled_q, pooled_k, heads: int) -> torch.Tensor:
        """The new keys and values enter this layer's KV ring, the draft mask picks the key windows
        each query window attends to, and the oldest group leaves the ring. Every step is per head."""
        state, attn, s1 = self.state, self.attn, self.windows_per_group
        ring = state.kv[layer]
        if ring is None:
            ring = state.kv[layer] = KVRing.allocate(k_w, pooled_k, s1, self.kv_groups, heads, attn.key_rows(k_w),
                                                     attn.value_rows(v_w))
        groups = ring.add(k_w, v_w, pooled_k, s1, heads, attn.quantize_keys,     # logical order, oldest first
                          attn.quantize_values)
        pooled_k = ring.pooled.index_select(0, ring.columns(groups, s1))
        mask = draft_block_mask(pooled_q, pooled_k, heads, self.query_groups, state.local_mask, self.topk,
                                bias=state.draft_bias(self.query_groups, len(groups)), select=attn.select_blocks)
        if state.observe is not None:
            state.observe(layer, "block_mask", mask)
            if layer == 0:
                state.observe(layer, "pooled_q", pooled_q)
                state.observe(layer, "pooled_k", pooled_k)
        # No key mean to pass: the INT8 kernel runs only where the ring holds int8 keys, which carry
        # their own shift (session.key_rows is set exactly when the session uses that kernel).
        o = attn.block_sparse(heads_view(q_w, heads), ring.keys(heads), ring.values(heads),
                              ring.physical_mask(mask, groups, s1))
        ring.evict(groups, self.kv_groups)
        return merge_heads(o)

    def cross_attention(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Dense attention of the (B, L, C) queries to the prompt's keys and values of ``layer``
        (a batch of tiles attends as one longer sequence: each query's softmax is its own)."""
        k, v = self.consts.cross_kv[layer]
        return merge_heads(self.attn.dense(heads_view(q, self.heads), k, v)).view(q.shape)


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"),
                                            nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, d * 6))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.streamed = None     # models/block_stream.StreamedBlocks while the blocks live in host memory

    # ---- per-prompt constants -------------------------------------------------------------
    @torch.no_grad()
    def prepare(self, context: torch.Tensor, timestep: float = 1000.0) -> DiTConstants:
        """Embed the fixed prompt and t=1000 once; cross-attention keys/values per block."""
        dtype = self.patch_embedding.weight.dtype
        dev = self.patch_embedding.weight.device
        ts = torch.tensor([timestep], dtype=dtype, device=dev)
        t = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, ts))
        t_mod = self.time_projection(t).unflatten(1, (6, self.cfg.dim))
        ctx = self.text_embedding(context.to(device=dev, dtype=dtype))
        cross = [blk.cross_attn.context_kv(ctx, self.cfg.num_heads) for blk in self.blocks]
        return DiTConstants(t=t, t_mod=t_mod, cross_kv=cross)

    # ---- one streaming chunk ---------------------------------------------------------------
    @torch.no_grad()
    def forward_chunk(self, latents: torch.Tensor, lq_tokens: torch.Tensor | None, consts: DiTConstants,
                      state: DiTStreamState, sparse: SparseParams, attn,
                      steps: BlockSteps | None = None) -> torch.Tensor:
        """Denoise one chunk in one step: returns ``latents - velocity`` (flow matching, sigma 1).

        latents: (B, 16, f, H/8, W/8) noise slice; lq_tokens: (B, f*h*w, dim) projector tokens; B > 1:
        a batch of spatial tiles of one stream each (``state`` then holds all their KV rings);
        steps: the blocks' step functions (default: the eager reference, ``dit_ops.EAGER``).
        """
        x, grid = self.embed(latents, lq_tokens, state)
        y = self.forward_tokens(x, grid, consts, state, sparse, attn, steps)
        return self.denoised(latents, y, grid, state)

    def embed(self, latents: torch.Tensor, lq_tokens: torch.Tensor | None,
              state: DiTStreamState) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch embedding plus projector tokens, in window order (B, L, dim); and the token grid (f, h, w)."""
        # a batch of tiles one by one: a batched 3-D convolution sums in another order on the CPU
        x = (self.patch_embedding(latents) if latents.shape[0] == 1
             else torch.cat([self.patch_embedding(tile) for tile in latents.split(1)]))
        f, h, w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        if lq_tokens is not None:
            x = x + lq_tokens
        order, _ = state.token_order(f, h, w, x.device)
        return x[:, order], (f, h, w)                       # window order until the head

    def forward_tokens(self, x: torch.Tensor, grid: tuple[int, int, int], consts: DiTConstants,
                       state: DiTStreamState, sparse: SparseParams, attn, steps: BlockSteps | None = None,
                       exchange: "SequenceParallel | None" = None) -> torch.Tensor:
        """The blocks and the head on window-ordered tokens: (B, L, dim) -> (B, L, out_dim * patch).
        With ``exchange`` the tokens are this rank's windows only (``exchange.own_tokens``)."""
        f, h, w = grid
        order, _ = state.token_order(f, h, w, x.device)
        chunk = self._chunk_pass(f, h, w, order, consts, state, sparse, attn, steps or dit_ops.EAGER, exchange)
        chunk.tiles = x.shape[0]
        for layer, block in enumerate(self.blocks if self.streamed is None else self.streamed.blocks()):
            x = block(x, chunk, layer)
        state.chunk_index += 1
        return self.head(x, consts.t)

    def denoised(self, latents: torch.Tensor, y: torch.Tensor, grid: tuple[int, int, int],
                 state: DiTStreamState) -> torch.Tensor:
        """``latents`` minus the velocity the head predicted (window-ordered ``y`` of the whole chunk)."""
        _, inverse = state.token_order(*grid, y.device)
        return latents - self._unpatchify(y[:, inverse], *grid)

    def _chunk_pass(self, f, h, w, order, consts, state: DiTStreamState, sparse: SparseParams, attn,
                    steps: BlockSteps, exchange: "SequenceParallel | None" = None) -> ChunkPass:
        """RoPE angles at the chunk's absolute temporal positions (0..5, then 4+2k, 5+2k), the local
        mask for this grid, and the KV rings' list on the first chunk."""
        cfg = self.cfg
        start = 0 if state.chunk_index == 0 else 4 + 2 * state.chunk_index
        t_pos = torch.arange(start, start + f, device=order.device)
        rows, cols = h // WINDOW[1], w // WINDOW[2]
        if exchange is not None:        # the angles of this rank's tokens only
            order = order[exchange.own_tokens(f // WINDOW[0] * rows * cols)]
        angles = rope_angles(cfg.dim // cfg.num_heads, t_pos, h, w)[order]
        key = (rows, cols, sparse.local_range)
        if state.local_key != key:
            state.local_mask = local_block_mask(rows, cols, sparse.local_range, device=order.device)
            state.local_key = key
            state.biases = {}
        if not state.kv:
            state.kv = [None] * len(self.blocks)
        s1 = rows * cols
        return ChunkPass(t_mod=consts.t_mod, rope=Rope(angles.real.contiguous(), angles.imag.contiguous()),
                         heads=cfg.num_heads, query_groups=f // WINDOW[0], windows_per_group=s1,
                         topk=topk_count(s1, sparse.topk_ratio), kv_groups=sparse.kv_groups, state=state,
                         consts=consts, attn=attn, steps=steps, exchange=exchange)

    def _unpatchify(self, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        b = x.shape[0]
        x = x.view(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, f * pt, h * ph, w * pw)
