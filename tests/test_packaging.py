"""Packaging: registry metadata, Manager requirements, the sample clip, and real pip installs.

The install tests build the pack into a throwaway venv (``--system-site-packages`` reuses the torch
already installed; ``--no-build-isolation --no-deps`` keeps it offline) from a copy of the tree, so
they never write build artefacts into the checkout.
"""
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requirements() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_pytest_settings_are_kept():
    assert PYPROJECT["tool"]["pytest"]["ini_options"] == {
        "addopts": "--import-mode=importlib -p no:cacheprovider", "testpaths": ["tests"]}


def test_registry_metadata_is_complete_and_name_has_no_comfyui():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == "flashvsr-bolt" and "comfyui" not in project["name"].lower()
    assert comfy["DisplayName"] == "FlashVSR ⚡"
    assert comfy["PublisherId"] and comfy["Icon"].startswith("https://")
    assert isinstance(comfy["includes"], list)
    assert project["urls"]["Repository"].startswith("https://")
    assert (ROOT / "assets" / "icon.png").is_file()


def test_dependencies_never_pin_torch_and_requirements_omit_it():
    deps = PYPROJECT["project"]["dependencies"]
    assert [d for d in deps if _name(d) in TORCH_FAMILY] == ["torch"]       # present, unpinned
    reqs = _requirements()
    assert not [r for r in reqs if _name(r) in TORCH_FAMILY]
    assert {_name(r) for r in reqs} == {_name(d) for d in deps} - {"torch"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {_name(d) for d in extras["sage"]} >= {"sageattention"}
    assert "pytest" in {_name(d) for d in extras["test"]}
    fa4 = {_name(d): d for d in extras["fa4"]}              # a prerelease: pinned exactly
    assert "==" in fa4["flash-attn-4"] and "==" in fa4["nvidia-cutlass-dsl"]


def test_every_subpackage_of_the_repo_is_packaged():
    setuptools = PYPROJECT["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"comfyui_flashvsr": "."}
    on_disk = {"comfyui_flashvsr." + ".".join(p.parent.relative_to(ROOT).parts)
               for p in ROOT.glob("**/__init__.py")
               # hidden folders (.venv, a developer's scratch copies) are never packaged
               if p.parent != ROOT and p.parts[len(ROOT.parts)] != "tests"
               and not p.parts[len(ROOT.parts)].startswith(".")}
    assert set(setuptools["packages"]) == on_disk | {"comfyui_flashvsr"}
    assert PYPROJECT["project"]["scripts"]["flashvsr"] == "comfyui_flashvsr.flashvsr.cli.main:main"


def test_sample_clip_is_small_short_and_has_audio():
    sample = ROOT / "assets" / "sample.mp4"
    assert sample.stat().st_size < 300_000
    with av.open(str(sample)) as c:
        video, audio = c.streams.video[0], c.streams.audio[0]
        frames = sum(1 for _ in c.decode(video))
        seconds = c.duration / 1e6
    assert frames >= 21 and 1.0 <= seconds <= 10.0 and audio.codec_context.name == "aac"
    assert (video.codec_context.width * 4) % 128 == 0 and (video.codec_context.height * 4) % 128 == 0


def test_readme_quickstart_has_exactly_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", section, flags=re.S)
    commands = [line for block in blocks for line in block.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert len(commands) == 2, commands
    for script in re.findall(r"bash (\S+)", " ".join(commands)):
        assert (ROOT / script).is_file(), script


def _copy_tree(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__",
                                    ".whl", ".pytest_cache", "outputs")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _run(*cmd, cwd) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_pip_install_exposes_package_console_script_and_module_entry(tmp_path, editable):
    src = _copy_tree(tmp_path / "src")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    # When the tests themselves run in a venv, its packages (torch, setuptools) must stay visible.
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run(py, "-c", purelib, cwd=tmp_path).strip())
    outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "_outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")
    # The outer pip drives the venv's interpreter (pip >= 22.3); the build uses the setuptools
    # visible to it, so nothing is downloaded.
    _run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", *(["-e"] if editable else []), src, cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run(py, "-c", "import comfyui_flashvsr.flashvsr.cli.main as c, comfyui_flashvsr.models, "
                 "comfyui_flashvsr.attention, comfyui_flashvsr.nodes; print(c.__file__)", cwd=elsewhere)
    expected = src if editable else venv
    assert Path(where.strip()).resolve().is_relative_to(expected.resolve())
    assert "upscale" in _run(venv / "bin" / "flashvsr", "--help", cwd=elsewhere)
    assert "--sageattention" in _run(py, "-m", "comfyui_flashvsr", "upscale", "--help", cwd=elsewhere)
