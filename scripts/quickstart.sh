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

if [ ! -x .venv/bin/python ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "installing PyTorch (see https://pytorch.org/get-started/locally/ for other CUDA builds)"
    .venv/bin/python -m pip install torch
fi

if [ "$task" = test ]; then
    .venv/bin/python -m pip install -q -e ".[test]"
    exec .venv/bin/python -m pytest tests -q
fi
.venv/bin/python -m pip install -q -e .
mkdir -p outputs
exec .venv/bin/flashvsr upscale assets/sample.mp4 outputs/sample_x4.mp4 --overwrite
