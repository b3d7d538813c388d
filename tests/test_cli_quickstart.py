"""``scripts/quickstart.sh``: which torch it installs, and what it does when PyTorch's CPU index is
out of reach. The venv's interpreter is a stand-in that records each call, so no package is
installed; the script itself is the real one."""
import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# Answers like a venv python: no torch until a pip install of torch succeeds; a --index-url install
# fails when CPU_INDEX_DOWN is set (the index cannot be reached).
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  "-c import torch") [ -f "$STATE/torch" ] ;;
  *"--index-url"*) [ -z "${CPU_INDEX_DOWN:-}" ] && touch "$STATE/torch" ;;
  "-m pip install torch") touch "$STATE/torch" ;;
  *) exit 0 ;;
esac
"""


def _quickstart(tmp_path: Path, index_down: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "quickstart.sh", repo / "scripts")
    python = repo / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "CALLS": str(tmp_path / "calls"), "STATE": str(tmp_path)}
    if index_down:
        env["CPU_INDEX_DOWN"] = "1"
    done = subprocess.run(["bash", "scripts/quickstart.sh", "test"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    return done, (tmp_path / "calls").read_text().splitlines()


def _no_nvidia_driver() -> bool:
    if Path("/proc/driver/nvidia/version").exists():
        return False
    return subprocess.run("nvidia-smi -L", shell=True, capture_output=True).returncode != 0


def test_without_an_nvidia_driver_the_cpu_build_comes_from_pytorchs_index(tmp_path):
    done, calls = _quickstart(tmp_path, index_down=False)
    assert done.returncode == 0, done.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "torch" in c.split()]
    if _no_nvidia_driver():
        assert installs == [f"-m pip install --timeout 30 --retries 1 --index-url {CPU_INDEX} torch"]
        assert "no NVIDIA driver found: installing PyTorch's CPU build" in done.stdout
    else:
        assert installs == ["-m pip install torch"]
    assert calls[-1] == "-m pytest tests -q"


def test_an_unreachable_cpu_index_falls_back_to_the_default_index_and_says_so(tmp_path):
    done, calls = _quickstart(tmp_path, index_down=True)
    assert done.returncode == 0, done.stderr
    if _no_nvidia_driver():
        assert f"could not install from {CPU_INDEX}; installing PyPI's default torch" in done.stdout
    assert "-m pip install torch" in calls and calls[-1] == "-m pytest tests -q"
