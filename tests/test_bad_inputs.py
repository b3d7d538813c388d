"""Every bad input gets one clear line: ``ERROR: ...`` and exit 2 from ``flashvsr``, a ValueError
naming the problem from the library and the nodes; never a traceback, never a silently wrong result.

CLI cases run the real entry point (``python -m comfyui_flashvsr``) in a subprocess on the smallest
networks the architecture allows, written under the official file names.
"""
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.flashvsr.engine.loader import CheckpointMismatch
from comfyui_flashvsr.flashvsr.pipeline import FlashVSR
from comfyui_flashvsr.flashvsr.engine.random_weights import random_networks
from comfyui_flashvsr.flashvsr.weights.checks import WeightError
from comfyui_flashvsr.flashvsr.weights.store import read_prompt, read_state_dict
from comfyui_flashvsr.nodes.options import NodeSettings
from comfyui_flashvsr.nodes.runner import PipelineCache, run_upscale

ROOT = Path(__file__).resolve().parent.parent
NO_SAGE = {"installed": False, "version": None, "flavour": None, "reason": "not installed"}
CFG = UpscaleConfig(scale=2.0, sageattention="disable")


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def pipe():
    return FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")


def _save_weights(folder: Path, size: str = "micro", seed: int = 0, **replace) -> Path:
    """Random networks of ``size`` under the official v1.1 names; ``replace`` swaps single files
    (role -> state dict or prompt tensor) to make sets that do not fit together."""
    from safetensors.torch import save_file
    dit, proj, dec, prompt = random_networks("tiny", "v1.1", "cpu", torch.float32, size=size, seed=seed)
    parts = {"dit": dit.state_dict(), "lq_proj": proj.state_dict(), "tcdecoder": dec.state_dict(),
             "prompt": prompt}
    parts.update(replace)
    folder = folder / "v1.1"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in parts["dit"].items()},
              str(folder / "diffusion_pytorch_model_streaming_dmd.safetensors"))
    torch.save(parts["lq_proj"], folder / "LQ_proj_in.ckpt")
    torch.save(parts["tcdecoder"], folder / "TCDecoder.ckpt")
    torch.save(parts["prompt"], folder / "posi_prompt.pth")
    return folder.parent


