"""Block-sparse attention semantics on the CPU: the masked-SDPA reference against a brute-force
block loop, empty query blocks, bounded memory, the look-up table and the flex BlockMask built from it."""
import pytest
import torch

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher
from comfyui_flashvsr.attention.block_sparse import (BLOCK, build_lut, check_block_sparse_inputs,
                                                     flex_block_mask, masked_reference)


def brute_force(q, k, v, block_mask):
    """Block loop in float64: for each (b, h, query block) softmax over the concatenated selected
    key blocks, zeros where none is selected (Block-Sparse-Attention's empty-row rule)."""
    bsz, heads, lq, dim = q.shape
    out = torch.zeros(q.shape, dtype=torch.float64)
    flags = block_mask.tolist()
    for b in range(bsz):
        for h in range(heads):
            for i in range(lq // BLOCK):
                chosen = [j for j, on in enumerate(flags[b][h][i]) if on]
                if not chosen:
                    continue
                keys = torch.cat([k[b, h, j * BLOCK:(j + 1) * BLOCK] for j in chosen]).double()
                vals = torch.cat([v[b, h, j * BLOCK:(j + 1) * BLOCK] for j in chosen]).double()
                rows = q[b, h, i * BLOCK:(i + 1) * BLOCK].double()
                weights = torch.softmax(rows @ keys.T / dim ** 0.5, dim=-1)
                out[b, h, i * BLOCK:(i + 1) * BLOCK] = weights @ vals
    return out


def random_case(seed, bsz=2, heads=3, nq=3, nk=5, dim=32, density=0.4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, nq * BLOCK, dim, generator=g)
    k = torch.randn(bsz, heads, nk * BLOCK, dim, generator=g)
    v = torch.randn(bsz, heads, nk * BLOCK, dim, generator=g)
    mask = torch.rand(bsz, heads, nq, nk, generator=g) < density
    mask[0, 1, 2] = False                      # always at least one empty query block
    mask[1, 0, 0] = True                       # and one full row
    return q, k, v, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_brute_force_block_loop_on_random_masks(seed):
    q, k, v, mask = random_case(seed)
    out = masked_reference(q, k, v, mask)
    torch.testing.assert_close(out.double(), brute_force(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_empty_query_block_outputs_zero_not_nan():
    q, k, v, mask = random_case(3)
    mask[:, :, 1] = False
    out = masked_reference(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[:, :, BLOCK:2 * BLOCK], torch.zeros_like(out[:, :, BLOCK:2 * BLOCK]))
    assert out[0, 1, 2 * BLOCK:].abs().sum() == 0                    # the row random_case empties


def test_reference_gives_the_same_result_with_a_tiny_memory_budget():
    q, k, v, mask = random_case(4)
    whole = masked_reference(q, k, v, mask)
    stepped = masked_reference(q, k, v, mask, mask_budget=1)        # one query block per SDPA call
    torch.testing.assert_close(stepped, whole, atol=1e-6, rtol=1e-6)


def test_lut_lists_selected_blocks_first_in_ascending_order_with_counts():
    mask = torch.tensor([[[[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]]], dtype=torch.bool)
    lut, counts = build_lut(mask)
    assert lut.dtype == torch.int32 and counts.dtype == torch.int32
    assert counts.tolist() == [[[3, 0, 5]]]
    assert lut[0, 0, 0, :3].tolist() == [1, 3, 4]
    assert lut[0, 0, 2].tolist() == [0, 1, 2, 3, 4]
    assert sorted(lut[0, 0, 0].tolist()) == [0, 1, 2, 3, 4]          # a permutation of the key blocks


def test_lut_of_a_random_mask_reproduces_the_mask():
    _, _, _, mask = random_case(5, nq=7, nk=11)
    lut, counts = build_lut(mask)
    rebuilt = torch.zeros_like(mask)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in mask.shape[:3]]):
        b, h, i = idx.tolist()
        rebuilt[b, h, i, lut[b, h, i, :counts[b, h, i]].long()] = True
    assert torch.equal(rebuilt, mask)


def test_flex_block_mask_selects_exactly_the_masked_blocks_as_full_blocks():
    _, _, _, mask = random_case(6, nq=4, nk=6)
    lut, counts = build_lut(mask)
    block_mask = flex_block_mask(lut, counts, 4 * BLOCK, 6 * BLOCK)
    assert torch.equal(block_mask.full_kv_num_blocks, counts)
    assert int(block_mask.kv_num_blocks.sum()) == 0                 # no partial blocks: no mask_mod work
    assert torch.equal(block_mask.to_dense().bool(), mask)


@pytest.mark.parametrize("change, message", [
    (dict(lq=200), "multiples of 128"),
    (dict(mask_dtype=torch.uint8), "block_mask must be bool"),
    (dict(mask_shape=(1, 2, 2, 2)), r"block_mask must be bool \(1, 2, 2, 3\)"),
    (dict(dk=16), "k and v must be"),
])
def test_block_sparse_input_errors_name_the_problem(change, message):
    lq, dk = change.get("lq", 256), change.get("dk", 32)
    q, k, v = torch.zeros(1, 2, lq, 32), torch.zeros(1, 2, 384, dk), torch.zeros(1, 2, 384, dk)
    mask = torch.zeros(change.get("mask_shape", (1, 2, lq // BLOCK, 3)), dtype=change.get("mask_dtype", torch.bool))
    with pytest.raises(ValueError, match=message):
        check_block_sparse_inputs(q, k, v, mask)


def test_dispatcher_block_sparse_on_cpu_runs_the_reference_when_configured_alone():
    q, k, v, mask = random_case(7)
    session = AttentionDispatcher(AttentionConfig(sparse_backends=("reference",))).session("disable")
    out = session.block_sparse(q, k, v, mask)
    torch.testing.assert_close(out.double(), brute_force(q, k, v, mask), atol=1e-5, rtol=1e-5)
    assert session.summary() == "attention: reference (sparse)"
