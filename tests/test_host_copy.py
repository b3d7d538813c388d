"""Host <-> device copies that do not drain the GPU queue (flashvsr/engine/host_copy.py)."""
import pytest
import torch

from comfyui_flashvsr.flashvsr.engine.host_copy import DeferredDownload, upload

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_upload_keeps_values_and_casts(device):
    x = torch.rand(3, 5, 7)
    y = upload(x, torch.device(device), torch.bfloat16)
    assert y.device.type == device and y.dtype == torch.bfloat16
    assert torch.equal(y.cpu(), x.to(torch.bfloat16))
    assert upload(x, torch.device(device)).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_deferred_download_hands_back_every_chunk_once_in_order(device):
    dl = DeferredDownload()
    chunks = [torch.full((2, 3), float(i), device=device) for i in range(4)]
    got = []
    for i, c in enumerate(chunks):
        ready = dl.push(c * 1, meta=i)          # a temporary: the copy must not depend on the caller's tensor
        if device == "cuda":
            assert [m for _, m in ready] == ([] if i == 0 else [i - 1])     # one chunk late
        got += ready
    got += dl.flush()
    assert [m for _, m in got] == [0, 1, 2, 3]
    for host, meta in got:
        assert host.device.type == "cpu"
        assert torch.equal(host, torch.full((2, 3), float(meta)))
    assert dl.flush() == []


def test_deferred_download_pins_cuda_chunks():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dl = DeferredDownload()
    dl.push(torch.ones(4, device="cuda"))
    (host, _), = dl.flush()
    assert host.is_pinned()
