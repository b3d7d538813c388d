"""The pure-PyTorch block-sparse path (attention/gathered.py): equal to the masked-SDPA reference,
exact zeros for empty query blocks, uneven counts, bounded chunks, the KV ring's strided layout, and
the packed (varlen) index arithmetic through a stand-in for torch's CUDA-only varlen kernel."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from comfyui_flashvsr.attention import AttentionDispatcher, gathered
from comfyui_flashvsr.attention.block_sparse import BLOCK, build_lut, masked_reference


def case(seed, bsz=1, heads=3, nq=4, nk=6, dim=32, density=0.45, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, nq * BLOCK, dim, generator=g).to(dtype)
    k = torch.randn(bsz, heads, nk * BLOCK, dim, generator=g).to(dtype)
    v = torch.randn(bsz, heads, nk * BLOCK, dim, generator=g).to(dtype)
    mask = torch.rand(bsz, heads, nq, nk, generator=g) < density
    mask[0, 0, 1] = False                       # an empty query block
    mask[0, 1, 2] = True                        # a full row next to sparse ones: uneven counts
    return q, k, v, mask


def run(q, k, v, mask, **kw):
    lut, counts = build_lut(mask)
    return gathered.gathered_attention(q, k, v, lut, counts, **kw)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gathered_equals_the_reference_in_float32(seed):
    q, k, v, mask = case(seed, bsz=2)
    torch.testing.assert_close(run(q, k, v, mask), masked_reference(q, k, v, mask), atol=2e-6, rtol=2e-6)


def test_gathered_bfloat16_is_within_bf16_noise_of_float32():
    q, k, v, mask = case(3, dtype=torch.bfloat16)
    ref = masked_reference(q.float(), k.float(), v.float(), mask)
    err = (run(q, k, v, mask).float() - ref).norm() / ref.norm()
    assert err < 8e-3


def test_empty_query_blocks_are_exactly_zero_and_no_nan():
    q, k, v, mask = case(4)
    mask[:, 2, :] = False                       # a whole head with nothing selected
    out = run(q, k, v, mask)
    assert not out.isnan().any()
    assert torch.equal(out[0, 0, BLOCK:2 * BLOCK], torch.zeros(BLOCK, q.shape[-1]))
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))


def test_tiny_budget_gives_the_same_result_one_row_per_chunk():
    q, k, v, mask = case(5)
    whole = run(q, k, v, mask)
    torch.testing.assert_close(run(q, k, v, mask, budget_bytes=1), whole, atol=1e-6, rtol=1e-6)


def test_chunk_plan_covers_every_row_once_and_respects_the_budget():
    counts = np.array([3, 0, 7, 7, 1, 2, 5, 0, 0, 4])
    chunks = gathered.plan_chunks(counts, blocks_per_chunk=15)
    assert [r for r0, r1 in chunks for r in range(r0, r1)] == list(range(len(counts)))
    assert all((r1 - r0) * counts.max() <= 15 for r0, r1 in chunks)
    assert gathered.plan_chunks(counts, blocks_per_chunk=1) == [(i, i + 1) for i in range(len(counts))]


def test_kv_ring_layout_strided_views_and_free_slots():
    """The DiT passes (1, H, L, D) views of (L, H*D) storage (heads_view) and never selects the
    ring's free slots; the gathered path must read the views in place."""
    heads, dim, nq, nk = 3, 32, 4, 9
    g = torch.Generator().manual_seed(6)
    q_store = torch.randn(nq * BLOCK, heads * dim, generator=g)
    k_store = torch.randn(nk * BLOCK, heads * dim, generator=g)
    v_store = torch.randn(nk * BLOCK, heads * dim, generator=g)
    view = lambda x: x.reshape(1, -1, heads, dim).transpose(1, 2)      # noqa: E731
    q, k, v = view(q_store), view(k_store), view(v_store)
    assert not k.is_contiguous()
    mask = torch.rand(1, heads, nq, nk, generator=g) < 0.5
    mask[..., 3:6] = False                                              # a free slot of 3 windows
    ref = masked_reference(q.contiguous(), k.contiguous(), v.contiguous(), mask)
    torch.testing.assert_close(run(q, k, v, mask), ref, atol=2e-6, rtol=2e-6)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, seqused_k=None, block_table=None):
    """torch's varlen_attn semantics on the CPU: one SDPA per packed sequence, 0 for empty keys;
    with ``block_table``, ``k``/``v`` are (pages, page_size, 1, D) pools read through the table."""
    out = torch.zeros_like(q)
    for i in range(len(cu_q) - 1):
        qs = slice(int(cu_q[i]), int(cu_q[i + 1]))
        if block_table is None:
            ks = slice(int(cu_k[i]), int(cu_k[i + 1]))
            keys, vals = k[ks], v[ks]
        else:
            used = int(seqused_k[i])
            pages = block_table[i, :-(-used // k.shape[1])].long()
            keys, vals = (t[pages].reshape(-1, 1, t.shape[-1])[:used] for t in (k, v))
        assert int(cu_q[i + 1] - cu_q[i]) <= max_q and keys.shape[0] <= max_k
        if keys.shape[0]:
            out[qs] = F.scaled_dot_product_attention(q[qs].transpose(0, 1), keys.transpose(0, 1),
                                                     vals.transpose(0, 1), scale=scale).transpose(0, 1)
    return out


def test_varlen_packing_equals_the_reference(monkeypatch):
    monkeypatch.setattr(gathered, "varlen_function", lambda: fake_varlen)
    q, k, v, mask = case(7, bsz=2, heads=2, nq=5, nk=7)
    ref = masked_reference(q, k, v, mask)
    torch.testing.assert_close(run(q, k, v, mask, method="varlen"), ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(run(q, k, v, mask, method="varlen", budget_bytes=1), ref, atol=2e-6, rtol=2e-6)


def test_cpu_dispatcher_runs_the_gathered_path_and_reports_it():
    q, k, v, mask = case(8)
    session = AttentionDispatcher().session("disable")
    out = session.block_sparse(q, k, v, mask)
    torch.testing.assert_close(out, masked_reference(q, k, v, mask), atol=2e-6, rtol=2e-6)
    assert "block_sparse/gather" in session.report()["calls"]
    assert session.summary() == "attention: gather (sparse)"


@pytest.mark.parametrize("layout", ["plain", "ring"])
def test_paged_block_table_equals_the_reference(monkeypatch, layout):
    monkeypatch.setattr(gathered, "varlen_function", lambda: fake_varlen)
    q, k, v, mask = case(9, bsz=2, heads=2, nq=5, nk=7)
    if layout == "ring":                         # (B, L, H, D) storage, as the DiT's KV ring
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out = gathered.paged_attention(q, k, v, *build_lut(mask))
    torch.testing.assert_close(out, masked_reference(q, k, v, mask), atol=2e-6, rtol=2e-6)
    assert torch.equal(out[0, 0, BLOCK:2 * BLOCK], torch.zeros(BLOCK, q.shape[-1]))


def test_paged_path_is_refused_off_cuda_with_the_reason():
    assert "CUDA only" in gathered.paged_refusal(torch.zeros(1))


def test_paged_path_is_refused_where_varlen_has_no_block_table(monkeypatch):
    """torch 2.11's varlen_attn has neither block_table nor seqused_k (a TypeError on the GPU)."""
    def old_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None):
        raise AssertionError("never called")

    monkeypatch.setattr(gathered, "varlen_function", lambda: old_varlen)
    q = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert "no block_table" in gathered.paged_refusal(q)
    monkeypatch.setattr(gathered, "varlen_function", lambda: fake_varlen)
    assert gathered.paged_refusal(q) is None


def test_a_build_without_the_varlen_kernel_still_gets_the_gathered_path(monkeypatch, caplog):
    """Windows builds may lack torch's flash kernels: the varlen call raises once, the dispatcher
    then runs the gathered blocks through SDPA for that shape, never the reference."""
    from comfyui_flashvsr.attention import dispatch

    def missing(*args, **kwargs):
        raise NotImplementedError("Could not run 'aten::_flash_attention_forward' with arguments from the 'CUDA' backend")

    monkeypatch.setattr(dispatch, "varlen_refusal", lambda q: None)       # as on CUDA with half tensors
    monkeypatch.setattr(gathered, "varlen_function", lambda: missing)
    q, k, v, mask = case(10)
    dispatcher = AttentionDispatcher()
    monkeypatch.setattr(dispatcher, "sparse_order", lambda device: ("gather-varlen", "gather", "reference"))
    session = dispatcher.session("disable")
    for _ in range(2):
        out = session.block_sparse(q, k, v, mask)
    torch.testing.assert_close(out, masked_reference(q, k, v, mask), atol=2e-6, rtol=2e-6)
    assert session.summary() == "attention: gather (sparse)"
    assert sum("gather-varlen failed" in r.message for r in caplog.records) == 1


def test_cuda_chunks_grow_to_two_query_blocks_per_sm_within_a_quarter_of_free_memory(monkeypatch):
    from comfyui_flashvsr.attention import gathered as g
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(multi_processor_count=132))
    block = 2 * 128 * 128 * 2                                   # bf16 key + value block
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (80 << 30, 80 << 30))
    assert g.chunk_blocks(512 << 20, block, 120, cuda) == 2 * 132 * 120          # memory allows it
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1 << 30, 80 << 30))
    assert g.chunk_blocks(512 << 20, block, 120, cuda) == (512 << 20) // block     # never below the budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (4 << 30, 80 << 30))
    assert g.chunk_blocks(512 << 20, block, 120, cuda) == (1 << 30) // block        # a quarter of free memory
    assert g.chunk_blocks(512 << 20, block, 120, torch.device("cpu")) == (512 << 20) // block
