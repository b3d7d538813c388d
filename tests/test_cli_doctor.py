"""``flashvsr doctor``: exit code 0 exactly when the pack can run; problems name themselves."""
import json

import pytest
import torch

from comfyui_flashvsr.flashvsr.cli import doctor
from comfyui_flashvsr.flashvsr.cli import main as cli

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 575694948\n"


@pytest.fixture
def cpu_only(monkeypatch):
    """Make the GPU section deterministic whatever machine runs the tests."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def _by_name(checks, name):
    return [c for c in checks if c.name == name]


def test_cpu_machine_with_missing_weights_can_still_run(tmp_path, cpu_only, monkeypatch):
    import sys
    with sys.modules["flashvsr_tests_fake_hub"].FakeHub() as hub:      # a hub that answers
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        checks = doctor.collect([tmp_path])
    assert doctor.exit_code(checks) == 0
    assert _by_name(checks, "cuda")[0].status == doctor.WARN
    for name in ("dense: sdpa", "block-sparse: reference"):
        (check,) = _by_name(checks, name)
        assert check.status == doctor.OK and "relL2 0.0000" in check.detail
    (sage,) = _by_name(checks, "dense: sage")
    assert sage.status == doctor.INFO and sage.detail.startswith("not eligible: ")
    missing = [c for c in checks if c.section == "weights" and c.status == doctor.WARN]
    assert missing and all("downloaded on first use" in c.detail for c in missing)
    assert "ready: the pack can run" in doctor.render(checks)


def test_git_lfs_pointer_instead_of_weights_fails_and_says_so(tmp_path, cpu_only):
    (tmp_path / "v1.1").mkdir()
    (tmp_path / "v1.1" / "LQ_proj_in.ckpt").write_bytes(LFS_POINTER)
    checks = doctor.weight_checks([tmp_path], unreachable=lambda: None)   # the others can download
    bad = [c for c in checks if c.status == doctor.FAIL]
    assert len(bad) == 1 and "Git LFS pointer" in bad[0].detail
    assert doctor.exit_code(checks) == 1


def test_missing_weights_fail_only_when_downloads_are_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checks = doctor.weight_checks([tmp_path])
    assert doctor.exit_code(checks) == 1
    assert any("HF_HUB_OFFLINE=1 is set" in c.detail for c in checks if c.status == doctor.FAIL)


def test_a_backend_with_wrong_numbers_is_reported_as_failed(cpu_only, monkeypatch):
    import comfyui_flashvsr.attention.block_sparse as block_sparse
    real = block_sparse.masked_reference
    monkeypatch.setattr(block_sparse, "masked_reference", lambda q, k, v, m: real(q, k, v, m) * 1.2)
    checks = doctor.attention_checks("cpu")
    (bad,) = [c for c in checks if c.status == doctor.FAIL]
    assert bad.name == "block-sparse: reference" and "relL2 0.2000" in bad.detail
    assert doctor.exit_code(checks) == 1


def test_a_raising_backend_warns_if_there_is_a_fallback_and_fails_if_not(cpu_only):
    def boom():
        raise RuntimeError("no kernel image is available")
    ref = torch.zeros(2)
    fallback = doctor.judge("block-sparse: triton", boom, ref)
    last = doctor.judge("block-sparse: reference", boom, ref, last_resort=True)
    assert (fallback.status, last.status) == (doctor.WARN, doctor.FAIL)
    assert "no kernel image is available" in fallback.detail and "nothing to fall back to" in last.detail


def test_torch_older_than_2_5_is_a_failure(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    (check,) = _by_name(doctor.system_checks(), "torch")
    assert check.status == doctor.FAIL and "needs torch >= 2.5" in check.detail


def test_doctor_command_prints_json_and_exit_code(tmp_path, cpu_only, capsys, monkeypatch):
    import sys
    with sys.modules["flashvsr_tests_fake_hub"].FakeHub() as hub:      # a hub that answers
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        code = cli.main(["doctor", "--json", "--no-numeric", "--models", str(tmp_path)])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["ready"] is True
    assert {"python", "torch", "cuda", "models folder"} <= {c["name"] for c in data["checks"]}
