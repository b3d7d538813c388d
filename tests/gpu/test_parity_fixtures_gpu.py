"""The official golden fixtures through the pipeline's CUDA fast path (compiled DiT glue, stacked-tap
projector, compiled decoder passes) with the block-sparse backend the dispatcher picks on this GPU
(FlashAttention-4 on Hopper when installed, else our Triton kernels): bf16 frames must meet the
fixtures' bf16 gate against the float32 reference (tests/fixtures/flashvsr_ref/README.md). Skipped
without CUDA."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from flashvsr_tests_fixture_run import case_files, load_case, run_case  # noqa: E402

BF16_GATE_DB = 40.0
CASES = case_files()


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


@pytest.fixture(scope="module", params=CASES, ids=[c.stem for c in CASES])
def case(request):
    return load_case(request.param.with_suffix(".safetensors"), json.loads(request.param.read_text()))


@pytest.mark.parametrize("sage", ["disable", "enable"])
def test_fast_path_on_cuda_meets_the_bf16_gate(case, sage):
    from comfyui_flashvsr.attention import AttentionDispatcher

    run = run_case(case, torch.bfloat16, device="cuda", sageattention=sage, fast=True)
    t = case.tensors
    ref = t["fp32/frames_final"] if "fp32/frames_final" in t else t["fp32/frames_final_s2"]
    ours = run.final.float()
    if "fp32/frames_final" not in t:
        ours = ours[..., ::2, ::2]
    sparse = [name.split("/", 1)[1] for name in run.attention["calls"] if name.startswith("block_sparse/")]
    psnr = _psnr(ours, ref)
    print(f"{case.meta.get('case')} sage={sage}: {psnr:.2f} dB, block-sparse backends {sparse}")
    assert not torch.isnan(ours).any()
    assert psnr >= BF16_GATE_DB, f"{psnr:.2f} dB with {sparse}"
    assert "reference" not in sparse, f"the fast path fell back to the reference: {run.attention}"
    if AttentionDispatcher().fa4_serves(torch.device("cuda"), torch.bfloat16):
        assert sparse == ["fa4"], sparse


def test_int8_kv_values_meet_the_bf16_gate_where_the_int8_kernel_runs(case):
    """``kv_int8_values`` (keys and values of the KV cache in int8, read by the INT8 kernel): the same
    gate as the bf16 path against the official float32 frames, and the kernel really kept them."""
    from comfyui_flashvsr.attention import AttentionDispatcher

    if AttentionDispatcher().fa4_serves(torch.device("cuda"), torch.bfloat16):
        pytest.skip("FA4 serves block-sparse calls here and reads no int8 values (run without FA4)")
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("int8 values are read by the INT8 kernel on Hopper only")
    run = run_case(case, torch.bfloat16, device="cuda", sageattention="enable", fast=True, kv_int8_values=True)
    t = case.tensors
    ref = t["fp32/frames_final"] if "fp32/frames_final" in t else t["fp32/frames_final_s2"]
    ours = run.final.float()
    if "fp32/frames_final" not in t:
        ours = ours[..., ::2, ::2]
    psnr = _psnr(ours, ref)
    print(f"{case.meta.get('case')} int8 keys+values: {psnr:.2f} dB, {run.attention.get('int8_values')}")
    assert run.attention["int8_values"] == {"asked": True, "kept": True}, run.attention
    assert psnr >= BF16_GATE_DB, f"{psnr:.2f} dB with int8 values"
