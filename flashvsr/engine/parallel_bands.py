"""The LQ projector and the decoders over several processes: one band of rows per rank.

Rank 0 runs the engine (``run_stream``) as on one GPU; its projector and decoder are the objects
below, in the networks' places (``EngineModels.projector`` / ``.decoder``). Per call, rank 0 posts
a control message (``project`` or ``decode``, through the store like the DiT's), hands each rank
its band of the input rows, runs its own band, and gathers the bands' outputs: the projector's
tokens before the DiT embeds them, the decoded frames before the colour fix, which stays on rank 0
(its statistics cover the whole frame). The other ranks answer those messages in ``serve``
(``BandWorker``). The halo exchanges inside the networks are ``models/row_bands.py``.

Bands: the projector's are counted in 16-pixel token rows, the decoders' in latent rows (8
pixels), split as evenly as they go, whatever ``rank0_share`` says (that share is the DiT's: it
balances the work only rank 0 does, the embedding, the upsampling and the colour fix). A frame
with fewer such rows than ranks leaves the last ranks without a band; they skip the call.

Every rank keeps its own band's causal state (the projector's caches, the TCDecoder's memory, the
Wan VAE's histories), so the states never travel. A call that fails half-way leaves the ranks out
of step, as a failed DiT step does (``ProcessGroup.failed``).
"""
from __future__ import annotations

import torch

from ...models.lq_projector import SHUFFLE, LQProjector, ProjectorState
from ...models.row_bands import RowBands
from .decoders import DecoderSpec, decoder_from
from .parallel import ProcessGroup

KINDS = ("project", "decode")


def _check_in_step(group: ProcessGroup) -> None:
    if group.failed:
        raise RuntimeError(f"the processes of this run are out of step since an earlier failure "
                           f"({group.failed}); start them again")


def _token_rows(tokens: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(B, f*rows*width, C) tokens in (f, y, x) order -> (B, f, rows, width*C): rows on dim -2."""
    b, n, c = tokens.shape
    return tokens.reshape(b, n // (rows * width), rows, width * c)


class ParallelProjector:
    """Rank 0's LQ projector over every rank's band of token rows (``LQProjector.stream``'s place)."""

    def __init__(self, projector: LQProjector, group: ProcessGroup) -> None:
        self.projector, self.group = projector, group

    def stream(self, clip: torch.Tensor, state: ProjectorState) -> torch.Tensor | None:
        _check_in_step(self.group)
        self.group.send(("project", state.clips_seen == 0, tuple(clip.shape), clip.dtype))
        try:
            rows = RowBands(clip.shape[-2] // SHUFFLE, self.group.group)
            band = rows.scatter(clip, clip.shape, clip.dtype, clip.device)
            tokens = self.projector.stream(band, state, rows)
            if tokens is None:
                return None
            width = clip.shape[-1] // SHUFFLE
            whole = rows.gather(_token_rows(tokens, rows.mine, width))
            return whole.reshape(tokens.shape[0], -1, tokens.shape[-1])
        except BaseException as err:
            self.group.failed = f"{type(err).__name__}: {err}"
            raise


class _BandState:
    """Rank 0's decoder state of one stream: its own band's state, and the id the workers know it by."""

    def __init__(self, sid: int, inner: object) -> None:
        self.sid, self.inner, self.new = sid, inner, True


class ParallelDecoder:
    """Rank 0's decoder over every rank's band of latent rows (a ``decoders.Decoder``)."""

    def __init__(self, decoder, group: ProcessGroup) -> None:
        self.decoder, self.group = decoder, group
        self.spec: DecoderSpec = decoder.spec()       # refuses what cannot run on bands (VAE tiles)
        self._streams = 0

    def new_state(self) -> _BandState:
        self._streams += 1
        return _BandState(self._streams, self.decoder.new_state())

    def decode(self, latents: torch.Tensor, cond: torch.Tensor, state: _BandState) -> torch.Tensor:
        _check_in_step(self.group)
        self.group.send(("decode", state.sid, self.spec if state.new else None,
                         tuple(latents.shape), latents.dtype, tuple(cond.shape), cond.dtype))
        state.new = False
        try:
            rows = RowBands(latents.shape[-2], self.group.group)
            lat = rows.scatter(latents, latents.shape, latents.dtype, latents.device)
            cnd = rows.scatter(cond, cond.shape, cond.dtype, cond.device)
            return rows.gather(self.decoder.decode(lat, cnd, state.inner, rows))
        except BaseException as err:
            self.group.failed = f"{type(err).__name__}: {err}"
            raise


class BandWorker:
    """A worker's side of ``ParallelProjector`` and ``ParallelDecoder``: its bands, its states."""

    def __init__(self, group: ProcessGroup, projector: LQProjector, decoder_net) -> None:
        self.group, self.projector, self.decoder_net = group, projector, decoder_net
        self.reset()

    def reset(self) -> None:
        """A run ended: drop every stream's state."""
        self.projector_state = ProjectorState()
        self.decoders: dict[int, tuple[object, object]] = {}

    def handle(self, message: tuple) -> None:
        with torch.no_grad():
            if message[0] == "project":
                self._project(*message[1:])
            elif message[0] == "decode":
                self._decode(*message[1:])
            else:
                raise RuntimeError(f"not a band message: {message[0]!r}")

    def _project(self, new: bool, shape: tuple, dtype: torch.dtype) -> None:
        if new:
            self.projector_state = ProjectorState()
        rows = RowBands(shape[-2] // SHUFFLE, self.group.group)
        if not rows.mine:
            return
        band = rows.scatter(None, shape, dtype, self.group.device)
        tokens = self.projector.stream(band, self.projector_state, rows)
        if tokens is not None:
            rows.gather(_token_rows(tokens, rows.mine, shape[-1] // SHUFFLE))

    def _decode(self, sid: int, spec: DecoderSpec | None, lat_shape: tuple, lat_dtype, cond_shape: tuple,
                cond_dtype) -> None:
        if spec is not None:
            decoder = decoder_from(spec, self.decoder_net)
            self.decoders[sid] = (decoder, decoder.new_state())
        rows = RowBands(lat_shape[-2], self.group.group)
        if not rows.mine:
            return
        decoder, state = self.decoders[sid]
        lat = rows.scatter(None, lat_shape, lat_dtype, self.group.device)
        cnd = rows.scatter(None, cond_shape, cond_dtype, self.group.device)
        rows.gather(decoder.decode(lat, cnd, state, rows))