def _write_png_folder(folder: Path, n: int = 5, size=(32, 48)) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((*size, 3), 20 * i, np.uint8)).save(folder / f"f{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def importable(tmp_path_factory) -> Path:
    """A folder in which ``comfyui_flashvsr`` is this checkout (whatever the checkout is called)."""
    parent = tmp_path_factory.mktemp("pkg")
    (parent / "comfyui_flashvsr").symlink_to(ROOT, target_is_directory=True)
    return parent


def _flashvsr(importable: Path, cwd: Path, *args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``flashvsr ARGS`` through the real entry point; ``prelude`` runs first (e.g. to fake a fact)."""
    code = (f"import sys, runpy\n{prelude}\nsys.argv = ['flashvsr'] + {list(args)!r}\n"
            "runpy.run_module('comfyui_flashvsr', run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, PYTHONPATH=str(importable), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _upscale(importable, tmp_path, src, models, *extra, prelude=""):
    return _flashvsr(importable, tmp_path, "upscale", str(src), str(tmp_path / "out.mkv"), "--models", str(models),
                     "--device", "cpu", "--scale", "2", "--no-download", "--sageattention", "disable", *extra,
                     prelude=prelude)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and one ``ERROR:`` line, no traceback; returns that line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


# ---------------------------------------------------------------- NaN / Inf pixels

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_pixel_is_refused_with_its_frame_index(pipe, bad):
    frames = torch.rand(4, 8, 8, 3)
    frames[2, 3, 5, 1] = bad
    with pytest.raises(ValueError, match=r"frame 2 .*(NaN|infinite)"):
        pipe.upscale(frames, CFG)


def test_a_non_finite_pixel_in_a_stream_is_refused_with_its_frame_index(pipe):
    frames = [torch.rand(8, 8, 3) for _ in range(6)]
    frames[4][0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"frame 4 .*NaN"):
        list(pipe.upscale_stream(iter(frames), CFG))


def test_a_nan_in_the_unused_alpha_channel_is_harmless(pipe):
    frames = torch.rand(2, 8, 8, 4)
    frames[..., 3] = math.nan
    assert torch.isfinite(pipe.upscale(frames, CFG).frames).all()


# ---------------------------------------------------------------- dtypes and shapes

@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int64, torch.int8, torch.bool])
def test_integer_frames_other_than_uint8_are_refused_not_guessed(pipe, dtype):
    frames = (torch.rand(2, 8, 8, 3) * 255).to(dtype)
    with pytest.raises(ValueError, match=rf"{dtype}.*uint8"):
        pipe.upscale(frames, CFG)
    with pytest.raises(ValueError, match=rf"{dtype}.*uint8"):
        list(pipe.upscale_stream(iter(frames), CFG))


def test_float64_and_uint8_frames_give_the_float32_result(pipe):
    frames = torch.rand(2, 8, 8, 3)
    u8 = (frames * 255).round().to(torch.uint8)
    want = pipe.upscale(u8.float() / 255, CFG).frames
    torch.testing.assert_close(pipe.upscale(u8, CFG).frames, want)
    torch.testing.assert_close(pipe.upscale(u8.double() / 255, CFG).frames, want)


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 2, 8, 8, 3), (2, 3, 8, 8), (2, 8, 8, 2)])
def test_frames_of_the_wrong_layout_are_refused_with_the_expected_layout(pipe, shape):
    with pytest.raises(ValueError, match=r"\(N, H, W, (C|3)\)|channels"):
        pipe.upscale(torch.rand(shape), CFG)


def test_upscale_stream_with_mixed_sizes_names_the_first_odd_frame(pipe):
    frames = [torch.rand(8, 8, 3)] * 3 + [torch.rand(16, 8, 3)] + [torch.rand(8, 8, 3)] * 2
    with pytest.raises(ValueError, match=r"frame 3 is 8x16 .*frame 0 is 8x8"):
        list(pipe.upscale_stream(iter(frames), CFG))


# ---------------------------------------------------------------- the node

def _node(frames, pipe):
    return run_upscale(frames, NodeSettings(scale=2.0, sageattention="disable"), cache=PipelineCache(lambda key, on_download=None: pipe),
                       roots=["unused"], auto_device="cpu", on_progress=lambda d, t: None, sage_status=lambda: NO_SAGE)


def test_the_node_refuses_nan_and_int32_frames_with_a_flashvsr_value_error(pipe):
    frames = torch.rand(3, 8, 8, 3)
    frames[1, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"^FlashVSR ⚡: .*frame 1 "):
        _node(frames, pipe)
    with pytest.raises(ValueError, match=r"^FlashVSR ⚡: .*torch.int32"):
        _node(torch.full((3, 8, 8, 3), 128, dtype=torch.int32), pipe)


# ---------------------------------------------------------------- NaN output

@pytest.fixture
def nan_pipe():
    pipe = FlashVSR.random(mode="tiny", device="cpu", dtype=torch.float32, size="micro")
    with torch.no_grad():
        pipe.dit.head.head.weight.fill_(math.nan)
    return pipe


def test_an_output_with_nan_is_an_error_not_a_black_video(nan_pipe):
    frames = torch.rand(3, 8, 8, 3)
    with pytest.raises(RuntimeError, match=r"NaN.*frames 0-2"):
        nan_pipe.upscale(frames, CFG)
    with pytest.raises(RuntimeError, match=r"NaN.*frames 0-2"):
        list(nan_pipe.upscale_stream(iter(frames), CFG))
    with pytest.raises(RuntimeError, match=r"NaN"):
        nan_pipe.upscale(frames, UpscaleConfig(scale=2.0, sageattention="disable", tile_size=512))


def test_the_node_reports_a_nan_output_as_a_flashvsr_error(nan_pipe):
    with pytest.raises(ValueError, match=r"^FlashVSR ⚡: .*NaN"):
        _node(torch.rand(3, 8, 8, 3), nan_pipe)


# ---------------------------------------------------------------- weight files that do not fit

def test_weights_of_different_widths_name_both_files():
    dit, proj, dec, prompt = random_networks("tiny", "v1.1", "cpu", torch.float32, size="micro")
    _, wide_proj, _, wide_prompt = random_networks("tiny", "v1.1", "cpu", torch.float32, size="tiny")
    with pytest.raises(CheckpointMismatch, match=r"dit\.st.*proj\.ckpt|proj\.ckpt.*dit\.st"):
        FlashVSR.from_state_dicts(dit.state_dict(), wide_proj.state_dict(), dec.state_dict(), prompt,
                                  device="cpu", dtype=torch.float32,
                                  sources=("dit.st", "proj.ckpt", "dec.ckpt", "prompt.pth"))
    with pytest.raises(CheckpointMismatch, match=r"prompt\.pth.*dit\.st|dit\.st.*prompt\.pth"):
        FlashVSR.from_state_dicts(dit.state_dict(), proj.state_dict(), dec.state_dict(), wide_prompt,
                                  device="cpu", dtype=torch.float32,
                                  sources=("dit.st", "proj.ckpt", "dec.ckpt", "prompt.pth"))
    from comfyui_flashvsr.models.tcdecoder import TCDecoder, TCDecoderConfig
    odd_dec = TCDecoder(TCDecoderConfig(channels=(16, 8, 8, 8), latent_channels=8 + 768))
    with pytest.raises(CheckpointMismatch, match=r"decoder \(dec\.ckpt\) reads 8 latent channels.*DiT \(dit\.st\) makes 16"):
        FlashVSR.from_state_dicts(dit.state_dict(), proj.state_dict(), odd_dec.state_dict(), prompt,
                                  device="cpu", dtype=torch.float32,
                                  sources=("dit.st", "proj.ckpt", "dec.ckpt", "prompt.pth"))


def _sparse_dit(path: Path, blocks: int, dim: int = 1536) -> None:
    """A safetensors file with the official DiT's width and ``blocks`` blocks; its data is a hole
    (the checks read only the header)."""
    entries, offset = {}, 0

    def add(name, shape):
        nonlocal offset
        size = math.prod(shape) * 2
        entries[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    add("patch_embedding.weight", (dim, 16, 1, 2, 2))
    for i in range(blocks):
        add(f"blocks.{i}.modulation", (1, 6, dim))
        add(f"blocks.{i}.self_attn.q.weight", (dim, dim))
    add("head.head.weight", (64, dim))
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + offset)


def test_a_dit_with_fewer_blocks_than_its_name_implies_is_refused(importable, tmp_path):
    models = _save_weights(tmp_path / "models")
    _sparse_dit(models / "v1.1" / "diffusion_pytorch_model_streaming_dmd.safetensors", blocks=29)
    line = _one_error_line(_upscale(importable, tmp_path, _write_png_folder(tmp_path / "in", 2), models))
    assert "diffusion_pytorch_model_streaming_dmd.safetensors: holds 29 DiT blocks" in line
    assert "has 30 (blocks 0-29); missing blocks [29]:" in line


def test_a_pickled_dit_is_counted_after_loading_and_a_gap_is_named(tmp_path):
    def dit(blocks):
        sd = {"patch_embedding.weight": torch.zeros(1536, 1, 1, 1, 1), "head.head.weight": torch.zeros(1, 1)}
        sd.update({f"blocks.{i}.self_attn.q.weight": torch.zeros(1, 1) for i in blocks})
        return sd
    torch.save(dit(range(30)), tmp_path / "whole.pth")
    assert len(read_state_dict(tmp_path / "whole.pth", role="dit")) == 32
    torch.save(dit([*range(29), 30]), tmp_path / "gap.pth")
    with pytest.raises(WeightError, match=r"gap\.pth: holds 30 DiT blocks.*missing blocks \[29\]; unexpected blocks \[30\]"):
        read_state_dict(tmp_path / "gap.pth", role="dit")


def test_cli_names_both_files_when_projector_and_dit_do_not_fit(importable, tmp_path):
    _, wide_proj, _, _ = random_networks("tiny", "v1.1", "cpu", torch.float32, size="tiny")
    models = _save_weights(tmp_path / "models", lq_proj=wide_proj.state_dict())
    line = _one_error_line(_upscale(importable, tmp_path, _write_png_folder(tmp_path / "in", 2), models))
    assert "LQ_proj_in.ckpt" in line and "diffusion_pytorch_model_streaming_dmd.safetensors" in line
    assert not (tmp_path / "out.mkv").exists()


def test_cli_refuses_nan_weights_output_and_leaves_no_file(importable, tmp_path):
    dit, *_ = random_networks("tiny", "v1.1", "cpu", torch.float32, size="micro")
    sd = dit.state_dict()
    sd["head.head.weight"] = torch.full_like(sd["head.head.weight"], math.nan)
    models = _save_weights(tmp_path / "models", dit=sd)
    out = tmp_path / "frames"
    proc = _flashvsr(importable, tmp_path, "upscale", str(_write_png_folder(tmp_path / "in", 2, (16, 16))), str(out),
                     "--models", str(models), "--device", "cpu", "--scale", "2", "--no-download")
    assert "NaN" in _one_error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "models"]


# ---------------------------------------------------------------- torch older than 2.6

def test_torch_older_than_2_6_never_unpickles_weights(tmp_path, monkeypatch):
    proj = {"w": torch.ones(2)}
    torch.save(proj, tmp_path / "LQ_proj_in.ckpt")
    torch.save(torch.ones(1, 2, 3), tmp_path / "posi_prompt.pth")
    from safetensors.torch import save_file
    save_file({"w": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(WeightError, match=r"2\.5\.1.*CVE-2025-32434.*torch>=2\.6.*safetensors"):
        read_state_dict(tmp_path / "LQ_proj_in.ckpt")
    with pytest.raises(WeightError, match=r"CVE-2025-32434.*Prompt\.safetensors"):
        read_prompt(tmp_path / "posi_prompt.pth")
    assert unpickled == []
    assert read_state_dict(tmp_path / "x.safetensors")["w"].tolist() == [1.0, 1.0]


def test_cli_with_old_torch_says_how_to_upgrade(importable, tmp_path):
    models = _save_weights(tmp_path / "models")
    proc = _upscale(importable, tmp_path, _write_png_folder(tmp_path / "in", 2), models,
                    prelude="import torch\ntorch.__version__ = '2.5.1'")
    line = _one_error_line(proc)
    assert "CVE-2025-32434" in line and "LQ_proj_in.ckpt" in line


# ---------------------------------------------------------------- broken input files

def test_an_unreadable_first_image_is_named(importable, tmp_path):
    folder = _write_png_folder(tmp_path / "in", 3)
    (folder / "f000.png").write_bytes(b"not a png")
    line = _one_error_line(_upscale(importable, tmp_path, folder, tmp_path / "models"))
    assert "f000.png" in line


def test_a_truncated_image_in_the_folder_is_named(importable, tmp_path):
    folder = _write_png_folder(tmp_path / "in", 4)
    data = (folder / "f002.png").read_bytes()
    (folder / "f002.png").write_bytes(data[: len(data) // 2])
    models = _save_weights(tmp_path / "models")
    line = _one_error_line(_upscale(importable, tmp_path, folder, models))
    assert "f002.png" in line
    assert not (tmp_path / "out.mkv").exists()


def _segment(path: Path, w: int, h: int, n: int, start: int) -> bytes:
    import av
    with av.open(str(path), "w", format="mpegts") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 40 * i, np.uint8), format="rgb24")
            f.pts = start + i
            c.mux(s.encode(f))
        c.mux(s.encode(None))
    return path.read_bytes()


def test_a_video_whose_frame_size_changes_midway_names_the_frame(importable, tmp_path):
    # MPEG-TS segments concatenate into one stream; the decoder switches size at the second one.
    video = tmp_path / "in.ts"
    video.write_bytes(_segment(tmp_path / "a.ts", 48, 32, 3, 0) + _segment(tmp_path / "b.ts", 64, 48, 3, 3))
    models = _save_weights(tmp_path / "models")
    line = _one_error_line(_upscale(importable, tmp_path, video, models))
    assert "in.ts" in line and "frame 3" in line and "64x48" in line and "48x32" in line


def test_a_decoding_error_midway_names_the_video_and_frame(monkeypatch):
    import av
    from comfyui_flashvsr.flashvsr.cli.video_io import VideoIOError, iter_frames
    real_open = av.open

    class Damaged:
        """The sample, as if its bytes went bad after two frames."""
        def __init__(self, container):
            self.container, self.streams = container, container.streams

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def decode(self, stream):
            for i, frame in enumerate(self.container.decode(stream)):
                if i == 2:
                    raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
                yield frame
    monkeypatch.setattr(av, "open", lambda path, *a, **k: Damaged(real_open(path, *a, **k)))
    frames = iter_frames(ROOT / "assets" / "sample.mp4")
    next(frames), next(frames)
    with pytest.raises(VideoIOError, match=r"sample\.mp4: cannot decode frame 2: .*Invalid data"):
        next(frames)
