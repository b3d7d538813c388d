"""The one device/precision resolver (flashvsr/devices.py), as the CLI, the nodes and the pipeline use it."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_flashvsr.flashvsr import devices
from comfyui_flashvsr.nodes.runner import resolve_device as node_device

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)


def test_auto_prefers_the_callers_device_then_cuda_then_mps_then_cpu(monkeypatch, cpu_only):
    assert devices.resolve_device("auto", auto="cuda:1") == "cuda:1"      # ComfyUI's device
    assert devices.resolve_device("auto") == "cpu"
    monkeypatch.setattr(devices, "_mps_available", lambda: True)
    assert devices.resolve_device(None) == "mps"
    monkeypatch.setattr(devices, "cuda_count", lambda: 1)
    assert devices.resolve_device("auto") == "cuda"


def test_cuda_without_a_gpu_is_one_line_that_says_why_and_what_to_do(cpu_only):
    with pytest.raises(ValueError) as err:
        devices.resolve_device("cuda")
    text = str(err.value)
    assert text.startswith("--device cuda: no CUDA GPU is visible (") and "use --device cpu" in text
    assert "\n" not in text


def test_a_gpu_index_past_the_last_one_names_those_that_exist(monkeypatch, cpu_only):
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA GPUs; use one of: "
                                         r"cpu, cuda:0, cuda:1$"):
        devices.resolve_device("cuda:2")
    with pytest.raises(ValueError, match=r"--device mps: Apple's MPS is not available here"):
        devices.resolve_device("mps")


def test_the_node_gets_the_same_rule_with_its_own_wording(cpu_only):
    with pytest.raises(ValueError, match=r"^FlashVSR ⚡: device cuda:0: no CUDA GPU is visible .*use device cpu"):
        node_device("cuda:0", "cpu")


def test_auto_precision_is_bf16_on_ampere_and_newer_fp16_on_older_gpus_and_mps_fp32_on_cpu(monkeypatch):
    assert devices.resolve_precision("auto", "cpu") == "fp32"
    assert devices.resolve_precision("auto", "mps") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert devices.resolve_precision("auto", "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    assert devices.resolve_precision("auto", "cuda") == "fp16"
    assert devices.resolve_precision("bf16", "cpu") == "bf16" and devices.torch_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="precision must be one of"):
        devices.resolve_precision("fp8", "cpu")


def test_the_cli_and_the_nodes_share_the_resolver():
    from comfyui_flashvsr.flashvsr.cli import main
    from comfyui_flashvsr.nodes import runner
    assert main.torch_dtype is devices.torch_dtype and main.torch_dtype("auto", "cpu") == torch.float32
    assert runner.resolve_precision is devices.resolve_precision


CHILD = """
import sys, runpy
sys.path.insert(0, {tests!r})
import conftest
sys.argv = ["flashvsr", "upscale", {src!r}, {out!r}, "--device", "cuda", "--models", {models!r}]
runpy.run_module("comfyui_flashvsr", run_name="__main__")
"""


def test_cli_device_cuda_without_a_gpu_exits_2_with_one_error_line(tmp_path):
    code = CHILD.format(tests=str(ROOT / "tests"), src=str(ROOT / "assets" / "sample.mp4"),
                        out=str(tmp_path / "o.mp4"), models=str(tmp_path / "models"))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 1 and errors[0].startswith("ERROR: --device cuda: no CUDA GPU is visible (")
    assert "use --device cpu" in errors[0] and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []            # no output, no models folder made
