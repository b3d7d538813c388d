"""Optional: the pack inside a real ComfyUI server and its real front end. Skipped unless both a
ComfyUI repository (``FLASHVSR_COMFYUI_GIT``) and the ComfyUI harness are present; the rest of the
suite never needs either.

    FLASHVSR_COMFYUI_GIT=/path/to/ComfyUI(.git) python -m pytest tests/integration -v

Uses a ComfyUI harness (``FLASHVSR_HARNESS``; by default ``../shared/tools/comfyui-harness``
beside this checkout, which a plain clone does not have) to check
ComfyUI out, build its CPU venv and start ``main.py --cpu`` with this pack linked into
``custom_nodes/ComfyUI-FlashVSR``; small generated weights sit in a temporary ``FlashVSR`` folder
added through ``--extra-model-paths-config``, and the server runs with ``HF_HUB_OFFLINE=1``.
Screenshots land in ``<workdir>/flashvsr-browser/``.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import pytest

from flashvsr_tests_tiny_weights import write_tiny_weights
from comfyui_flashvsr.nodes import options as o
from flashvsr_tests_comfy_client import ComfyClient, HarnessSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
SETTINGS = HarnessSettings.from_env(ROOT)
COMFY_GIT, HARNESS, WORKDIR, PORT, URL = (SETTINGS.comfy_git, SETTINGS.harness, SETTINGS.workdir, SETTINGS.port,
                                          SETTINGS.url)
PACK_NAME = "ComfyUI-FlashVSR"
SAMPLE = ROOT / "assets" / "sample.mp4"  # the pack places it as input/flashvsr_sample.mp4

pytestmark = pytest.mark.skipif(not COMFY_GIT or not HARNESS.is_dir(),
                                reason="optional: set FLASHVSR_COMFYUI_GIT to a ComfyUI git repository and "
                                       "FLASHVSR_HARNESS to the ComfyUI harness")


_client = ComfyClient(URL)
http, run_prompt = _client.http, _client.run_prompt


def node_text(history: dict, class_type: str, prompt: dict) -> list[str]:
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return history["outputs"][nid]["text"]


def _basic_prompt(frames: int, seed: int, size: int = 32) -> dict:
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": size, "height": size, "batch_size": frames, "color": 0}},
            "2": {"class_type": o.NODE_ID_BASIC,
                  "inputs": {"frames": ["1", 0], "preset": "Tiny", "scale": 2.0, "seed": seed}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    (tmp / "models" / "FlashVSR").mkdir(parents=True)
    write_tiny_weights(tmp / "models" / "FlashVSR", "v1.1")
    (tmp / "input").mkdir()
    (tmp / "output").mkdir()
    yaml = tmp / "extra_model_paths.yaml"
    yaml.write_text(f"flashvsr_test:\n  is_default: true\n  FlashVSR: {tmp / 'models' / 'FlashVSR'}\n")
    link = tmp / PACK_NAME
    link.symlink_to(ROOT, target_is_directory=True)
    cmd = [str(HARNESS / "comfy_harness.sh"), "--comfy-git", COMFY_GIT, "--workdir", str(WORKDIR),
           "--port", str(PORT), "--pack", str(link), "--keep-running", "--browser", "smoke",
           "--expect-node", o.NODE_ID_BASIC, "--expect-node", o.NODE_ID_ADVANCED]
    for arg in ("--extra-model-paths-config", yaml, "--input-directory", tmp / "input",
                "--output-directory", tmp / "output"):
        cmd += ["--server-arg", str(arg)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    try:
        assert started.returncode == 0, started.stdout[-4000:] + started.stderr[-4000:]
        venv_python = WORKDIR / "venv" / "bin" / "python"
        yield {"tmp": tmp, "venv_python": venv_python,
               "browser_python": WORKDIR / "browser-venv" / "bin" / "python",
               "log": WORKDIR / "server.log"}
    finally:
        subprocess.run([str(HARNESS / "comfy_harness.sh"), "--stop", "--workdir", str(WORKDIR)], timeout=120)


def browser(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([server["browser_python"], HARNESS / "comfy_browser.py", "--url", URL,
                           "--out-dir", WORKDIR / "flashvsr-browser", *args],
                          capture_output=True, text=True, timeout=600)


def test_object_info_lists_both_nodes_with_their_ids_names_order_and_tooltips(server):
    for node_id, display, spec in ((o.NODE_ID_BASIC, o.DISPLAY_BASIC, o.BASIC_INPUTS),
                                   (o.NODE_ID_ADVANCED, o.DISPLAY_ADVANCED, o.ADVANCED_INPUTS)):
        _, info = http(f"/object_info/{node_id}")
        node = info[node_id]
        assert (node["display_name"], node["category"]) == (display, o.CATEGORY)
        assert node["python_module"] == f"custom_nodes.{PACK_NAME}"
        required = [w.id for w in spec if not w.optional]
        optional = [w.id for w in spec if w.optional]      # appended after API prompts were saved
        assert list(node["input"]["required"]) == required
        assert list(node["input"].get("optional", {})) == optional
        assert node["input_order"]["required"] == required
        assert node["input_order"].get("optional", []) == optional
        assert all(opts[1]["tooltip"] for part in ("required", "optional")
                   for opts in node["input"].get(part, {}).values())
        assert node["output"] == ["IMAGE"] and node["output_name"] == ["frames"]
    assert "Cannot import" not in server["log"].read_text()


def test_info_route_says_whether_sageattention_is_installed(server):
    for path in ("/flashvsr/info", "/api/flashvsr/info"):
        status, info = http(path)
        assert status == 200 and isinstance(info["sageattention"]["installed"], bool)


def test_the_pack_puts_the_example_clip_into_a_fresh_input_folder(server):
    assert (server["tmp"] / "input" / "flashvsr_sample.mp4").read_bytes() == SAMPLE.read_bytes()


def _advanced_prompt(**values) -> dict:
    prompt = _basic_prompt(2, 0, size=16)
    prompt["2"] = {"class_type": o.NODE_ID_ADVANCED,
                   "inputs": {"frames": ["1", 0], **{w.id: w.default for w in o.ADVANCED_INPUTS[1:]}, **values}}
    return prompt


def test_a_bad_tile_overlap_is_one_error_naming_tile_overlap(server):
    # ComfyUI 0.33 puts a validator's text on every input it names, so the pair is checked when the
    # node runs (the front end keeps tile_overlap in range as the user edits: see the zh scenario).
    prompt = _advanced_prompt(tile_size=512, tile_overlap=300)
    hist = run_prompt(prompt)
    assert hist["status"]["status_str"] == "error"
    [error] = [m[1] for m in hist["status"]["messages"] if m[0] == "execution_error"]
    assert error["node_id"] == "2"
    assert error["exception_message"].strip() == (
        "FlashVSR ⚡: tile_overlap is 300; it must be less than half of tile_size (512), i.e. at most 255")


def test_a_bad_tile_size_is_one_error_on_tile_size(server):
    status, body = http("/prompt", {"prompt": _advanced_prompt(tile_size=300, tile_overlap=64)})
    assert status == 400
    [error] = body["node_errors"]["2"]["errors"]
    assert error["extra_info"]["input_name"] == "tile_size"
    assert error["details"] == "tile_size - tile_size is 300; use 0 (off) or a multiple of 128 of at least 256, e.g. 512"


def test_the_info_route_gives_the_front_end_every_tile_overlap_limit(server):
    limits = http("/flashvsr/info")[1]["tile_overlap_max"]
    assert limits == o.tile_overlap_limits() and limits["512"] == 255


def test_a_value_out_of_range_lands_on_its_own_input(server):
    status, body = http("/prompt", {"prompt": _advanced_prompt(kv_ratio=20)})
    assert status == 400
    [error] = body["node_errors"]["2"]["errors"]
    assert (error["type"], error["extra_info"]["input_name"]) == ("value_bigger_than_max", "kv_ratio")


def test_more_gpus_than_this_cpu_server_has_is_one_error_on_gpus(server):
    assert http("/flashvsr/info")[1]["gpus"] == 0
    status, body = http("/prompt", {"prompt": _advanced_prompt(gpus="2")})
    assert status == 400
    [error] = body["node_errors"]["2"]["errors"]
    assert (error["type"], error["extra_info"]["input_name"]) == ("value_not_in_list", "gpus")


def test_an_api_prompt_saved_before_gpus_existed_still_runs_on_one_gpu(server):
    prompt = _advanced_prompt()
    del prompt["2"]["inputs"]["gpus"]
    hist = run_prompt(prompt)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]


def test_bad_values_are_rejected_before_running_with_messages_that_say_what_to_do(server):
    prompt = _advanced_prompt(tile_size=512, tile_overlap=300)
    prompt["2"]["inputs"].update(tile_overlap=64, sageattention="maybe")
    status, body = http("/prompt", {"prompt": prompt})
    assert status == 400 and body["node_errors"]["2"]["errors"][0]["type"] == "value_not_in_list"


@pytest.mark.parametrize("name,node_id", [("basic", o.NODE_ID_BASIC), ("advanced", o.NODE_ID_ADVANCED)])
def test_example_workflow_from_the_templates_browser_runs_with_no_edit(server, name, node_id):
    res = subprocess.run([server["browser_python"], HERE / "flashvsr_browser.py", "--harness", HARNESS,
                          "--url", URL, "--out-dir", WORKDIR / "flashvsr-browser", "--scenario", "template",
                          "--pack", PACK_NAME, "--title", o.EXAMPLE_WORKFLOWS[name], "--tag", name,
                          "--timeout", "900"], capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert node_id in result["node_types"] and result["load_video"] == ["flashvsr_sample.mp4"]
    hist = http(f"/history/{result['prompt_id']}")[1][result["prompt_id"]]
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:3000]
    prompt = hist["prompt"][2]
    text = node_text(hist, node_id, prompt)
    sample = json.loads(subprocess.run([server["venv_python"], HERE / "sample_clip.py", SAMPLE, "--probe"],
                                       capture_output=True, text=True, check=True).stdout)
    assert text[0].startswith("attention: ") and f"{sample['frames']} frames in" in text[0]
    (save,) = [k for k, v in prompt.items() if v["class_type"] == "SaveVideo"]
    [video] = [v for v in hist["outputs"][save]["images"]]
    path = server["tmp"] / "output" / video["subfolder"] / video["filename"]
    probe = subprocess.run([server["venv_python"], HERE / "sample_clip.py", path, "--probe"],
                           capture_output=True, text=True, check=True)
    assert json.loads(probe.stdout) == {"frames": sample["frames"], "width": sample["width"] * 4,
                                        "height": sample["height"] * 4, "audio": True}


@pytest.mark.parametrize("name,node_id", [("basic", o.NODE_ID_BASIC), ("advanced", o.NODE_ID_ADVANCED)])
def test_templates_browser_lists_and_opens_the_example(server, name, node_id):
    res = browser(server, "templates", "--pack", PACK_NAME, "--open", o.EXAMPLE_WORKFLOWS[name],
                  "--expect-node", node_id)
    assert res.returncode == 0, res.stdout + res.stderr


def test_chinese_front_end_shows_the_nodes_chinese_names(server):
    res = subprocess.run([server["browser_python"], HERE / "flashvsr_browser.py", "--harness", HARNESS,
                          "--url", URL, "--out-dir", WORKDIR / "flashvsr-browser", "--scenario", "zh"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    zh = json.loads((ROOT / "locales" / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))[o.NODE_ID_ADVANCED]
    assert result["locale"] == "zh" and result["title"] == zh["display_name"]
    assert result["widget_labels"]["tile_overlap"] == zh["inputs"]["tile_overlap"]["name"]
    assert result["input_labels"][0] == zh["inputs"]["frames"]["name"]
    # dropdown entries show in Chinese; the values sent and saved stay the English ones
    labels = result["option_labels"]
    assert labels["sageattention"] == ["enable", "启用"] and labels["mode"] == ["tiny", "tiny（快速）"]
    assert labels["color_fix"] == ["adain", "AdaIN"] and labels["device"] == ["auto", "自动"]
    assert result["sent"]["sageattention"] == "enable" and result["sent"]["mode"] == "tiny"
    assert result["toggle_labels"]["keep_model_loaded"] == [True, "保持加载", "运行后卸载"]
    assert result["sent"]["keep_model_loaded"] is True
    vae = ["vae_tiling", "vae_tile_height", "vae_tile_width", "vae_stride_height", "vae_stride_width"]
    # a CPU server sees no GPU: gpus stays hidden (at 1) whatever else is chosen
    assert result["hidden"] == {"fresh": sorted_like(vae + ["tile_overlap", "gpus"]),
                                "mode=full": sorted_like(vae[1:] + ["tile_overlap", "gpus"]),
                                "vae_tiling=True": ["tile_overlap", "gpus"], "tile_size=512": ["gpus"]}
    # tile_overlap follows tile_size as the user edits: 300 with 512-px tiles comes down to 255,
    # smaller tiles bring it down again
    assert result["overlap"] == {"typed 300 at tile_size 512": [255, 255], "tile_size 256": [127, 127],
                                 "tile_size 512 again": [127, 255], "sent": 127}


def sorted_like(names: list[str]) -> list[str]:
    """``names`` in the node's widget order."""
    order = [w.id for w in o.ADVANCED_INPUTS]
    return sorted(names, key=order.index)


