"""The FlashAttention-4 block-sparse backend without FA4 or a GPU: its probe, its eligibility rules,
the arguments it hands to FA4 (our LUT as FA4's "full block" lists, transposed views, no copies), and
the dispatcher's fallback and negative cache when it raises."""
import logging
import sys
import types

import pytest
import torch

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher, dispatch, fa4
from comfyui_flashvsr.attention.block_sparse import BLOCK, build_lut, masked_reference


class FakeCuda:
    """Just what fa4_refusal reads of a CUDA tensor."""

    def __init__(self, dtype=torch.bfloat16, dim=128, last_stride=1):
        self.device, self.dtype, self.shape, self._last = torch.device("cuda"), dtype, (1, 12, 8448, dim), last_stride

    def stride(self, i):
        return self._last


def fake_probe(fn=None):
    tensors = types.SimpleNamespace          # stands in for BlockSparseTensorsTorch (keyword fields)
    return fa4.FA4Probe(True, "4.0.0b36", None, fn or (lambda *a, **k: None), tensors)


def test_probe_says_why_when_flash_attn_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)
    probe = fa4.detect_fa4()
    assert not probe.available and "import flash_attn.cute failed" in probe.reason
    assert "unavailable" in probe.describe()


def test_probe_accepts_a_module_with_the_two_entry_points(monkeypatch):
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_func = lambda *a, **k: None
    sparsity = types.ModuleType("flash_attn.cute.block_sparsity")
    sparsity.BlockSparseTensorsTorch = tuple
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.block_sparsity", sparsity)
    probe = fa4.detect_fa4()
    assert probe.available and probe.fn is cute.flash_attn_func and probe.tensors is tuple


@pytest.mark.parametrize("capability, allowed", [((8, 0), False), ((8, 6), False), ((8, 9), False),
                                                 ((9, 0), True), ((10, 0), True), ((12, 0), False)])
def test_eligible_only_where_fa4_has_a_block_sparse_forward(capability, allowed):
    t = FakeCuda()
    why = fa4.fa4_refusal(fake_probe(), t, t, t, capability)
    assert (why is None) == allowed
    if not allowed:
        assert f"sm{capability[0]}{capability[1]}" in why


@pytest.mark.parametrize("tensor, message", [(FakeCuda(torch.float32), "float16 or bfloat16"),
                                             (FakeCuda(dim=96), "head_dim 96"),
                                             (FakeCuda(last_stride=2), "not contiguous")])
def test_refusals_name_the_problem(tensor, message):
    assert message in fa4.fa4_refusal(fake_probe(), tensor, tensor, tensor, (9, 0))


def test_refuses_cpu_tensors_and_an_unavailable_probe():
    q = torch.zeros(1, 1, BLOCK, 128)
    assert "CUDA only" in fa4.fa4_refusal(fake_probe(), q, q, q, None)
    missing = fa4.FA4Probe(False, None, "import flash_attn.cute failed: ModuleNotFoundError")
    assert fa4.fa4_refusal(missing, q, q, q, (9, 0)) == missing.reason


def case(seed=0, heads=2, nq=3, nk=5, dim=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, nq * BLOCK, heads, dim, generator=g).transpose(1, 2)      # (B, H, L, D) views
    k = torch.randn(1, nk * BLOCK, heads, dim, generator=g).transpose(1, 2)
    v = torch.randn(1, nk * BLOCK, heads, dim, generator=g).transpose(1, 2)
    mask = torch.rand(1, heads, nq, nk, generator=g) < 0.5
    mask[0, 0, 1] = False
    return q, k, v, mask


def test_fa4_gets_our_lut_as_full_block_lists_and_views_without_copies():
    q, k, v, mask = case()
    lut, counts = build_lut(mask)
    seen = {}

    def fn(q_, k_, v_, softmax_scale=None, block_sparse_tensors=None):
        seen.update(q=q_, k=k_, v=v_, sparse=block_sparse_tensors, scale=softmax_scale)
        ref = masked_reference(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), mask)
        return ref.transpose(1, 2), None                        # FA4 returns (out, lse)

    out = fa4.fa4_block_sparse(fake_probe(fn), q, k, v, lut, counts)
    sparse = seen["sparse"]
    assert sparse.full_block_cnt is counts and sparse.full_block_idx is lut
    assert torch.equal(sparse.mask_block_cnt, torch.zeros_like(counts))
    assert sparse.mask_block_idx.shape == (1, 2, 3, 1) and sparse.mask_block_idx.dtype == torch.int32
    assert sparse.block_size == (BLOCK, BLOCK)
    for name, t in (("q", q), ("k", k), ("v", v)):          # (B, L, H, D) views of the same memory
        assert seen[name].data_ptr() == t.data_ptr() and seen[name].shape == (1, t.shape[2], 2, 32)
        assert seen[name].is_contiguous()
    torch.testing.assert_close(out, masked_reference(q, k, v, mask))


