"""Cheaper tiles (issue #14): each tile upsamples only its own window, tiles run in batches through
the projector, the DiT and the decoders, and the DiT's blocks can stream from host memory; each
gives the frames of one whole-frame upsampling and one tile at a time (CPU, float32, small widths:
bitwise; the decoders run their convolutions tile by tile off CUDA, models/tile_batch.PerTile)."""
from __future__ import annotations

import pytest
import torch

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.engine import memory
from comfyui_flashvsr.flashvsr.engine.memory import TileShape
from comfyui_flashvsr.flashvsr.engine.preprocess import Upsampler, Window, plan_geometry
from comfyui_flashvsr.flashvsr.engine.random_weights import MICRO_PROMPT, MICRO_TCDECODER, make_random
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR, _tiles
from comfyui_flashvsr.models import tile_batch
from comfyui_flashvsr.models.block_stream import set_streaming
from comfyui_flashvsr.models.dit import DiTConfig, WanDiT
from comfyui_flashvsr.models.lq_projector import LQProjector, LQProjectorConfig, ProjectorState
from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderPasses, TCDecoderState
from comfyui_flashvsr.models.wan_vae import VAETiling, WanVAEConfig, WanVAEDecodeOptions, WanVAEDecoder

# Two heads (the fold puts tile t's head h at t*heads + h) and three blocks (the streamed blocks'
# two slots each serve more than one block per chunk).
DIT = DiTConfig(dim=256, ffn_dim=128, text_dim=32, num_heads=2, num_layers=3)
PROJECTOR = LQProjectorConfig(hidden1=16, hidden2=16, out_dim=256)
TILE = TileShape(256, 256, 128)          # 2 tiles side by side on the 256 x 384 model frame


@pytest.mark.parametrize("h, w, scale", [(72, 72, 4.0), (45, 80, 3.0), (100, 70, 2.5)])
def test_a_tile_upsamples_to_the_crop_of_the_whole_upsampled_frame(h, w, scale):
    geom = plan_geometry(h, w, scale, False)
    frame = torch.rand((h, w, 3), generator=torch.Generator().manual_seed(1))
    whole = Upsampler(geom, "cpu", torch.float32)(frame)
    shape = TileShape(256, 256, 128)
    for tile in _tiles(geom.model_h, geom.model_w, shape):      # edge tiles include the replicate padding
        window = Upsampler(geom, "cpu", torch.float32, tile.window())(frame)
        assert torch.equal(window, whole[:, tile.top:tile.top + tile.height, tile.left:tile.left + tile.width])


def test_a_tile_reads_only_the_input_band_it_needs():
    geom = plan_geometry(180, 320, 4.0, False)          # 720 x 1280
    up = Upsampler(geom, "cpu", torch.float32, Window(256, 512, 256, 256))
    (r0, r1), (c0, c1) = up._row_band, up._col_band
    assert r1 - r0 <= 256 // 4 + 4 and c1 - c0 <= 256 // 4 + 4     # the window / 4 plus the bicubic support


def test_fold_puts_each_tiles_heads_side_by_side_and_unfold_inverts_it():
    tiles, windows, c = 3, 4, 8
    x = torch.arange(tiles * windows * 128 * c, dtype=torch.float32).view(tiles * windows, 128, c)
    folded = tile_batch.fold(x, tiles)
    assert folded.shape == (windows, 128, tiles * c)
    assert torch.equal(folded[:, :, c:2 * c], x[windows:2 * windows])          # tile 1's channels
    tokens = folded.reshape(1, windows * 128, tiles * c)
    assert torch.equal(tile_batch.unfold(tokens, tiles), x.view(tiles, windows * 128, c))


