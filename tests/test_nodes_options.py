"""The node inputs as data: ids, order, tooltips, defaults, ranges and validation messages."""
import dataclasses
import pathlib

import pytest

from comfyui_flashvsr.flashvsr.config import UpscaleConfig
from comfyui_flashvsr.nodes import options as o

# Node ids that other FlashVSR packs register; ours must never equal one of them.
PEER_IDS = {
    "AILab_FlashVSR", "AILab_FlashVSR_Advanced", "FlashVSRNode", "FlashVSRNodeAdv", "FlashVSRInitPipe",
    "FlashVSR_SM_Model", "FlashVSR_SM_KSampler", "FlashVSR_SM_VideoPathLoop", "FlashVSRModelLoader",
    "TEFlashVSRModelLoader", "TEFlashVSRTuning", "TEFlashVSRRestore", "FlashVSR", "FlashVSR_Upscale",
}

# Workflows store widget values by position: this order is part of the public contract. New inputs
# are appended only (gpus: issue #16).
ADVANCED_ORDER = [
    "frames", "version", "mode", "scale", "sageattention", "color_fix", "sparse_ratio", "kv_ratio",
    "local_range", "tile_size", "tile_overlap", "vae_tiling", "vae_tile_height", "vae_tile_width",
    "vae_stride_height", "vae_stride_width", "precision", "device", "keep_model_loaded", "preprocess",
    "compile", "seed", "vram_budget_gib", "gpus",
]


def test_node_ids_and_display_names_are_the_published_ones():
    assert (o.NODE_ID_BASIC, o.DISPLAY_BASIC) == ("FlashVSRBolt", "FlashVSR ⚡")
    assert (o.NODE_ID_ADVANCED, o.DISPLAY_ADVANCED) == ("FlashVSRBoltAdvanced", "FlashVSR ⚡ Advanced")


def test_node_ids_collide_with_no_other_flashvsr_pack():
    ours = {o.NODE_ID_BASIC, o.NODE_ID_ADVANCED}
    assert not ours & PEER_IDS
    assert not any(i.startswith(("AILab_FlashVSR", "FlashVSRNode", "FlashVSR_SM_")) for i in ours)


def test_widget_order_is_frozen():
    assert [w.id for w in o.ADVANCED_INPUTS] == ADVANCED_ORDER
    assert [w.id for w in o.BASIC_INPUTS] == ["frames", "preset", "scale", "seed"]


@pytest.mark.parametrize("spec", [o.BASIC_INPUTS, o.ADVANCED_INPUTS], ids=["basic", "advanced"])
def test_every_input_has_a_tooltip_and_a_valid_default(spec):
    for w in spec:
        assert len(w.tooltip) > 20, w.id
        if w.kind == "COMBO":
            assert w.default in w.options, w.id
        elif w.kind in ("INT", "FLOAT"):
            assert w.min <= w.default <= w.max, w.id
    defaults = {w.id: w.default for w in spec}
    assert o.problems_with(spec, defaults) == []


def test_advanced_covers_every_engine_option():
    # color_fix_float32 only chooses the arithmetic of the colour fix (fp32 avoids bf16 banding);
    # overlap_decode only schedules the same kernels on two streams (identical frames, measured).
    # kv_int8_values stays CLI-only until its accuracy is measured on a GPU (docs/performance.md, "Int8 values").
    engine_fields = ({f.name for f in dataclasses.fields(UpscaleConfig)}
                     - {"color_fix_float32", "overlap_decode", "kv_int8_values"})
    widget_ids = {w.id for w in o.ADVANCED_INPUTS}
    covered = widget_ids | {"vae_tile", "vae_stride", "vram_budget"}     # vram_budget from vram_budget_gib
    assert engine_fields <= covered


def test_vram_budget_gib_zero_is_auto_and_a_number_is_that_budget():
    assert o.NodeSettings().upscale_config().vram_budget == "auto"
    assert o.NodeSettings(vram_budget_gib=12.0).upscale_config().vram_budget == 12.0


def test_default_settings_give_the_engine_defaults():
    assert o.NodeSettings().upscale_config() == UpscaleConfig()


def test_presets_cover_tiny_tiny_long_and_full():
    modes = {o.basic_settings(p, 4.0, 0).mode for p in ("Tiny", "Tiny-Long", "Full")}
    assert modes == {"tiny", "tiny-long", "full"}
    s = o.basic_settings("Full", 2.0, 7)
    assert (s.version, s.sageattention, s.scale, s.seed) == ("v1.1", "enable", 2.0, 7)
    assert s.keep_model_loaded


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown preset 'Huge'.*'Tiny', 'Tiny-Long', 'Full'"):
        o.basic_settings("Huge", 4.0, 0)


