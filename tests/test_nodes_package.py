"""The pack as ComfyUI sees it before any node runs: entry point, import cost, web/, example workflows."""
import inspect
import json
import pathlib
import subprocess
import sys

import pytest

import comfyui_flashvsr
from comfyui_flashvsr.nodes import options as o

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_VIDEO_NODES = {"LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

IMPORT_WITHOUT_COMFY = r"""
import importlib.util, sys
# Absent as if never installed: a None entry in sys.modules makes `import x` raise
# ModuleNotFoundError and `importlib.util.find_spec("x")` return None, which is what libraries
# (torch among them) see on a machine without the package. A finder that raises from find_spec
# would instead break their "is it installed?" probes.
BLOCKED = ("comfy", "comfy_api", "folder_paths", "server", "nodes", "sageattention", "triton")
for name in BLOCKED:
    sys.modules[name] = None
spec = importlib.util.spec_from_file_location("pack", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
print("torch imported by the pack import:", "torch" in sys.modules)
import pack.nodes.options, pack.nodes.runner, pack.nodes.schema
import torch
print("cuda initialised:", torch.cuda.is_initialized())
print("still blocked:", all(sys.modules.get(n, 0) is None for n in BLOCKED))
"""


def test_pack_imports_without_comfyui_sageattention_or_triton_and_stays_light():
    out = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_COMFY, str(ROOT)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch imported by the pack import: False" in out.stdout
    assert "cuda initialised: False" in out.stdout
    assert "still blocked: True" in out.stdout       # nothing swapped a real module in


def test_comfyui_gets_an_async_entrypoint_and_a_web_folder_but_no_v1_mappings():
    assert inspect.iscoroutinefunction(comfyui_flashvsr.comfy_entrypoint)
    # With NODE_CLASS_MAPPINGS present ComfyUI would take the V1 path and never call the entrypoint.
    assert not hasattr(comfyui_flashvsr, "NODE_CLASS_MAPPINGS")
    assert (ROOT / comfyui_flashvsr.WEB_DIRECTORY / "flashvsr.js").is_file()


def test_web_extension_handles_both_nodes_and_asks_the_info_route():
    js = (ROOT / "web" / "flashvsr.js").read_text()
    assert f'"{o.NODE_ID_BASIC}"' in js and f'"{o.NODE_ID_ADVANCED}"' in js
    assert 'fetchApi("/flashvsr/info")' in js
    assert "onExecuted" in js and "onDrawForeground" in js


def _workflow(name):
    return json.loads((ROOT / "example_workflows" / f"{o.EXAMPLE_WORKFLOWS[name]}.json").read_text())


def _flashvsr_values(spec, widgets_values):
    """Widget values by name; the front end stores a seed's fixed/randomize switch right after it.
    A workflow saved before an optional input was appended (gpus) has no value for it: the front end
    gives it its default, as it does for the user's own saved workflows."""
    values, it = {}, iter(widgets_values)
    for w in spec:
        if w.kind == "IMAGE":
            continue
        value = next(it, None)
        if value is None:
            assert w.optional, f"no value for {w.id}"
            continue
        values[w.id] = value
        if w.control_after_generate:
            assert next(it) in CONTROL_VALUES
    assert next(it, None) is None, "more widget values than the node has widgets"
    return values


@pytest.mark.parametrize("name,node_id,spec", [("basic", o.NODE_ID_BASIC, o.BASIC_INPUTS),
                                               ("advanced", o.NODE_ID_ADVANCED, o.ADVANCED_INPUTS)])
def test_example_workflow_is_core_video_nodes_around_flashvsr(name, node_id, spec):
    wf = _workflow(name)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert {n["type"] for n in nodes.values()} == CORE_VIDEO_NODES | {node_id}
    (fv,) = [n for n in nodes.values() if n["type"] == node_id]
    assert o.problems_with(spec, _flashvsr_values(spec, fv["widgets_values"])) == []

    def ends(link):
        _, src, src_slot, dst, dst_slot, _type = link
        return (nodes[src]["type"], nodes[src]["outputs"][src_slot]["name"],
                nodes[dst]["type"], nodes[dst]["inputs"][dst_slot]["name"])

    assert {ends(link) for link in wf["links"]} == {
        ("LoadVideo", "VIDEO", "GetVideoComponents", "video"),
        ("GetVideoComponents", "images", node_id, "frames"),
        (node_id, "frames", "CreateVideo", "images"),
        ("GetVideoComponents", "fps", "CreateVideo", "fps"),
        ("GetVideoComponents", "audio", "CreateVideo", "audio"),
        ("CreateVideo", "VIDEO", "SaveVideo", "video"),
    }


@pytest.mark.parametrize("name", ["basic", "advanced"])
def test_example_workflow_has_a_jpeg_thumbnail_of_the_same_name(name):
    data = (ROOT / "example_workflows" / f"{o.EXAMPLE_WORKFLOWS[name]}.jpg").read_bytes()
    assert data[:3] == b"\xff\xd8\xff" and len(data) > 10_000


def _locale(lang):
    return json.loads((ROOT / "locales" / lang / "nodeDefs.json").read_text(encoding="utf-8"))


def test_english_locale_is_the_nodes_own_names_and_tooltips():
    en = _locale("en")
    for node_id, display, spec in ((o.NODE_ID_BASIC, o.DISPLAY_BASIC, o.BASIC_INPUTS),
                                   (o.NODE_ID_ADVANCED, o.DISPLAY_ADVANCED, o.ADVANCED_INPUTS)):
        assert en[node_id]["display_name"] == display
        assert en[node_id]["inputs"] == {w.id: {"name": w.id, "tooltip": w.tooltip} for w in spec}


def test_chinese_locale_translates_every_node_input_and_output():
    zh, en = _locale("zh"), _locale("en")
    assert set(zh) == set(en)
    for node_id, node in zh.items():
        assert node["display_name"] != en[node_id]["display_name"] and node["description"]
        assert list(node["inputs"]) == list(en[node_id]["inputs"])
        for name, entry in node["inputs"].items():
            assert entry["name"] and entry["tooltip"] != en[node_id]["inputs"][name]["tooltip"], name
            assert any("\u4e00" <= ch <= "\u9fff" for ch in entry["tooltip"]), name
        assert node["outputs"]["0"]["name"]


def test_chinese_locale_labels_every_fixed_dropdown_entry_and_toggle():
    zh = _locale("zh")
    for node_id, spec in ((o.NODE_ID_BASIC, o.BASIC_INPUTS), (o.NODE_ID_ADVANCED, o.ADVANCED_INPUTS)):
        for w in spec:
            labels = zh[node_id]["inputs"][w.id].get("options")
            if w.kind == "BOOLEAN":          # a toggle's two labels
                assert list(labels) == ["on", "off"] and all(labels.values()), w.id
                continue
            if w.kind != "COMBO" or all(str(v).isdigit() for v in w.options):
                assert labels is None, w.id        # numbers (gpus) read the same in every language
                continue
            # the server's own devices (cuda:0, mps) keep their names; the entries every machine has are labelled
            assert list(labels) == list(o.BASE_DEVICES if w.machine_options else w.options), w.id
            assert all(labels.values()) and len(set(labels.values())) == len(labels), w.id
    assert zh[o.NODE_ID_ADVANCED]["inputs"]["sageattention"]["options"] == {"enable": "启用", "disable": "禁用"}


def test_readme_links_the_chinese_guide_with_quickstart_and_sageattention():
    zh = (ROOT / "README.zh.md").read_text(encoding="utf-8")
    assert "(README.zh.md)" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## 快速开始" in zh and "## SageAttention（可选）" in zh and "scripts/quickstart.sh" in zh