def test_projector_batch_gives_each_clips_tokens():
    torch.manual_seed(0)
    for taps in (False, True):
        proj = LQProjector(PROJECTOR, causal=True)
        if taps:
            proj.use_conv_taps()
        together, alone = ProjectorState(), [ProjectorState(), ProjectorState()]
        for k in range(3):
            clips = torch.randn(2, 3, 1 if k == 0 else 4, 64, 64)
            batch = proj.stream(clips, together)
            singles = [proj.stream(clips[i:i + 1], alone[i]) for i in range(2)]
            if batch is None:
                assert singles == [None, None]
                continue
            if taps:      # CUDA's path: one 2-D convolution over the batch sums in its own order
                torch.testing.assert_close(batch, torch.cat(singles), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(batch, torch.cat(singles))


def _stream(decode, new_state, latents, cond, chunks):
    """Decode (B, 16, T, h, w) chunk by chunk, the batch as one stream of tiles: (B, 3, frames, H, W)."""
    state, out, a = new_state(), [], 0
    for n in chunks:
        out.append(decode(latents[:, :, a:a + n], cond[:, :, 4 * a:4 * (a + n)], state))
        a += n
    return torch.cat(out, dim=2)


def _alone(decode, new_state, latents, cond, chunks):
    return torch.cat([_stream(decode, new_state, latents[i:i + 1], cond[i:i + 1], chunks)
                      for i in range(latents.shape[0])])


@pytest.mark.parametrize("passes", [TCDecoderPasses(), TCDecoderPasses(latents=1, tail_frames=1),
                                    TCDecoderPasses(latents=2, tail_frames=3)])
def test_tcdecoder_batch_of_tiles_gives_each_tiles_frames_alone(passes):
    gen = torch.Generator().manual_seed(5)
    net = make_random(lambda: TCDecoder(MICRO_TCDECODER), "cpu", torch.float32, gen)
    lat = torch.randn(3, 16, 10, 4, 6, generator=gen)
    cond = torch.rand(3, 3, 40, 32, 48, generator=gen) * 2 - 1

    def decode(z, c, state):
        return net.decode_chunk(z, c, state, passes)
    batch = _stream(decode, TCDecoderState, lat, cond, [6, 2, 2])
    assert batch.shape == (3, 3, 37, 32, 48)
    assert torch.equal(batch, _alone(decode, TCDecoderState, lat, cond, [6, 2, 2]))


def test_tcdecoder_state_refuses_another_batch_size():
    net = make_random(lambda: TCDecoder(MICRO_TCDECODER), "cpu", torch.float32, torch.Generator().manual_seed(1))
    state = TCDecoderState()
    net.decode_chunk(torch.zeros(2, 16, 1, 2, 2), torch.zeros(2, 3, 4, 16, 16), state)
    with pytest.raises(ValueError, match="holds 2 tiles' memory, but the chunk has 1"):
        net.decode_chunk(torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 3, 4, 16, 16), state)


def test_wan_vae_state_refuses_another_batch_size():
    net = make_random(lambda: WanVAEDecoder(WanVAEConfig(base_dim=8)), "cpu", torch.float32,
                      torch.Generator().manual_seed(1))
    state = net.new_state()
    net.decode_chunk(torch.zeros(2, 16, 1, 2, 2), state)
    with pytest.raises(ValueError, match="holds 2 tiles' caches, but the chunk has 1"):
        net.decode_chunk(torch.zeros(1, 16, 1, 2, 2), state)


def test_tcdecoder_passes_join_in_the_tails_memory_layout():
    from comfyui_flashvsr.models.tcdecoder import _join_passes
    outs = [torch.randn(2 * k, 3, 4, 5).contiguous(memory_format=torch.channels_last) for k in (1, 2)]
    x = _join_passes(outs, 2)
    assert x.shape == (2, 3, 3, 4, 5) and x.stride(2) == 1          # channels stay innermost
    assert torch.equal(x[1, 1:], outs[1][2:])


@pytest.mark.parametrize("options", [WanVAEDecodeOptions(), WanVAEDecodeOptions(max_pass_elements=2000),
                                     WanVAEDecodeOptions(tiling=VAETiling((4, 4), (2, 2)))],
                         ids=["one-pass", "time-split", "vae-tiles"])
def test_wan_vae_batch_of_tiles_gives_each_tiles_frames_alone(options):
    gen = torch.Generator().manual_seed(6)
    net = make_random(lambda: WanVAEDecoder(WanVAEConfig(base_dim=8)), "cpu", torch.float32, gen)
    lat = torch.randn(2, 16, 9, 4, 6, generator=gen)
    cond = torch.zeros(2, 3, 36, 32, 48)        # the Wan VAE ignores the condition

    def decode(z, c, state):
        return net.decode_chunk(z, state)
    batch = _stream(decode, lambda: net.new_state(options), lat, cond, [5, 2, 2])
    assert batch.shape == (2, 3, 33, 32, 48)
    assert torch.equal(batch, _alone(decode, lambda: net.new_state(options), lat, cond, [5, 2, 2]))


@pytest.fixture(scope="module")
def small():
    gen = torch.Generator("cpu").manual_seed(3)
    dit = make_random(lambda: WanDiT(DIT), "cpu", torch.float32, gen)
    projector = make_random(lambda: LQProjector(PROJECTOR, causal=True), "cpu", torch.float32, gen)
    decoder = make_random(lambda: TCDecoder(MICRO_TCDECODER), "cpu", torch.float32, gen)
    prompt = torch.randn(MICRO_PROMPT, generator=gen)
    return FlashVSR(dit, projector, decoder, prompt, "tiny", "v1.1", "cpu", torch.float32)


