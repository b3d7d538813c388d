"""The specs become ComfyUI V3 inputs with every option carried over (a recording stand-in for `io`).

The real `comfy_api.latest.io` is exercised by the integration test through /object_info.
"""
import types

import pytest

from comfyui_flashvsr.nodes import options as o
from comfyui_flashvsr.nodes.schema import schema, to_io_input


def _recording_io():
    def kind(name):
        def make(*args, **kwargs):
            return (name, args, kwargs)
        return types.SimpleNamespace(Input=make, Output=lambda **kw: (name + ".Output", kw))
    io = types.SimpleNamespace(**{k: kind(k) for k in ("Image", "Combo", "Boolean", "Int", "Float")})
    io.Schema = lambda **kw: kw
    return io


@pytest.mark.parametrize("spec", [o.BASIC_INPUTS, o.ADVANCED_INPUTS], ids=["basic", "advanced"])
def test_each_widget_becomes_the_matching_comfy_input_with_its_options(spec):
    io = _recording_io()
    for w in spec:
        kind, args, kw = to_io_input(io, w)
        assert args == (w.id,) and kw["tooltip"] == w.tooltip
        expected = {"IMAGE": "Image", "COMBO": "Combo", "BOOLEAN": "Boolean", "INT": "Int", "FLOAT": "Float"}
        assert kind == expected[w.kind]
        if w.kind == "COMBO":
            assert (kw["options"], kw["default"], kw["optional"]) == (list(w.options), w.default, w.optional)
        if w.kind in ("INT", "FLOAT"):
            assert (kw["default"], kw["min"], kw["max"], kw["step"]) == (w.default, w.min, w.max, w.step)


def test_seed_keeps_a_fixed_value_unless_the_user_asks_for_randomize():
    (seed,) = [w for w in o.ADVANCED_INPUTS if w.id == "seed"]
    _, _, kw = to_io_input(_recording_io(), seed)
    assert kw["control_after_generate"] == "fixed"


def test_schema_lists_inputs_in_spec_order_and_one_frames_output():
    s = schema(_recording_io(), node_id=o.NODE_ID_ADVANCED, display_name=o.DISPLAY_ADVANCED,
               description="d", inputs=o.ADVANCED_INPUTS, category=o.CATEGORY)
    assert [i[1][0] for i in s["inputs"]] == [w.id for w in o.ADVANCED_INPUTS]
    assert s["node_id"] == "FlashVSRBoltAdvanced" and s["display_name"] == "FlashVSR ⚡ Advanced"
    assert s["category"] == "FlashVSR"
    [(kind, out)] = s["outputs"]
    assert kind == "Image.Output" and out["display_name"] == "frames"
    assert "video upscale" in s["search_aliases"]


def test_unknown_widget_kind_is_refused_by_name():
    with pytest.raises(ValueError, match="no ComfyUI input for widget kind 'MASK' \\(m\\)"):
        to_io_input(_recording_io(), o.Widget("MASK", "m", "a mask input nobody asked for"))