def test_dispatcher_falls_back_when_fa4_raises_logs_once_and_does_not_retry(monkeypatch, caplog):
    q, k, v, mask = case(1)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cute DSL compile failed")

    dispatcher = AttentionDispatcher(fa4=fake_probe(broken))
    monkeypatch.setattr(dispatcher, "sparse_order", lambda device: ("fa4", "gather", "reference"))
    monkeypatch.setattr(dispatch, "fa4_refusal", lambda *args: None)      # eligible, as on a Hopper GPU
    session = dispatcher.session("disable")
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            out = session.block_sparse(q, k, v, mask)
    torch.testing.assert_close(out, masked_reference(q, k, v, mask), atol=2e-6, rtol=2e-6)
    assert len(calls) == 1
    assert sum("block-sparse backend fa4 failed" in r.message for r in caplog.records) == 1
    assert session.summary() == "attention: gather (sparse)"


def test_enable_on_hopper_keeps_no_int8_keys_where_fa4_serves(monkeypatch):
    hopper = AttentionDispatcher(fa4=fake_probe())
    monkeypatch.setattr(hopper, "capability", lambda device: (9, 0))
    cuda = torch.device("cuda")
    assert hopper.fa4_serves(cuda, torch.bfloat16)
    assert not hopper.uses_int8("enable", cuda, torch.bfloat16)
    absent = AttentionDispatcher(fa4=fa4.FA4Probe(False, None, "not installed"))
    monkeypatch.setattr(absent, "capability", lambda device: (9, 0))
    assert absent.uses_int8("enable", cuda, torch.bfloat16)          # our INT8 kernel stays the choice
    off = AttentionDispatcher(AttentionConfig(sparse_backends=("triton", "reference")), fa4=fake_probe())
    monkeypatch.setattr(off, "capability", lambda device: (9, 0))
    assert not off.fa4_serves(cuda) and off.uses_int8("enable", cuda, torch.bfloat16)


def test_an_explicit_int8_request_makes_fa4_step_aside(monkeypatch):
    dispatcher = AttentionDispatcher(AttentionConfig(sparse_int8_with_sage=True), fa4=fake_probe())
    monkeypatch.setattr(dispatch, "fa4_refusal", lambda *args: None)
    q = torch.zeros(1, 1, BLOCK, 128)
    assert "INT8" in dispatcher._fa4_refusal(q, q, q, "enable")
    assert dispatcher._fa4_refusal(q, q, q, "disable") is None


def test_the_pack_runs_without_fa4_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", None)            # as if not installed
    monkeypatch.setattr(dispatch, "probe_fa4", fa4.detect_fa4)
    q, k, v, mask = case(2)
    dispatcher = AttentionDispatcher()
    session = dispatcher.session("enable")
    torch.testing.assert_close(session.block_sparse(q, k, v, mask), masked_reference(q, k, v, mask),
                               atol=2e-6, rtol=2e-6)
    assert not dispatcher.fa4.available and not dispatcher.fa4_serves(torch.device("cuda"))


def test_doctor_says_whether_fa4_is_usable(monkeypatch):
    from comfyui_flashvsr.flashvsr.cli import doctor

    monkeypatch.setattr(fa4, "probe_fa4", lambda: fa4.FA4Probe(False, None, "import flash_attn.cute failed: X"))
    line = next(c for c in doctor.package_checks() if c.name == "flash-attn-4")
    assert "not usable (import flash_attn.cute failed: X)" in line.detail and "[fa4]" in line.detail
    monkeypatch.setattr(fa4, "probe_fa4", fake_probe)
    assert next(c for c in doctor.package_checks() if c.name == "flash-attn-4").detail == "4.0.0b36"


def test_without_fa4_is_the_same_dispatcher_with_fa4_set_aside(monkeypatch):
    monkeypatch.setattr(AttentionDispatcher, "capability", lambda self, device: (9, 0))
    hopper = AttentionDispatcher(fa4=fake_probe())
    cuda = torch.device("cuda")
    aside = hopper.without_fa4()
    assert hopper.fa4_serves(cuda, torch.bfloat16) and not aside.fa4_serves(cuda, torch.bfloat16)
    assert aside.uses_int8("enable", cuda, torch.bfloat16) and not aside.uses_int8("disable", cuda)
    assert aside.config.sparse_backends == tuple(b for b in hopper.config.sparse_backends if b != "fa4")
    assert aside is hopper.without_fa4() and aside.fa4 is hopper.fa4      # made once, probes shared
    assert aside.without_fa4() is aside
