"""Reading, validating and locating weight files (no network: see test_download.py for that)."""
import datetime
import hashlib
import importlib.util
import io
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors, save_file

from comfyui_flashvsr.flashvsr.weights import store as weights
from comfyui_flashvsr.flashvsr.weights.catalog import KNOWN_FILES, PROMPT_SHA256, ROLES, VERSIONS
from comfyui_flashvsr.flashvsr.weights.store import (COMMON_PREFIXES, MissingWeights, WeightError, check_models_folder,
                                               ensure_weights, locate_weights, read_prompt, read_state_dict,
                                               sha256_of)


hub = importlib.import_module("flashvsr_tests_fake_hub")
CONTENTS = hub.tiny_official_bytes()
CATALOG = hub.tiny_catalog(CONTENTS)
NAMES = {"dit": "diffusion_pytorch_model_streaming_dmd.safetensors", "lq_proj": "LQ_proj_in.ckpt",
         "prompt": "posi_prompt.pth", "tcdecoder": "TCDecoder.ckpt", "vae": "Wan2.1_VAE.pth"}


def install(root: Path, version: str, role: str, folder: str | None = None, data: bytes | None = None) -> Path:
    """Write the tiny official file for (version, role) into root/<folder> (default: the version folder)."""
    target = root / (version if folder is None else folder) / NAMES[role]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(CONTENTS[version, role] if data is None else data)
    return target


def install_all(root: Path, version: str) -> None:
    for role in ROLES:
        install(root, version, role)


def pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- reading

def test_read_state_dict_reads_safetensors_and_weights_only_pickles_alike(tmp_path):
    sd = hub.tiny_dit(0)
    save_file(sd, tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "a.pth")
    assert_same(read_state_dict(tmp_path / "a.safetensors"), sd)
    assert_same(read_state_dict(tmp_path / "a.pth"), sd)


@pytest.mark.parametrize("wrapper", ["state_dict", "model_state", "model", "module"])
def test_read_state_dict_unwraps_a_lone_nested_state_dict(tmp_path, wrapper):
    sd = hub.tiny_tcdecoder()
    torch.save({wrapper: sd}, tmp_path / "w.ckpt")
    assert_same(read_state_dict(tmp_path / "w.ckpt"), sd)


def test_read_state_dict_rejects_entries_next_to_the_weights(tmp_path):
    torch.save({"state_dict": hub.tiny_tcdecoder(), "epoch": 3}, tmp_path / "w.ckpt")
    with pytest.raises(WeightError, match=r"w\.ckpt.*'epoch' \(int\)"):
        read_state_dict(tmp_path / "w.ckpt")


def test_strip_prefixes_removes_one_common_prefix_only_when_asked(tmp_path):
    sd = hub.tiny_dit(0)
    prefixed = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    save_file(prefixed, tmp_path / "p.safetensors")
    assert set(read_state_dict(tmp_path / "p.safetensors")) == set(prefixed)
    assert_same(read_state_dict(tmp_path / "p.safetensors", strip_prefixes=COMMON_PREFIXES), sd)
    mixed = dict(prefixed, extra=torch.zeros(1))  # no prefix shared by every key: nothing stripped
    save_file(mixed, tmp_path / "m.safetensors")
    assert set(read_state_dict(tmp_path / "m.safetensors", strip_prefixes=COMMON_PREFIXES)) == set(mixed)


def test_pickle_with_python_objects_is_refused_by_weights_only(tmp_path):
    torch.save({"w": torch.zeros(2), "created": datetime.date(2025, 1, 1)}, tmp_path / "x.pth")
    with pytest.raises(WeightError, match=r"x\.pth: refused.*weights_only=True"):
        read_state_dict(tmp_path / "x.pth")


@pytest.mark.parametrize("content, message", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 575694948\n",
     "Git LFS pointer"),
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", "HTML"),
    (b"", "empty"),
    (b"Entry not found", "text error message"),
])
def test_unusable_files_name_the_file_the_problem_and_the_fix(tmp_path, content, message):
    path = tmp_path / "LQ_proj_in.ckpt"
    path.write_bytes(content)
    with pytest.raises(WeightError) as err:
        read_state_dict(path)
    assert str(path) in str(err.value) and message in str(err.value) and "download it again" in str(err.value)


def test_truncated_safetensors_is_reported_as_truncated(tmp_path):
    data = save_safetensors(hub.tiny_dit(0))
    path = tmp_path / "d.safetensors"
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(WeightError, match=r"d\.safetensors: the file is truncated"):
        read_state_dict(path)


def test_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    data = CONTENTS["v1.1", "lq_proj"]
    path = tmp_path / "LQ_proj_in.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightError, match=r"LQ_proj_in\.ckpt: the PyTorch checkpoint is truncated or corrupt"):
        read_state_dict(path)