def test_cancel_stops_within_a_chunk_and_the_cached_model_still_runs(server):
    assert run_prompt(_basic_prompt(2, 1))["status"]["status_str"] == "success"  # model now loaded
    long_run = server["tmp"] / "long.api.json"
    long_run.write_text(json.dumps(_basic_prompt(240, 2)))
    res = subprocess.run([server["venv_python"], HERE / "ws_cancel.py", "--url", URL, "--prompt", long_run,
                          "--node", "2", "--after", "2"], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["ended"] == "interrupted" and seen["interrupted_node"] == "2"
    assert seen["total"] > 10 and len(seen["after"]) <= 1  # at most the chunk already running
    assert max(seen["before"] + seen["after"]) < seen["total"]
    again = _basic_prompt(2, 3)
    hist = run_prompt(again)
    assert hist["status"]["status_str"] == "success"
    assert "weights: already loaded" in node_text(hist, o.NODE_ID_BASIC, again)


def test_comfy_unload_models_frees_the_cached_pipeline(server):
    run_prompt(_basic_prompt(2, 9, size=16))
    assert http("/flashvsr/info")[1]["loaded"] is not None
    http("/free", {"unload_models": True})
    t0 = time.monotonic()
    while http("/flashvsr/info")[1]["loaded"] is not None:
        assert time.monotonic() - t0 < 30, "POST /free did not release the FlashVSR model"
        time.sleep(0.5)


def test_user_adds_advanced_node_disables_sage_runs_and_sees_the_report_on_the_node(server):
    res = subprocess.run([server["browser_python"], HERE / "flashvsr_browser.py", "--harness", HARNESS,
                          "--url", URL, "--out-dir", WORKDIR / "flashvsr-browser"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["fallbacks"] == [] and result["status"] == "success"
    report = result["report_on_node"]
    assert report[0].startswith("attention: ") and "sage (" not in report[0]
    assert not any("requested but not used" in line for line in report)
    installed = result["badge_info"]["installed"]
    assert isinstance(installed, bool)
    # a CPU server: enable runs PyTorch attention whatever is installed, and the badge says so
    assert result["badge_enable"] == "CPU: PyTorch attention"
    assert result["badge_disable"] == "sageattention off: PyTorch attention"
    cached = result["report_after_cached_run"]
    assert cached[:len(report)] == report and cached[-1] == "(result reused from ComfyUI's cache)"
    [sent] = [v for v in result["api_prompt"].values() if v["class_type"] == o.NODE_ID_ADVANCED]
    assert sent["inputs"]["sageattention"] == "disable"
