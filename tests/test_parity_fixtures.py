"""Parity with the official FlashVSR code on its golden fixtures (tests/fixtures/flashvsr_ref).

Every shipped case, plus every case in the folders listed in $FLASHVSR_FIXTURES, is run through our
engine in float32 and bfloat16 with the case's weights, inputs and noise, and compared stage by stage
with the gates in tests/fixtures/flashvsr_ref/README.md: exact block masks, latents within 2e-4,
final frames >= 90 dB in float32; bf16 final frames >= 40 dB against the float32 reference.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from flashvsr_tests_fixture_run import SHIPPED, case_files, load_case, run_case

CASES = case_files()


def test_the_repository_ships_both_fixture_cases():
    assert [c.name for c in CASES if c.parent == SHIPPED] == ["case_a.json", "case_b.json"]


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((a.double() - b.double())) / torch.linalg.vector_norm(b.double())).item()


@pytest.fixture(scope="module", params=CASES, ids=[c.stem for c in CASES])
def case(request):
    meta = json.loads(request.param.read_text())
    return load_case(request.param.with_suffix(".safetensors"), meta)


@pytest.fixture(scope="module")
def fp32_run(case):
    return run_case(case, torch.float32)


@pytest.fixture(scope="module")
def bf16_run(case):
    return run_case(case, torch.bfloat16)


def test_preprocessing_matches_official_driver(case, fp32_run):
    ours = fp32_run.lq_hr_u8
    t = case.tensors
    if "input/lq_hr_u8" in t:
        assert torch.equal(ours, t["input/lq_hr_u8"])
    else:
        assert torch.equal(ours[:, ::2, ::2, :], t["input/lq_hr_u8_s2"])


def test_projector_tokens_match(case, fp32_run):
    for k, ours in enumerate(fp32_run.stage["lq_latents"]):
        ref = case.tensors[f"fp32/chunk{k}/lq_latents"]
        assert ours.shape == ref.shape
        assert _rel(ours, ref) <= 1e-4, f"chunk {k}"


def test_time_and_prompt_embeddings_match(case, fp32_run):
    assert _rel(fp32_run.consts.t, case.tensors["fp32/t"]) <= 1e-5
    assert _rel(fp32_run.consts.t_mod, case.tensors["fp32/t_mod"]) <= 1e-5


def test_draft_scores_and_thresholds_match(case, fp32_run):
    for k, details in enumerate(fp32_run.draft):
        pre = f"fp32/chunk{k}/layer0/"
        assert _rel(details["pooled_q"], case.tensors[pre + "draft_pooled_q"]) <= 1e-4
        assert _rel(details["pooled_k"], case.tensors[pre + "draft_pooled_k"]) <= 1e-4
        ref_probs = case.tensors[pre + "draft_probs"]
        assert (details["probs"] - ref_probs).abs().max().item() <= 1e-5
        assert _rel(details["thresholds"], case.tensors[pre + "draft_threshold"]) <= 1e-4
        assert torch.equal(details["local_mask"], case.tensors[pre + "local_block_mask"])


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_block_masks_match_every_chunk_and_layer(case, fp32_run, bf16_run, dtype_name):
    run = fp32_run if dtype_name == "fp32" else bf16_run
    names = [n for n in case.tensors if n.startswith(f"{dtype_name}/") and n.endswith("/block_mask")]
    assert names, "the fixture stores no block masks"
    for name in names:
        _, chunk, layer, _ = name.split("/")
        ours = run.masks[(int(chunk[5:]), int(layer[5:]))]
        assert torch.equal(ours, case.tensors[name]), name


def test_chunk_latents_match(case, fp32_run):
    for k, ours in enumerate(fp32_run.stage["latents"]):
        ref = case.tensors[f"fp32/chunk{k}/latents"]
        assert (ours - ref).abs().max().item() <= 2e-4, f"chunk {k}"


def test_decoded_frames_match(case, fp32_run):
    ours = fp32_run.decoded            # (3, T, H, W)
    t = case.tensors
    ref = t["fp32/frames_decoded"][0] if "fp32/frames_decoded" in t else t["fp32/frames_decoded_s4"][0]
    if "fp32/frames_decoded" not in t:
        ours = ours[..., ::4, ::4]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 2e-3


def test_final_frames_match_in_float32(case, fp32_run):
    ours = fp32_run.final              # (3, T, H, W)
    t = case.tensors
    if "fp32/frames_final" in t:
        ref, sub = t["fp32/frames_final"], ours
    else:
        ref, sub = t["fp32/frames_final_s2"], ours[..., ::2, ::2]
        stats = t["fp32/frames_final_stats"]                    # (T, 3, 2): mean, biased std
        flat = ours.permute(1, 0, 2, 3).flatten(2).double()
        assert torch.allclose(flat.mean(-1), stats[..., 0].double(), atol=2e-4)
        assert torch.allclose(flat.std(-1, unbiased=False), stats[..., 1].double(), atol=2e-4)
    assert sub.shape == ref.shape
    assert _psnr(sub, ref) >= 90.0
    assert (sub - ref).abs().max().item() <= 2e-3


def test_bf16_run_is_close_to_float32_reference(case, bf16_run):
    t = case.tensors
    ref = t["fp32/frames_final"] if "fp32/frames_final" in t else t["fp32/frames_final_s2"]
    ours = bf16_run.final.float()
    if "fp32/frames_final" not in t:
        ours = ours[..., ::2, ::2]
    assert not torch.isnan(ours).any()
    assert _psnr(ours, ref) >= 40.0


def test_output_frame_count_is_official(case, fp32_run):
    geom = case.meta["geometry"]
    assert fp32_run.final.shape[1] == geom["F"] - 4


def test_pipeline_model_set_reproduces_the_float32_run(case, fp32_run):
    # fast=True builds the models the way FlashVSR does (on the CPU: one-latent decoder passes, no
    # compilation); the frames must be those of the plain engine run
    piped = run_case(case, torch.float32, fast=True)
    assert piped.final.shape == fp32_run.final.shape
    assert _psnr(piped.final, fp32_run.final) >= 90.0


def test_rebuilt_weights_with_another_hash_are_refused(tmp_path):
    from flashvsr_tests_fixture_run import FixtureWeightsMismatch
    src = SHIPPED / "case_a.json"
    meta = json.loads(src.read_text())
    meta["slim"]["weights_sha256"] = "0" * 64
    with pytest.raises(FixtureWeightsMismatch, match="case_a.safetensors: the weight recipe rebuilt 143 tensors"):
        load_case(src.with_suffix(".safetensors"), meta)


def test_flashvsr_fixtures_adds_case_folders_to_the_shipped_ones(tmp_path, monkeypatch):
    from flashvsr_tests_fixture_run import case_files
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "case_z.json").write_text("{}")
    monkeypatch.setenv("FLASHVSR_FIXTURES", str(tmp_path / "held"))
    assert [c.name for c in case_files()] == ["case_a.json", "case_b.json", "case_z.json"]