def test_a_pickle_named_safetensors_is_reported(tmp_path):
    path = tmp_path / "FlashVSR1_1.safetensors"
    path.write_bytes(CONTENTS["v1.1", "lq_proj"])
    with pytest.raises(WeightError, match=r"named \.safetensors but holds a PyTorch pickle"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_the_wrong_network_is_named_before_anything_is_loaded(tmp_path, fmt):
    path = tmp_path / f"given.{fmt}"
    sd = hub.tiny_tcdecoder()
    if fmt == "safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    with pytest.raises(WeightError, match=r"given\..*holds the TCDecoder, not the DiT.*TCDecoder\.ckpt"):
        read_state_dict(path, role="dit")
    assert set(read_state_dict(path, role="tcdecoder")) == set(sd)


def test_read_prompt_accepts_a_bare_tensor_or_a_one_tensor_safetensors(tmp_path):
    prompt = hub.tiny_prompt()
    torch.save(prompt, tmp_path / "posi_prompt.pth")
    save_file({"prompt": prompt}, tmp_path / "Prompt.safetensors")
    assert torch.equal(read_prompt(tmp_path / "posi_prompt.pth"), prompt)
    assert torch.equal(read_prompt(tmp_path / "Prompt.safetensors"), prompt)


def test_read_prompt_reports_the_shape_it_found(tmp_path):
    torch.save(torch.zeros(512, 64), tmp_path / "posi_prompt.pth")
    with pytest.raises(WeightError, match=r"posi_prompt\.pth: .*\(1, L, C\).*found shape \(512, 64\)"):
        read_prompt(tmp_path / "posi_prompt.pth")


def test_read_prompt_rejects_a_network_given_as_the_prompt(tmp_path):
    (tmp_path / "posi_prompt.pth").write_bytes(CONTENTS["v1.1", "tcdecoder"])
    with pytest.raises(WeightError, match=r"holds the TCDecoder, not the prompt embedding"):
        read_prompt(tmp_path / "posi_prompt.pth")


def test_sha256_of_matches_hashlib_across_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 5 + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert sha256_of(tmp_path / "f", chunk_size=7) == hashlib.sha256(data).hexdigest()
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_known_files_give_one_source_per_file_and_mirrors_only_for_the_prompt():
    for version in VERSIONS:
        for role in ROLES:
            rows = [f for f in KNOWN_FILES if f.version == version and f.role == role]
            assert rows and len({f.filename for f in rows}) == 1, (version, role)
            assert len(rows) == 1 or all(f.mirror and f.sha256 == PROMPT_SHA256 for f in rows), (version, role)
    assert all(re.fullmatch(r"[0-9a-f]{64}", f.sha256) for f in KNOWN_FILES)
    dit = {f.version: f.sha256 for f in KNOWN_FILES if f.role == "dit"}
    assert dit["v1"] != dit["v1.1"]  # versions need separate folders because these differ


# ---------------------------------------------------------------- locating

def test_locate_returns_the_decoder_of_the_mode(tmp_path):
    install_all(tmp_path, "v1.1")
    tiny = locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG)
    assert tiny.dit == tmp_path / "v1.1" / NAMES["dit"] and tiny.vae is None
    assert tiny.tcdecoder == tmp_path / "v1.1" / "TCDecoder.ckpt"
    full = locate_weights([tmp_path], "v1.1", "full", catalog=CATALOG)
    assert full.vae == tmp_path / "v1.1" / "Wan2.1_VAE.pth" and full.tcdecoder is None


def test_shared_files_may_sit_in_the_root_or_the_other_version_folder(tmp_path):
    install(tmp_path, "v1.1", "dit")
    install(tmp_path, "v1.1", "lq_proj")
    install(tmp_path, "v1.1", "tcdecoder", folder="")
    install(tmp_path, "v1.1", "prompt", folder="v1")
    files = locate_weights([tmp_path], "v1.1", "tiny-long", catalog=CATALOG)
    assert files.tcdecoder == tmp_path / "TCDecoder.ckpt"
    assert files.prompt == tmp_path / "v1" / "posi_prompt.pth"


def test_version_specific_files_never_cross_versions(tmp_path):
    install_all(tmp_path, "v1")
    with pytest.raises(MissingWeights) as err:
        locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG)
    assert {m.role for m in err.value.missing} == {"dit", "lq_proj"}
    assert tmp_path / "v1.1" / NAMES["dit"] in err.value.expected_paths


def test_repacks_are_used_for_their_version_only(tmp_path):
    for role in ("lq_proj", "prompt", "tcdecoder"):
        install(tmp_path, "v1", role)
        install(tmp_path, "v1.1", role)
    save_file(hub.tiny_dit(1), tmp_path / "FlashVSR1_1.safetensors")
    assert locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG).dit == tmp_path / "FlashVSR1_1.safetensors"
    with pytest.raises(MissingWeights, match=r"Wan2_1-T2V-1_3B_FlashVSR_fp32\.safetensors"):
        locate_weights([tmp_path], "v1", "tiny", catalog=CATALOG)