def test_out_of_range_values_name_the_input_and_the_range():
    problems = o.problems_with(o.ADVANCED_INPUTS, {"scale": 5.0, "local_range": 0, "mode": "huge"})
    assert "scale is 5.0; it must be between 1 and 4" in problems
    assert "local_range is 0; it must be between 1 and 63" in problems
    assert "mode is 'huge'; choose one of ['tiny', 'tiny-long', 'full']" in problems


def test_linked_inputs_are_left_to_run_time():
    assert o.problems_with(o.ADVANCED_INPUTS, {w.id: None for w in o.ADVANCED_INPUTS}) == []


def test_tile_size_must_be_off_or_a_multiple_of_128_from_256():
    assert o.problems_with(o.ADVANCED_INPUTS, {"tile_size": 512, "tile_overlap": 64}) == []
    [msg] = o.problems_with(o.ADVANCED_INPUTS, {"tile_size": 300, "tile_overlap": 32})
    assert msg.startswith("tile_size is 300; use 0 (off) or a multiple of 128")


def test_tile_overlap_must_be_less_than_half_the_tile():
    [msg] = o.problems_with(o.ADVANCED_INPUTS, {"tile_size": 512, "tile_overlap": 256})
    assert msg == "tile_overlap is 256; it must be less than half of tile_size (512), i.e. at most 255"


def test_vae_stride_larger_than_its_tile_is_rejected():
    problems = o.problems_with(o.ADVANCED_INPUTS, {"vae_tile_width": 480, "vae_stride_width": 520})
    assert problems == ["vae_stride_width (520) is larger than vae_tile_width (480), which would leave "
                        "gaps; use a stride of at most the tile"]


def test_vae_tiles_are_entered_in_pixels_and_passed_in_latent_units():
    s = o.NodeSettings(vae_tiling=True, vae_tile_height=256, vae_tile_width=512,
                       vae_stride_height=128, vae_stride_width=256)
    cfg = s.upscale_config()
    assert (cfg.vae_tile, cfg.vae_stride, cfg.vae_tiling) == ((32, 64), (16, 32), True)


def test_invalid_settings_raise_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        o.advanced_settings(scale=0.5, sparse_ratio=9.0, color_fix="sepia")
    text = str(err.value)
    assert text.startswith("FlashVSR ⚡: ")
    assert "scale is 0.5" in text and "sparse_ratio is 9.0" in text and "color_fix is 'sepia'" in text


def test_advanced_settings_rejects_inputs_it_does_not_know():
    with pytest.raises(TypeError, match=r"unknown inputs \['turbo'\]"):
        o.advanced_settings(turbo=True)


def test_each_cross_field_problem_is_keyed_by_the_input_it_is_about():
    assert o.cross_field_problems({"tile_size": 512, "tile_overlap": 300}) == {
        "tile_overlap": "tile_overlap is 300; it must be less than half of tile_size (512), i.e. at most 255"}
    assert list(o.cross_field_problems({"tile_size": 300, "tile_overlap": 32})) == ["tile_size"]
    assert list(o.cross_field_problems({"vae_tile_width": 480, "vae_stride_width": 520})) == ["vae_stride_width"]
    assert list(o.cross_field_problems({"vae_tile_height": 484})) == ["vae_tile_height"]


def test_node_and_engine_share_one_tile_rule():
    from comfyui_flashvsr.flashvsr.config import tile_problems
    for size, overlap in ((512, 300), (300, 32), (512, 64), (0, 999)):
        assert o.cross_field_problems({"tile_size": size, "tile_overlap": overlap}) == tile_problems(size, overlap)
    assert UpscaleConfig(tile_size=512, tile_overlap=64).problems() == {}
    with pytest.raises(ValueError, match=r"^tile_overlap is 300; it must be less than half of tile_size \(512\)"):
        UpscaleConfig(tile_size=512, tile_overlap=300)


def test_the_advanced_validator_names_only_tile_size():
    # ComfyUI shows the validator's text on every input in its signature and checks the others itself.
    import ast
    tree = ast.parse((pathlib.Path(o.__file__).parent / "advanced.py").read_text())
    (fn,) = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "validate_inputs"]
    assert [a.arg for a in fn.args.args] == ["cls", "tile_size"] and fn.args.kwarg is None


def test_tile_size_is_checked_on_its_own_range_and_rule():
    assert o.tile_size_problem(None) is None and o.tile_size_problem(0) is None and o.tile_size_problem(512) is None
    assert o.tile_size_problem(300) == "tile_size is 300; use 0 (off) or a multiple of 128 of at least 256, e.g. 512"
    assert o.tile_size_problem(8320) == "tile_size is 8320; it must be between 0 and 8192"
    assert o.tile_size_problem(-128) == "tile_size is -128; it must be between 0 and 8192"


