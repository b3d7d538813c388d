"""The LQ projector and the decoders on row bands over several processes (issue #16), on the CPU.

Each test starts gloo ranks (tests/bands_rank.py) that run the projector, the TCDecoder and the
Wan VAE decoder over several chunks, alone on rank 0 and split into row bands over all ranks.
With kernels whose rounding does not depend on the call's size (``bands_rank.row_stable_kernels``)
the bands must give the one-process values bit for bit; with torch's own kernels, within the
float32 rounding that a kernel chosen by shape brings (``BAND_TOLERANCE``).
"""
import json
from pathlib import Path

import pytest
import torch

from comfyui_flashvsr.flashvsr.engine.decoders import DecoderSpec, FullDecoder, decoder_from
from comfyui_flashvsr.models.row_bands import band_split
from flashvsr_tests_parallel_checks import BAND_TOLERANCE, run_ranks
from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig
from comfyui_flashvsr.models.wan_vae import WanVAEConfig, WanVAEDecoder

RANK_SCRIPT = Path(__file__).with_name("bands_rank.py")


def _bands(tmp_path, world: int, latent, nets=("projector", "tc", "vae"), chunks=(3, 2, 2),
           row_stable: bool = True) -> dict:
    job = {"init": f"file://{tmp_path}/store", "world": world, "out": str(tmp_path), "nets": list(nets),
           "latent": list(latent), "chunks": list(chunks), "row_stable": row_stable}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    for rank, (code, out) in enumerate(run_ranks(RANK_SCRIPT, path, world, timeout=90)):
        assert code == 0, f"rank {rank}:\n{out}"
    got = torch.load(tmp_path / "bands.pt")
    assert sorted(got) == sorted(nets)
    return got


def _assert_equal(got: dict) -> None:
    for name, (alone, together) in got.items():
        assert alone.shape == together.shape, name
        assert torch.equal(alone, together), f"{name}: max difference {(alone - together).abs().max()}"


def test_two_bands_give_the_one_process_values_bit_for_bit(tmp_path):
    # 32x48 frames: 4 latent rows (2/2), 2 token rows (1/1): every band is one halo away from
    # both frame edges; chunks of 3, 2, 2 latents carry the causal caches across calls (7 clips
    # for the projector, the first of which only primes them)
    got = _bands(tmp_path, 2, (4, 6))
    assert got["tc"][0].shape == (1, 3, 25, 32, 48) and got["projector"][0].shape == (1, 6 * 6, 24)
    _assert_equal(got)


def test_three_bands_of_unequal_heights_give_the_one_process_values_bit_for_bit(tmp_path):
    # 10 latent rows: 4/3/3; 5 token rows: 2/2/1
    assert band_split(10, 3) == [4, 3, 3] and band_split(5, 3) == [2, 2, 1]
    _assert_equal(_bands(tmp_path, 3, (10, 6), chunks=(2, 2)))


def test_a_frame_with_fewer_rows_than_ranks_leaves_the_last_ranks_idle(tmp_path):
    # 2 latent rows over 3 ranks: 1/1/0 (rank 2 skips every decoder call); 1 token row: 1/0/0
    # (the projector runs on rank 0 alone, with replicate padding at both edges)
    assert band_split(2, 3) == [1, 1, 0] and band_split(1, 3) == [1, 0, 0]
    _assert_equal(_bands(tmp_path, 3, (2, 6), chunks=(2, 2)))


def test_bands_with_torchs_own_kernels_stay_within_float32_rounding(tmp_path):
    got = _bands(tmp_path, 2, (16, 6), nets=("tc", "vae"), chunks=(6, 2), row_stable=False)
    for name, (alone, together) in got.items():
        worst = (alone - together).abs().max().item()
        assert worst <= BAND_TOLERANCE * max(1.0, alone.abs().max().item()), f"{name}: max difference {worst}"


def test_band_split_is_contiguous_and_gives_the_first_ranks_one_more():
    assert band_split(96, 4) == [24] * 4
    assert band_split(16, 3) == [6, 5, 5]
    assert band_split(8, 12) == [1] * 8 + [0] * 4
    with pytest.raises(ValueError, match="cannot split 0 rows over 2 processes"):
        band_split(0, 2)


def test_wan_vae_tiles_do_not_combine_with_bands():
    net = WanVAEDecoder(WanVAEConfig(base_dim=4, num_res_blocks=0))
    with pytest.raises(ValueError, match="turn vae_tiling off"):
        FullDecoder(net, tiled=True).spec()
    assert FullDecoder(net).spec() == DecoderSpec("vae")


def test_a_worker_with_another_modes_decoder_is_refused():
    tc = TCDecoder(TCDecoderConfig(channels=(16, 8, 8, 8)))
    with pytest.raises(RuntimeError, match="rank 0 decodes with the WanVAEDecoder, but this process loaded the "
                                           "TCDecoder: start every process with the same mode"):
        decoder_from(DecoderSpec("vae"), tc)
    assert decoder_from(DecoderSpec("tc", 1, 1), tc).passes.tail_frames == 1