def test_missing_weights_lists_every_missing_file_with_its_paths_and_url(tmp_path):
    roots = [tmp_path / "a", tmp_path / "b"]
    install(roots[1], "v1.1", "vae", folder="")
    with pytest.raises(MissingWeights) as err:
        locate_weights(roots, "v1.1", "full", catalog=CATALOG)
    text = str(err.value)
    assert [m.role for m in err.value.missing] == ["dit", "lq_proj", "prompt"]
    for m in err.value.missing:
        assert m.filename in text and m.url in text
    for path in (roots[0] / "v1.1" / NAMES["dit"], roots[1] / "v1.1" / NAMES["dit"],
                 roots[0] / "posi_prompt.pth", roots[1] / "v1" / "posi_prompt.pth"):
        assert str(path) in text and path in err.value.expected_paths
    assert "JunhaoZhuang/FlashVSR-v1.1/resolve/" in text


def test_an_official_file_outside_a_version_folder_is_pointed_out(tmp_path):
    install(tmp_path, "v1.1", "dit", folder="")
    with pytest.raises(MissingWeights, match=r"outside a version folder.*move it into"):
        locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG)


def test_locate_names_a_wrong_network_in_an_official_slot(tmp_path):
    install_all(tmp_path, "v1.1")
    save_file(hub.tiny_tcdecoder(), tmp_path / "v1.1" / NAMES["dit"])
    with pytest.raises(WeightError, match=r"diffusion_pytorch_model_streaming_dmd\.safetensors: this file holds "
                                          r"the TCDecoder, not the DiT"):
        locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG)


def test_other_sizes_pass_the_cheap_checks_but_not_the_sha256_verification(tmp_path):
    install_all(tmp_path, "v1.1")
    path = install(tmp_path, "v1.1", "tcdecoder", data=CONTENTS["v1.1", "tcdecoder"] + b"\0" * 10)
    assert locate_weights([tmp_path], "v1.1", "tiny", catalog=CATALOG).tcdecoder == path
    doctor = [s for s in check_models_folder([tmp_path], catalog=CATALOG) if s.path == path]
    assert doctor[0].state == "present" and "not the official file's size" in doctor[0].detail
    with pytest.raises(WeightError, match=re.escape(str(path)) + r".*larger than the official TCDecoder"):
        ensure_weights([tmp_path], "v1.1", "tiny", download=False, verify_sha256=True, catalog=CATALOG)


def test_verify_sha256_tells_which_version_a_misplaced_file_belongs_to(tmp_path):
    install_all(tmp_path, "v1.1")
    install(tmp_path, "v1.1", "dit", data=CONTENTS["v1", "dit"])  # same size, other version's bytes
    ensure_weights([tmp_path], "v1.1", "tiny", download=False, catalog=CATALOG)  # cheap checks pass
    with pytest.raises(WeightError, match=r"It is the official v1 DiT.*move it to the v1 folder"):
        ensure_weights([tmp_path], "v1.1", "tiny", download=False, verify_sha256=True, catalog=CATALOG)


# ---------------------------------------------------------------- doctor

def test_doctor_reports_present_missing_and_corrupt_files(tmp_path):
    install(tmp_path, "v1.1", "dit")
    lq = install(tmp_path, "v1.1", "lq_proj", data=b"version https://git-lfs.github.com/spec/v1\n")
    install(tmp_path, "v1.1", "prompt", folder="")
    save_file(hub.tiny_tcdecoder(), tmp_path / "TCDecoder.safetensors")
    status = {(s.label, s.state): s for s in check_models_folder([tmp_path], catalog=CATALOG)}
    assert status["v1.1 DiT", "present"].path == tmp_path / "v1.1" / NAMES["dit"]
    assert status["v1.1 LQ projector", "corrupt"].path == lq
    assert "Git LFS pointer" in status["v1.1 LQ projector", "corrupt"].detail
    assert status["prompt embedding", "present"].path == tmp_path / "posi_prompt.pth"
    assert status["v1 DiT", "missing"].path == tmp_path / "v1" / NAMES["dit"]
    assert status["TCDecoder", "missing"].path == tmp_path / "v1.1" / "TCDecoder.ckpt"
    repack = [s for (label, state), s in status.items() if label.startswith("repack TCDecoder.safetensors")]
    assert [s.state for s in repack] == ["present"]


def test_doctor_deep_check_catches_what_headers_cannot(tmp_path):
    install(tmp_path, "v1.1", "lq_proj", data=CONTENTS["v1", "lq_proj"])
    cheap = [s for s in check_models_folder([tmp_path], catalog=CATALOG) if s.label == "v1.1 LQ projector"]
    deep = [s for s in check_models_folder([tmp_path], deep=True, catalog=CATALOG)
            if s.label == "v1.1 LQ projector"]
    assert [s.state for s in cheap] == ["present"]
    assert [s.state for s in deep] == ["corrupt"] and "official v1 LQ projector" in deep[0].detail


def test_weights_module_exports_the_contract():
    for name in ("WeightError", "MissingWeights", "read_state_dict", "read_prompt", "sha256_of", "KNOWN_FILES",
                 "WeightFiles", "locate_weights", "ensure_weights", "check_models_folder", "FileStatus"):
        assert hasattr(weights, name), name
    assert issubclass(weights.MissingWeights, weights.WeightError) and issubclass(weights.WeightError, ValueError)