def test_the_front_end_gets_the_engine_overlap_limit_for_every_tile_size():
    limits = o.tile_overlap_limits()
    assert list(limits)[:2] == ["256", "384"] and list(limits)[-1] == "8192" and len(limits) == 63
    for size, most in limits.items():
        assert UpscaleConfig(tile_size=int(size), tile_overlap=most).problems() == {}
        assert list(UpscaleConfig(tile_size=int(size), tile_overlap=0).problems()) == []
        with pytest.raises(ValueError, match=f"^tile_overlap is {most + 1}; .* at most {most}$"):
            UpscaleConfig(tile_size=int(size), tile_overlap=most + 1)


def test_a_bad_pair_from_outside_the_front_end_is_refused_at_run_time_naming_tile_overlap():
    with pytest.raises(ValueError) as err:
        o.advanced_settings(tile_size=512, tile_overlap=300)
    assert str(err.value) == ("FlashVSR ⚡: tile_overlap is 300; it must be less than half of tile_size (512), "
                              "i.e. at most 255")


def test_allowed_values_come_from_the_config_module():
    from comfyui_flashvsr.flashvsr import config
    widgets = {w.id: w for w in o.ADVANCED_INPUTS}
    assert set(widgets["mode"].options) == set(config.MODES)
    assert set(widgets["version"].options) == set(config.VERSIONS)
    assert widgets["sageattention"].options == config.SAGE_CHOICES
    assert widgets["precision"].options == config.PRECISIONS
    assert widgets["tile_size"].step == config.TILE_STEP


def test_kv_ratio_is_a_whole_number_and_a_saved_float_still_loads():
    (kv,) = [w for w in o.ADVANCED_INPUTS if w.id == "kv_ratio"]
    assert (kv.kind, kv.default, kv.step) == ("INT", 3, 1)
    assert o.NodeSettings(kv_ratio=3.0).upscale_config().kv_ratio == 3.0  # a workflow saved before


def test_device_dropdown_lists_only_devices_this_machine_has(monkeypatch):
    from comfyui_flashvsr.flashvsr import devices
    monkeypatch.setattr(devices, "cuda_count", lambda: 0)
    monkeypatch.setattr(devices, "_mps_available", lambda: False)
    (dev,) = [w for w in o.advanced_inputs() if w.id == "device"]
    assert dev.options == ("auto", "cpu")
    monkeypatch.setattr(devices, "cuda_count", lambda: 2)
    (dev,) = [w for w in o.advanced_inputs() if w.id == "device"]
    assert dev.options == ("auto", "cpu", "cuda:0", "cuda:1")
    # the widget order saved workflows rely on is unchanged
    assert [w.id for w in o.advanced_inputs()] == ADVANCED_ORDER


def test_gpus_is_the_last_input_optional_and_one_gpu_by_default():
    gpus = o.ADVANCED_INPUTS[-1]
    assert (gpus.id, gpus.kind, gpus.default, gpus.optional) == ("gpus", "COMBO", "1", True)
    assert not any(w.optional for w in o.ADVANCED_INPUTS[:-1])
    # an API prompt saved before gpus existed leaves it out: one GPU
    assert o.advanced_settings().gpus == 1 and o.advanced_settings(gpus="4").gpus == 4


@pytest.mark.parametrize("visible,choices", [(0, ["1"]), (1, ["1"]), (2, ["1", "2"]), (3, ["1", "2", "3"]),
                                             (8, ["1", "2", "3", "4", "6"]),
                                             (16, ["1", "2", "3", "4", "6", "12"])])
def test_gpus_offers_the_counts_that_split_the_12_heads_and_this_server_has(monkeypatch, visible, choices):
    from comfyui_flashvsr.flashvsr import devices
    monkeypatch.setattr(devices, "cuda_count", lambda: visible)
    (gpus,) = [w for w in o.advanced_inputs() if w.id == "gpus"]
    assert list(gpus.options) == choices
    assert [w.id for w in o.advanced_inputs()] == ADVANCED_ORDER


def test_a_gpu_count_that_cannot_run_is_one_message_about_gpus(monkeypatch):
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert o.gpus_problem(1, "mps", 0) is None and o.gpus_problem(2, "cuda:0", 2) is None
    assert o.gpus_problem(4, "cpu", 4) is None          # gloo processes: the tests' path
    assert o.gpus_problem(5, "cuda:0", 8) == ("gpus is 5; the DiT's 12 attention heads split evenly only over "
                                              "1, 2, 3, 4, 6, 12 GPUs")
    assert o.gpus_problem(4, "cuda:0", 2) == "gpus is 4, but this server sees 2 CUDA GPUs; choose one of ['1', '2']"
    assert o.gpus_problem(2, "cuda", 1) == "gpus is 2, but this server sees 1 CUDA GPU; choose one of ['1']"
    assert o.gpus_problem(2, "mps", 2) == "gpus is 2, but device mps is not a CUDA GPU; several GPUs need CUDA"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert "has no NCCL" in o.gpus_problem(2, "cuda:0", 2)

