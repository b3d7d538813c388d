"""SageAttention probe (with real stand-in packages on sys.path), eligibility rules, and the
dispatcher's handling of sage calls: K never modified, failures fall back once, OOM not blacklisted."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from comfyui_flashvsr.attention import AttentionConfig, AttentionDispatcher
from comfyui_flashvsr.attention.probe import SageProbe, detect_sage
from comfyui_flashvsr.attention.sage import DenseCall, sage_refusal

SAGE1_BODY = """
    import torch.nn.functional as F

    CALLS = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=True, **kwargs):
        CALLS.append(k.data_ptr())
        k -= k.mean(dim=2, keepdim=True)          # what 1.0.6 does to the caller's tensor
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    def sageattn_varlen(*args, **kwargs):
        raise NotImplementedError
"""
SAGE2_EXTRA = """
    def sageattn_qk_int8_pv_fp8_cuda(*args, **kwargs):
        raise NotImplementedError

    def sageattn_qk_int8_pv_fp16_triton(*args, **kwargs):
        raise NotImplementedError
"""


def write_package(root, body, version=None):
    pkg = root / "sageattention"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    if version is not None:
        info = root / f"sageattention-{version.split('+')[0]}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sageattention\nVersion: {version}\n")


@pytest.fixture
def fake_sage(tmp_path, monkeypatch):
    """Install a stand-in ``sageattention`` on sys.path; returns a function that writes it and probes."""
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)

    def install(body, version=None):
        write_package(tmp_path, body, version)
        monkeypatch.syspath_prepend(str(tmp_path))
        return detect_sage()

    return install


def test_probe_reads_1x_flavour_and_version_from_installed_package(fake_sage):
    probe = fake_sage(SAGE1_BODY, version="1.0.6")
    assert probe.available and probe.flavour == "1.x" and probe.version == "1.0.6"
    assert probe.reason is None and callable(probe.fn)


def test_probe_tells_2x_by_its_extra_entry_points_not_its_version_string(fake_sage):
    probe = fake_sage(SAGE1_BODY + SAGE2_EXTRA, version="2.2.0+cu128torch2.7.1.post1")
    assert probe.available and probe.flavour == "2.x"
    assert probe.version == "2.2.0+cu128torch2.7.1.post1"


@pytest.mark.parametrize("body, expected", [
    ("raise ModuleNotFoundError(\"No module named 'triton'\", name='triton')", "No module named 'triton'"),
    ("raise OSError('[WinError 126] The specified module could not be found')", "OSError: [WinError 126]"),
    ("raise RuntimeError('undefined symbol: _ZN3c10')", "RuntimeError: undefined symbol"),
])
def test_probe_survives_a_package_whose_import_raises(fake_sage, body, expected):
    probe = fake_sage(body)
    assert not probe.available and probe.fn is None
    assert expected in probe.reason


def test_probe_reports_a_package_without_sageattn(fake_sage):
    probe = fake_sage("VALUE = 1\n")
    assert not probe.available and "no sageattn function" in probe.reason


def test_probe_reports_a_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)     # makes the import raise ImportError
    probe = detect_sage()
    assert not probe.available and probe.reason.startswith("import sageattention failed: ")


def test_importing_the_pack_imports_no_optional_package_and_touches_no_cuda():
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import conftest
        import comfyui_flashvsr.attention as attention
        attention.AttentionDispatcher().session("enable")
        import torch
        loaded = [m for m in ("sageattention", "triton", "torch._dynamo") if m in sys.modules]
        print(loaded, torch.cuda.is_initialized())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] False"


# ---- eligibility (pure function) -----------------------------------------------------------

SAGE1 = SageProbe(True, "1.x", "1.0.6", None, fn=lambda *a, **k: None)
SAGE2 = SageProbe(True, "2.x", "2.2.0", None, fn=lambda *a, **k: None)
GOOD = dict(device_type="cuda", capability=(9, 0), dtype=torch.bfloat16, same_dtypes=True, head_dim=128,
            kv_len=512, last_dim_contiguous=True, same_heads=True)


@pytest.mark.parametrize("probe, change, reason", [
    (SageProbe(False, None, None, "import sageattention failed: X"), {}, "import sageattention failed: X"),
    (SAGE1, dict(device_type="cpu", capability=None), "not CUDA"),
    (SAGE1, dict(capability=(7, 5)), "7.5 < 8.0"),
    (SAGE2, dict(capability=(8, 7)), "no kernel for sm87"),
    (SAGE2, dict(capability=(10, 0)), "no kernel for sm100"),
    (SAGE1, dict(capability=(12, 1)), "not known to compile for sm121"),
    (SAGE1, dict(dtype=torch.float32), "dtype torch.float32"),
    (SAGE1, dict(same_dtypes=False), "all float16 or all bfloat16"),
    (SAGE1, dict(head_dim=384), "head_dim 384 not in (64, 96, 128)"),
    (SAGE2, dict(head_dim=256), "head_dim 256 > 128"),
    (SAGE1, dict(kv_len=200), "not a multiple of 64"),
    (SAGE1, dict(last_dim_contiguous=False), "not contiguous"),
    (SAGE1, dict(same_heads=False), "different head counts"),
])
def test_sage_refuses_ineligible_calls_with_the_reason(probe, change, reason):
    assert reason in sage_refusal(probe, DenseCall(**{**GOOD, **change}))


@pytest.mark.parametrize("probe, change", [
    (SAGE1, {}),
    (SAGE1, dict(capability=(10, 0))),                 # 1.x is Triton: compiles for sm100
    (SAGE1, dict(capability=(8, 6), dtype=torch.float16, head_dim=64, kv_len=64)),
    (SAGE2, dict(capability=(12, 0), head_dim=96, kv_len=200)),   # 2.x masks partial tiles
])
def test_sage_accepts_eligible_calls(probe, change):
    assert sage_refusal(probe, DenseCall(**{**GOOD, **change})) is None


def test_dense_call_reads_the_facts_from_tensors():
    q = torch.zeros(1, 2, 16, 64, dtype=torch.float16)
    k = torch.zeros(1, 16, 2, 64, dtype=torch.float16).transpose(1, 2)
    v = torch.zeros(1, 2, 64, 16, dtype=torch.float16).transpose(2, 3)
    call = DenseCall.of(q, k, v, None)
    assert (call.device_type, call.head_dim, call.kv_len, call.dtype) == ("cpu", 64, 16, torch.float16)
    assert call.last_dim_contiguous is False          # v's last dim has stride 16


# ---- dispatcher with a stand-in sage, CPU tensors presented as an H100's --------------------

def on_fake_h100(dispatcher, monkeypatch):
    real = dispatcher.dense_call

    def as_cuda(q, k, v):
        from dataclasses import replace
        return replace(real(q, k, v), device_type="cuda", capability=(9, 0))

    monkeypatch.setattr(dispatcher, "dense_call", as_cuda)
    return dispatcher


# The tests below exercise sage itself on a Hopper-shaped call, where by default enable leaves
# 1.x out of dense calls (it is slower than SDPA there); the default is tested on its own.
SAGE_EVEN_IF_SLOWER = AttentionConfig(dense_sage_where_slower=True)


def qkv(lq=128, lk=128, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, lq, 64, generator=g).to(dtype), torch.randn(1, 2, lk, 64, generator=g).to(dtype),
            torch.randn(1, 2, lk, 64, generator=g).to(dtype))


def test_sage_1x_leaves_the_callers_keys_unchanged(fake_sage, monkeypatch):
    probe = fake_sage(SAGE1_BODY, version="1.0.6")
    q, k, v = qkv()
    mutated = k.clone()
    probe.fn(q, mutated, v)                           # the stand-in really mutates what it is given
    assert not torch.equal(mutated, k)

    session = on_fake_h100(AttentionDispatcher(SAGE_EVEN_IF_SLOWER, sage=probe), monkeypatch).session("enable")
    before = k.clone()
    out = session.dense(q, k, v)
    assert torch.equal(k, before)
    calls = session.report()["calls"]
    assert list(calls) == ["dense/sage"] and calls["dense/sage"]["calls"] == 1
    # mean-centred keys give the same softmax: the sage result equals plain attention
    torch.testing.assert_close(out.float(), F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
                               atol=2e-3, rtol=2e-3)


def test_sage_failure_falls_back_to_sdpa_logs_once_and_is_not_retried(fake_sage, monkeypatch, caplog):
    probe = fake_sage(SAGE1_BODY.replace("CALLS.append(k.data_ptr())",
                                         "CALLS.append(1); raise ValueError('Unsupported head_dim: 64')"))
    dispatcher = on_fake_h100(AttentionDispatcher(SAGE_EVEN_IF_SLOWER, sage=probe), monkeypatch)
    session = dispatcher.session("enable")
    q, k, v = qkv()
    with caplog.at_level(logging.WARNING):
        outs = [session.dense(q, k, v) for _ in range(3)]
    calls = sys.modules["sageattention"].CALLS
    assert len(calls) == 1                            # negative cache: never tried again
    for out in outs:
        assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    warnings = [r for r in caplog.records if "Unsupported head_dim" in r.getMessage()]
    assert len(warnings) == 1
    report = session.report()
    assert report["calls"]["dense/sdpa"]["calls"] == 3
    assert sum(report["sage_not_used"]["dense"].values()) == 3
    assert "sage not used: sage raised ValueError: Unsupported head_dim: 64" in session.summary()


def test_sage_out_of_memory_falls_back_for_that_call_only(fake_sage, monkeypatch):
    body = SAGE1_BODY.replace(
        "CALLS.append(k.data_ptr())",
        "CALLS.append(1)\n        if len(CALLS) == 1:\n"
        "            import torch; raise torch.cuda.OutOfMemoryError('CUDA out of memory')")
    probe = fake_sage(body)
    dispatcher = on_fake_h100(AttentionDispatcher(SAGE_EVEN_IF_SLOWER, sage=probe), monkeypatch)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    session = dispatcher.session("enable")
    q, k, v = qkv()
    session.dense(q, k, v)
    session.dense(q, k, v)
    assert len(sys.modules["sageattention"].CALLS) == 2
    assert session.report()["calls"]["dense/sage"]["calls"] == 1
    assert session.report()["calls"]["dense/sdpa"]["calls"] == 1


def test_enable_on_hopper_runs_sdpa_for_dense_calls_when_sage_1x_is_slower_and_says_so(fake_sage, monkeypatch, caplog):
    probe = fake_sage(SAGE1_BODY, version="1.0.6")
    session = on_fake_h100(AttentionDispatcher(sage=probe), monkeypatch).session("enable")
    q, k, v = qkv()
    with caplog.at_level(logging.INFO):
        out = session.dense(q, k, v)
        session.dense(q, k, v)
    assert sys.modules["sageattention"].CALLS == []                  # never called
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    report = session.report()
    assert report["calls"] == {"dense/sdpa": {"calls": 2, "seconds": report["calls"]["dense/sdpa"]["seconds"]}}
    summary = session.summary()
    assert summary.startswith("attention: sdpa (dense)") and "slower than SDPA on Hopper" in summary
    said = [r for r in caplog.records if "slower than SDPA" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO      # a choice, said once, not a warning
