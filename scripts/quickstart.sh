#!/usr/bin/env bash
# Quickstart. Sets up a virtual environment in .venv (reusing an installed torch when there is one,
# since a CUDA torch is several GB), installs this pack into it, then:
#   bash scripts/quickstart.sh         upscales the bundled sample clip to outputs/sample_x4.mp4
#                                      (the weights, about 7 GB, download on first use)
#   bash scripts/quickstart.sh test    runs the test suite (CPU only, a few minutes)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
task=${1:-run}
case "$task" in run|test) ;; *) echo "usage: bash scripts/quickstart.sh [run|test]" >&2; exit 2 ;; esac

CPU_INDEX=https://download.pytorch.org/whl/cpu

has_nvidia_driver() {
    [ -e /proc/driver/nvidia/version ] || nvidia-smi -L >/dev/null 2>&1
}

# PyPI's Linux torch bundles the CUDA libraries (several GB). Without an NVIDIA driver they are dead
# weight, so take PyTorch's CPU build (a few hundred MB) from its own index; if that index cannot
# be reached, PyPI's build still runs on the CPU, it is just a bigger download.
install_torch() {
    if [ "$(uname -s)" = Linux ] && ! has_nvidia_driver; then
        echo "no NVIDIA driver found: installing PyTorch's CPU build from $CPU_INDEX"
        if .venv/bin/python -m pip install --timeout 30 --retries 1 --index-url "$CPU_INDEX" torch; then
            return
        fi
        echo "could not install from $CPU_INDEX; installing PyPI's default torch instead" \
             "(it runs on the CPU too, but brings several GB of CUDA libraries)"
    else
        echo "installing PyTorch (see https://pytorch.org/get-started/locally/ for other CUDA builds)"
    fi
    .venv/bin/python -m pip install torch
}

if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    install_torch
fi

if [ "$task" = test ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
    exec .venv/bin/python -m pytest tests -q
fi
.venv/bin/python -m pip install -q -e .
mkdir -p outputs
exec .venv/bin/flashvsr upscale assets/sample.mp4 outputs/sample_x4.mp4 --overwrite
