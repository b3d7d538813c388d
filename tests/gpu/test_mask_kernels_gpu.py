"""GPU checks of the block-mask bookkeeping kernels (attention/mask_kernels.py) against the torch code
they replace, bit for bit, at the real 768x1408 layer shapes. Skipped without CUDA or Triton."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytest.importorskip("triton")

from comfyui_flashvsr.attention import AttentionDispatcher  # noqa: E402
from comfyui_flashvsr.attention import mask_kernels as mk  # noqa: E402
from comfyui_flashvsr.attention.block_sparse import build_lut  # noqa: E402
from comfyui_flashvsr.models.lcsa import draft_block_mask, local_block_mask, topk_count, topk_ratio_for  # noqa: E402


def sort_threshold(flat, kept):
    return torch.sort(flat, dim=1, descending=True).values[:, kept:kept + 1]


def real_probs(seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(132, 1536, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(264, 1536, device="cuda", generator=g).to(torch.bfloat16)
    local = local_block_mask(6, 11, 11, device="cuda")
    topk = topk_count(66, topk_ratio_for(2.0, 768, 1408))
    return q, k, local, topk


@pytest.mark.parametrize("seed", [0, 1])
def test_triton_draft_selection_equals_the_sort_on_real_rows(seed):
    q, k, local, topk = real_probs(seed)
    _, details = draft_block_mask(q, k, 12, 2, local, topk, return_details=True)
    flat = details["probs"].reshape(24, -1)
    for kept in (0, topk, 17423):
        mask, thr = mk.select_above_kth(flat, kept)
        want = sort_threshold(flat, kept)
        assert torch.equal(thr.view(torch.int32), want.view(torch.int32))
        assert torch.equal(mask, flat > want)


@pytest.mark.parametrize("radix", [False, True])
def test_triton_draft_selection_handles_ties_infinities_and_nan(radix):
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.rand(6, 5000, device="cuda", generator=g)
    x[1] = (x[1] * 4).floor()
    x[2, :4000] = 0.0
    x[3, ::2] = float("-inf")
    x[4] = torch.randn(5000, device="cuda", generator=g)
    x[5, :100] = float("nan")
    for kept in (0, 99, 100, 2500, 4999):
        mask, thr = mk.select_above_kth(x, kept, radix=radix)
        want = sort_threshold(x, kept)
        assert torch.equal(thr.isnan(), want.isnan())
        assert torch.equal(thr.nan_to_num(), want.nan_to_num()) and torch.equal(mask, x > want)


def test_radix_selection_equals_the_sort_on_rows_of_the_4k_shape():
    # 720p->4K: 12 heads x (510 query windows x 2040 key windows) per steady layer
    g = torch.Generator(device="cuda").manual_seed(4)
    scores = torch.randn(12, 510, 2040, device="cuda", generator=g) * 3
    flat = torch.softmax(scores, -1).reshape(12, -1)
    assert flat.shape[1] >= mk.WIDE_ROW
    for kept in (0, 123_456, flat.shape[1] - 1):
        mask, thr = mk.select_above_kth(flat, kept)
        want = sort_threshold(flat, kept)
        assert torch.equal(thr.view(torch.int32), want.view(torch.int32))
        assert torch.equal(mask, flat > want)


def test_triton_lut_and_launch_order_equal_the_torch_code_on_a_real_mask():
    g = torch.Generator(device="cuda").manual_seed(3)
    mask = torch.rand(1, 12, 132, 264, device="cuda", generator=g) < 0.45
    mask[0, 0, 0] = False
    mask[0, 0, 1] = True
    lut, counts = mk.lut_from_mask(mask)
    want_lut, want_counts = build_lut(mask)
    assert torch.equal(lut, want_lut) and torch.equal(counts, want_counts)
    want_order = torch.argsort(counts.reshape(-1), descending=True, stable=True).to(torch.int32)
    assert torch.equal(mk.longest_first_order(counts), want_order)


def test_dispatcher_uses_the_mask_kernels_on_cuda_without_falling_back():
    dispatcher = AttentionDispatcher()
    q, k, local, topk = real_probs(4)
    session = dispatcher.session("disable")
    mask = draft_block_mask(q, k, 12, 2, local, topk, select=session.select_blocks)
    assert torch.equal(mask, draft_block_mask(q, k, 12, 2, local, topk))
    lut, counts = dispatcher.block_lut(mask)
    assert dispatcher.launch_order(counts) is not None
    assert not dispatcher.failures
