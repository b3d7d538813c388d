"""GPU checks of the pipeline's scheduling: decoding on a second stream and the deferred copies to
host memory give exactly the frames of the plain serial run. Skipped without CUDA."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from comfyui_flashvsr.flashvsr.config import UpscaleConfig  # noqa: E402
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR  # noqa: E402


@pytest.mark.parametrize("mode", ["tiny", "tiny-long", "full"])
def test_overlapped_decoding_gives_the_serial_frames(mode):
    pipe = FlashVSR.random(mode=mode, device="cuda", dtype=torch.bfloat16, size="tiny")
    frames = torch.rand((29, 64, 96, 3), generator=torch.Generator().manual_seed(0))
    serial = pipe.upscale(frames, UpscaleConfig(sageattention="disable", overlap_decode=False)).frames
    overlapped = pipe.upscale(frames, UpscaleConfig(sageattention="disable")).frames
    streamed = torch.cat(list(pipe.upscale_stream(iter(frames), UpscaleConfig(sageattention="disable"))))
    assert serial.shape == (29, 256, 384, 3) and not torch.isnan(serial).any()
    assert torch.equal(overlapped, serial)
    assert torch.equal(streamed, (serial * 255).round().to(torch.uint8))
    assert (pipe.decode_stream_for(UpscaleConfig()) is None) == (mode == "tiny-long")
