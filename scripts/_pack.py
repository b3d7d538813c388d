"""Import this checkout as the package ``comfyui_flashvsr`` (as ComfyUI does, by path) for the GPU scripts."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_pack():
    if "comfyui_flashvsr" in sys.modules:
        return sys.modules["comfyui_flashvsr"]
    spec = importlib.util.spec_from_file_location("comfyui_flashvsr", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_flashvsr"] = mod
    spec.loader.exec_module(mod)
    return mod