def run(pipe, monkeypatch, batch: int, streamed: bool = False) -> torch.Tensor:
    frames = torch.rand((17, 48, 96, 3), generator=torch.Generator().manual_seed(4))   # 3 chunks
    plan = memory.Plan(TILE, 2, 0, None, True, batch=batch, streamed=streamed)
    with monkeypatch.context() as m:
        m.setattr(FlashVSR, "_plan", lambda self, geom, cfg, budget: plan)
        result = pipe.upscale(frames, UpscaleConfig(tile_overlap=TILE.overlap))
    assert result.stats.plan == plan.describe()
    return result.frames


@pytest.fixture(scope="module")
def one_at_a_time(small):
    with pytest.MonkeyPatch.context() as m:
        return run(small, m, batch=1)


def test_a_batch_of_tiles_gives_the_frames_of_one_tile_at_a_time(small, one_at_a_time, monkeypatch):
    assert torch.equal(run(small, monkeypatch, batch=2), one_at_a_time)


@pytest.mark.parametrize("mode", ["tiny-long", "full"])
def test_a_batch_of_tiles_through_each_decoder_gives_the_frames_of_one_tile_at_a_time(mode, monkeypatch):
    gen = torch.Generator("cpu").manual_seed(7)
    dit = make_random(lambda: WanDiT(DIT), "cpu", torch.float32, gen)
    projector = make_random(lambda: LQProjector(PROJECTOR, causal=True), "cpu", torch.float32, gen)
    net = TCDecoder(MICRO_TCDECODER) if mode == "tiny-long" else WanVAEDecoder(WanVAEConfig(base_dim=8))
    decoder = make_random(lambda: net, "cpu", torch.float32, gen)
    pipe = FlashVSR(dit, projector, decoder, torch.randn(MICRO_PROMPT, generator=gen), mode, "v1.1",
                    "cpu", torch.float32)
    assert torch.equal(run(pipe, monkeypatch, batch=2), run(pipe, monkeypatch, batch=1))


def test_streamed_blocks_give_the_frames_of_blocks_on_the_device(small, one_at_a_time, monkeypatch):
    try:
        frames = run(small, monkeypatch, batch=2, streamed=True)
        assert small.dit.streamed is not None and len(small.dit.streamed) == DIT.num_layers
    finally:
        set_streaming(small.dit, False, small.device)
    assert small.dit.streamed is None
    assert torch.equal(frames, one_at_a_time)


def test_streamed_blocks_feed_the_traced_block_steps_like_resident_ones(small, monkeypatch):
    """The steps take the weights as arguments, so one traced graph serves both slots (dynamo with
    the eager backend: the tracing and guards of the CUDA fast path, without a compiler on the CPU)."""
    import dataclasses
    from comfyui_flashvsr.models import dit_ops
    torch._dynamo.reset()
    steps = dit_ops.BlockSteps(*(torch.compile(getattr(dit_ops.FAST, f.name), backend="eager", fullgraph=True)
                                 for f in dataclasses.fields(dit_ops.BlockSteps)))
    real = FlashVSR.engine_models
    monkeypatch.setattr(FlashVSR, "engine_models",
                        lambda self, cfg: dataclasses.replace(real(self, cfg), dit_steps=steps))
    resident = run(small, monkeypatch, batch=2)
    try:
        streamed = run(small, monkeypatch, batch=2, streamed=True)
    finally:
        set_streaming(small.dit, False, small.device)
    assert torch.equal(streamed, resident)


def test_compiled_tcdecoder_passes_take_a_batch_in_one_graph_per_batch_size():
    """The CUDA passes (FlashVSR._compiled_tc: the body and the folded tail) traced by dynamo with a
    counting eager backend: a batch of tiles is one graph without breaks (fullgraph), compiled once
    per batch size, with the eager functions' results."""
    gen = torch.Generator().manual_seed(8)
    net = make_random(lambda: TCDecoder(MICRO_TCDECODER), "cpu", torch.float32, gen)
    weights = net.fast_tail_weights()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    body = torch.compile(net.run_body, backend=backend, fullgraph=True, dynamic=False)
    tail = torch.compile(lambda x: net.run_tail_subpixel(x, weights), backend=backend, fullgraph=True, dynamic=False)
    for tiles in (2, 3):
        memory = [torch.randn(s, generator=gen) for s in net.memory_shapes(2, 3, tiles)]
        for _ in range(3):                       # one latent per pass, as the pipeline runs
            x = torch.randn(tiles, MICRO_TCDECODER.latent_channels, 2, 3, generator=gen)
            y, new = body(x, memory)
            y_eager, new_eager = net.run_body(x, memory)
            assert torch.equal(y, y_eager) and all(map(torch.equal, new, new_eager))
            assert torch.equal(tail(y), net.run_tail_subpixel(y, weights))
            memory = new
    assert len(graphs) == 4                      # body and tail, for 2 and for 3 tiles
