"""Triton kernels on the CPU: a child process with ``TRITON_INTERPRET=1`` (the interpreter must be
chosen before triton is imported, so never in the test process itself) runs a script that prints
one JSON line of results as its last line."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(child: str, *args: str, timeout: float = 300) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", child, *args], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
