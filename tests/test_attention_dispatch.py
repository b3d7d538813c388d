"""Dispatcher behaviour on the CPU: SDPA for dense calls, explicit per-session modes, the run
report and summary line, and the block-sparse fallback chain with its negative cache."""
import logging
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher
from comfyui_flashvsr.attention.probe import SageProbe

BLOCK = 128


def qkv(lq=128, lk=256, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, n, 64, generator=g).to(dtype) for n in (lq, lk, lk))


def stand_in_sage():
    """A sage that records its calls and computes plain attention (enough to see routing)."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, **kwargs):
        calls.append(tensor_layout)
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    return SageProbe(True, "2.x", "2.2.0", None, fn=sageattn), calls


def as_h100(dispatcher, monkeypatch):
    real = dispatcher.dense_call
    monkeypatch.setattr(dispatcher, "dense_call",
                        lambda q, k, v: replace(real(q, k, v), device_type="cuda", capability=(9, 0)))
    return dispatcher


def test_cpu_dense_uses_sdpa_and_equals_it_exactly():
    q, k, v = qkv()
    session = AttentionDispatcher(sage=SageProbe(False, None, None, "not installed")).session("enable")
    assert torch.equal(session.dense(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert session.summary() == "attention: sdpa (dense); sage not used: not installed"


def test_two_sessions_with_different_modes_each_get_what_they_asked_for(monkeypatch):
    probe, calls = stand_in_sage()
    dispatcher = as_h100(AttentionDispatcher(sage=probe), monkeypatch)
    fast, plain = dispatcher.session("enable"), dispatcher.session("disable")
    q, k, v = qkv(dtype=torch.bfloat16)
    for _ in range(2):
        fast.dense(q, k, v)
        plain.dense(q, k, v)
    again = dispatcher.session("enable")
    again.dense(q, k, v)
    assert calls == ["HND"] * 3
    assert fast.summary() == "attention: sage (dense)" and again.summary() == "attention: sage (dense)"
    assert plain.summary() == "attention: sdpa (dense)"
    assert plain.report()["calls"]["dense/sdpa"]["calls"] == 2 and "sage" not in plain.report()


def test_disable_mode_never_probes_or_calls_sage(monkeypatch):
    dispatcher = AttentionDispatcher()
    monkeypatch.setattr("comfyui_flashvsr.attention.dispatch.probe_sage",
                        lambda: pytest.fail("disable mode must not import sageattention"))
    session = dispatcher.session("disable")
    session.dense(*qkv())
    assert session.report()["sage_not_used"] == {}


@pytest.mark.parametrize("mode", ["auto", "Enable", True, None])
def test_unknown_mode_is_rejected_with_the_choices(mode):
    with pytest.raises(ValueError, match=r"one of \('enable', 'disable'\)"):
        AttentionDispatcher().session(mode)


def test_report_counts_calls_and_time_per_operation_and_backend():
    session = AttentionDispatcher().session("disable")
    q, k, v = qkv()
    mask = torch.ones(1, 2, 1, 2, dtype=torch.bool)
    for _ in range(3):
        session.dense(q, k, v)
    session.block_sparse(q, k, v, mask)
    calls = session.report()["calls"]
    assert {name: c["calls"] for name, c in calls.items()} == {"dense/sdpa": 3, "block_sparse/gather": 1}
    assert all(c["seconds"] > 0 for c in calls.values())
    assert session.summary() == "attention: sdpa (dense) / gather (sparse)"


def test_report_without_timing_still_counts_calls():
    session = AttentionDispatcher(AttentionConfig(time_calls=False)).session("disable")
    session.dense(*qkv())
    assert session.report()["calls"] == {"dense/sdpa": {"calls": 1, "seconds": 0.0}}


def test_sparse_backend_failure_falls_back_logs_once_and_is_not_retried_for_that_shape(monkeypatch, caplog):
    dispatcher = AttentionDispatcher()
    tried = []

    def broken(q, k, v, lut, counts, mode, key_mean):
        tried.append(tuple(q.shape))
        raise RuntimeError("out of resource: shared memory")

    dispatcher.sparse_runners["triton"] = (lambda q, k, v, mode: None, broken)
    monkeypatch.setattr(dispatcher, "sparse_order", lambda device: ("triton", "reference"))
    session = dispatcher.session("disable")
    q, k, v = qkv()
    mask = torch.rand(1, 2, 1, 2, generator=torch.Generator().manual_seed(1)) < 0.6
    with caplog.at_level(logging.WARNING):
        outs = [session.block_sparse(q, k, v, mask) for _ in range(3)]
        other = qkv(lq=256)
        session.block_sparse(*other, torch.ones(1, 2, 2, 2, dtype=torch.bool))
    assert tried == [(1, 2, 128, 64), (1, 2, 256, 64)]          # once per shape, then skipped
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert len([r for r in caplog.records if "out of resource" in r.getMessage()]) == 2
    assert session.summary() == "attention: reference (sparse)"


def test_sparse_backend_that_refuses_is_skipped_with_its_reason_logged_once(monkeypatch, caplog):
    dispatcher = AttentionDispatcher()
    dispatcher.sparse_runners["flex"] = (lambda q, k, v, mode: "compiled flex_attention is used on CUDA only",
                                         lambda *a: pytest.fail("a refusing backend must not run"))
    monkeypatch.setattr(dispatcher, "sparse_order", lambda device: ("flex", "reference"))
    session = dispatcher.session("disable")
    q, k, v = qkv()
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            session.block_sparse(q, k, v, torch.ones(1, 2, 1, 2, dtype=torch.bool))
    assert len([r for r in caplog.records if "CUDA only" in r.getMessage()]) == 1


def test_int8_sparse_kernel_is_used_only_when_configured_and_mode_enables_sage(monkeypatch):
    dispatcher = AttentionDispatcher(AttentionConfig(sparse_int8_with_sage=True))
    seen = []

    def run(q, k, v, lut, counts, mode, key_mean):
        seen.append(key_mean)
        return torch.zeros_like(q)

    dispatcher.sparse_runners["triton"] = (lambda q, k, v, mode: None, run)
    monkeypatch.setattr(dispatcher, "sparse_order", lambda device: ("triton", "reference"))
    q, k, v = qkv()
    mask = torch.ones(1, 2, 1, 2, dtype=torch.bool)
    on, off = dispatcher.session("enable"), dispatcher.session("disable")
    mean = k.mean(dim=2)
    on.block_sparse(q, k, v, mask, key_mean=mean)
    off.block_sparse(q, k, v, mask)
    assert on.summary().startswith("attention: triton-int8 (sparse)")
    assert off.summary() == "attention: triton (sparse)"
    assert seen[0] is mean and seen[1] is None          # the caller's key mean reaches the kernel


@pytest.mark.parametrize("capability, expected", [((9, 0), True), ((8, 9), False), ((10, 0), False), (None, False)])
def test_int8_sparse_kernel_defaults_to_hopper_only_and_only_for_enable(monkeypatch, capability, expected):
    dispatcher = AttentionDispatcher()
    monkeypatch.setattr(dispatcher, "capability", lambda device: capability)
    device = torch.device("cuda")
    assert dispatcher.uses_int8("enable", device) is expected
    assert dispatcher.uses_int8("disable", device) is False
    forced = AttentionDispatcher(AttentionConfig(sparse_int8_with_sage=False))
    monkeypatch.setattr(forced, "capability", lambda device: (9, 0))
    assert forced.uses_int8("enable", device) is False


def test_int8_key_cache_only_for_half_precision_keys_by_default(monkeypatch):
    # An fp32 run on Hopper with "enable": the Triton kernels refuse fp32, so an int8 key cache would
    # only round the keys and be dequantised in every layer; it keeps float keys instead.
    pytest.importorskip("triton")
    dispatcher = AttentionDispatcher()
    monkeypatch.setattr(dispatcher, "capability", lambda device: (9, 0))
    keys = {dt: torch.zeros(2, 128, 256, dtype=dt) for dt in (torch.bfloat16, torch.float16, torch.float32)}
    assert dispatcher.key_rows("enable", keys[torch.bfloat16]) == 64
    assert dispatcher.key_rows("enable", keys[torch.float16]) == 64
    assert dispatcher.key_rows("enable", keys[torch.float32]) is None
    assert dispatcher.key_rows("disable", keys[torch.bfloat16]) is None
    forced = AttentionDispatcher(AttentionConfig(sparse_int8_with_sage=True))   # an explicit choice stands
    assert forced.key_rows("enable", keys[torch.float32]) == 64


@pytest.mark.parametrize("order", [("triton", "flex"), ("reference", "flex"), ("cudnn", "reference"), ()])
def test_config_rejects_a_sparse_order_that_cannot_always_run(order):
    with pytest.raises(ValueError, match="end with 'reference'"):
        AttentionConfig(sparse_backends=order)


def test_cpu_sparse_order_is_the_gathered_path_then_the_reference():
    assert AttentionDispatcher().sparse_order(torch.device("cpu")) == ("gather", "reference")
    only_reference = AttentionConfig(sparse_backends=("triton", "reference"))
    assert AttentionDispatcher(only_reference).sparse_order(torch.device("cpu")) == ("reference",)


def test_sage_1x_on_hopper_is_announced_as_slower_than_sdpa(monkeypatch):
    from comfyui_flashvsr.attention import AttentionDispatcher
    from comfyui_flashvsr.attention.probe import SageProbe

    def fake(*_a, **_k):
        raise AssertionError("not called")

    for flavour, cap, slower in (("1.x", (9, 0), True), ("1.x", (8, 9), False), ("2.x", (9, 0), False)):
        d = AttentionDispatcher(sage=SageProbe(True, flavour, "x", None, fake))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, cap=cap: cap)
        assert d.capability(torch.device("cuda", 0)) == cap     # what a CUDA call on that GPU records
        note = d.sage_slower_than_sdpa()
        assert (note is not None) == slower, (flavour, cap)
        if slower:
            assert "Hopper" in note and "SDPA" in note
    missing = AttentionDispatcher(sage=SageProbe(False, None, None, "not installed"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    missing.capability(torch.device("cuda", 0))
    assert missing.sage_slower_than_sdpa() is None
