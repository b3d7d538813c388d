"""The convolutional networks over several processes: one horizontal band of rows per rank, exact.

The LQ projector, the TCDecoder and the Wan VAE decoder are convolutions (3x3 at most on the row
axis, stride 1 there), pointwise activations, RMS norms over channels (per pixel), nearest or
pixel-shuffle resizing (per pixel) and, in the Wan VAE only, one attention over the whole frame.
So each rank can hold a contiguous band of the frame's rows at every layer:

* before a convolution whose row padding is p (1 for every 3x3 kernel here), the rank gets p rows
  from the band above and p from the band below (``pad``), and at the frame's own top and bottom
  the padding the layer uses (zeros; ``replicate`` for the projector); the convolution then runs
  without row padding, so every output row reads exactly the input rows of the one-process run;
* the Wan VAE's mid-block attention gathers the whole frame on every rank (``whole``), runs the
  unchanged block on it and keeps the rank's rows (``own``);
* everything else reads only its own pixel.

Bands are counted in ``units``: the coarsest rows of the network (latent rows for the decoders,
16-pixel token rows for the projector), so every finer resolution's band is the same multiple of
its units and no resize moves a boundary. A rank's causal caches hold only its own rows; the halo
rows of past frames travel with each exchange. Ranks past the frame's last unit get no band at all
(a frame with fewer units than ranks): they take no part in the exchange and the others treat the
last band with rows as the frame's bottom (``band_split``).

All exchanges are point-to-point between the ranks that hold rows, so an idle rank calls nothing.
Every rank with rows must call the methods in the same order with the same shapes but its rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

EDGES = ("zeros", "replicate")


def band_split(units: int, world: int) -> list[int]:
    """Units per rank, contiguous and in rank order: the first ranks take one more. With fewer
    units than ranks the last ranks get none."""
    if units < 1 or world < 1:
        raise ValueError(f"cannot split {units} rows over {world} processes")
    base, extra = divmod(units, world)
    return [base + (r < extra) for r in range(world)]


class RowBands:
    """This rank's band of a frame of ``units`` coarse rows, and the exchanges between the bands.

    Tensors carry rows on dim -2 (``(..., H, W)``); a tensor at a finer resolution holds
    ``scale`` rows per unit, the same on every rank.
    """

    def __init__(self, units: int, group=None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.units = units
        self.sizes = band_split(units, self.world)
        self.starts = [sum(self.sizes[:r]) for r in range(self.world)]
        self.active = sum(1 for s in self.sizes if s)       # ranks 0 .. active-1 hold rows

    @property
    def mine(self) -> int:
        return self.sizes[self.rank]

    def scale(self, rows: int) -> int:
        """Rows per unit of a tensor of which this rank holds ``rows`` rows."""
        scale, rest = divmod(rows, self.mine)
        if rest:
            raise ValueError(f"a band of {rows} rows is no multiple of this rank's {self.mine} rows")
        return scale

    def whole_rows(self, rows: int) -> int:
        """Rows of the whole frame at the resolution where this rank holds ``rows``."""
        return self.units * self.scale(rows)

    def _peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _run(self, ops: list) -> None:
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()

    # ---- between neighbours ---------------------------------------------------------------------
    def pad(self, x: torch.Tensor, p: int, edge: str = "zeros") -> torch.Tensor:
        """``x`` with ``p`` rows of the band above on top and ``p`` of the band below underneath;
        at the frame's top and bottom ``edge`` padding (zeros, or the first/last row repeated).
        Keeps ``x``'s memory format (channels-last convolutions stay channels-last)."""
        if edge not in EDGES:
            raise ValueError(f"edge must be one of {EDGES}, got {edge!r}")
        if p == 0:
            return x
        n = x.shape[-2]
        if n < p:
            raise ValueError(f"a band of {n} rows cannot lend {p} rows to its neighbours")
        fmt = _memory_format(x)
        shape = (*x.shape[:-2], n + 2 * p, x.shape[-1])
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        out[..., p:p + n, :].copy_(x)
        above = self.rank - 1 if self.rank > 0 else None
        below = self.rank + 1 if self.rank + 1 < self.active else None
        ops, received = [], []
        for peer, mine, into in ((above, x[..., :p, :], out[..., :p, :]),
                                 (below, x[..., n - p:, :], out[..., p + n:, :])):
            if peer is None:
                continue
            buf = torch.empty(into.shape, dtype=x.dtype, device=x.device)
            ops += [dist.P2POp(dist.isend, mine.contiguous(), self._peer(peer), self.group),
                    dist.P2POp(dist.irecv, buf, self._peer(peer), self.group)]
            received.append((into, buf))
        self._run(ops)
        for into, buf in received:
            into.copy_(buf)
        if above is None:
            _edge(out[..., :p, :], x[..., :1, :], edge)
        if below is None:
            _edge(out[..., p + n:, :], x[..., n - 1:, :], edge)
        return out

    def conv(self, conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``conv(x)`` of a zero-padded nn.Conv2d / nn.Conv3d on this band: the halo rows take the
        place of the row padding (the frame's edges get the zeros the layer would add)."""
        p = conv.padding[-2]
        if p == 0:
            return conv(x)
        if (conv.stride[-2] != 1 or conv.dilation[-2] != 1 or conv.padding_mode != "zeros"
                or not isinstance(conv.padding, tuple)):
            raise ValueError(f"{conv} cannot run on row bands (row stride and dilation 1, zero padding)")
        padding = (*conv.padding[:-2], 0, conv.padding[-1])
        fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
        return fn(self.pad(x, p), conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)

    # ---- the whole frame ------------------------------------------------------------------------
    def whole(self, x: torch.Tensor) -> torch.Tensor:
        """Every band's rows of ``x`` on every rank with rows: the whole frame, in row order."""
        scale = self.scale(x.shape[-2])
        mine = x.contiguous()
        parts, ops = [], []
        for r in range(self.active):
            if r == self.rank:
                parts.append(mine)
                continue
            buf = torch.empty((*x.shape[:-2], self.sizes[r] * scale, x.shape[-1]), dtype=x.dtype, device=x.device)
            ops += [dist.P2POp(dist.isend, mine, self._peer(r), self.group),
                    dist.P2POp(dist.irecv, buf, self._peer(r), self.group)]
            parts.append(buf)
        self._run(ops)
        return torch.cat(parts, dim=-2)

    def own(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a whole-frame tensor (a view)."""
        scale, rest = divmod(whole.shape[-2], self.units)
        if rest:
            raise ValueError(f"{whole.shape[-2]} rows are no multiple of the frame's {self.units} units")
        return whole.narrow(-2, self.starts[self.rank] * scale, self.mine * scale)

    # ---- rank 0 <-> the bands -------------------------------------------------------------------
    def scatter(self, x: torch.Tensor | None, shape: tuple[int, ...], dtype, device) -> torch.Tensor:
        """Rank 0 passes the whole-frame tensor of ``shape``, the others None; each gets its band."""
        scale = shape[-2] // self.units
        if self.rank != 0:
            out = torch.empty((*shape[:-2], self.mine * scale, shape[-1]), dtype=dtype, device=device)
            self._run([dist.P2POp(dist.irecv, out, self._peer(0), self.group)])
            return out
        ops = [dist.P2POp(dist.isend, x.narrow(-2, self.starts[r] * scale, self.sizes[r] * scale).contiguous(),
                          self._peer(r), self.group) for r in range(1, self.active)]
        self._run(ops)
        return self.own(x).contiguous()

    def gather(self, x: torch.Tensor) -> torch.Tensor | None:
        """Each band's rows -> the whole frame on rank 0 (None elsewhere)."""
        if self.rank != 0:
            self._run([dist.P2POp(dist.isend, x.contiguous(), self._peer(0), self.group)])
            return None
        scale = self.scale(x.shape[-2])
        parts = [x] + [torch.empty((*x.shape[:-2], self.sizes[r] * scale, x.shape[-1]), dtype=x.dtype,
                                   device=x.device) for r in range(1, self.active)]
        self._run([dist.P2POp(dist.irecv, buf, self._peer(r), self.group) for r, buf in enumerate(parts) if r])
        return torch.cat(parts, dim=-2) if len(parts) > 1 else x


def _edge(into: torch.Tensor, row: torch.Tensor, edge: str) -> None:
    if edge == "zeros":
        into.zero_()
    else:
        into.copy_(row.expand(into.shape))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
