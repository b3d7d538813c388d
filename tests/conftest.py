"""Make the pack importable as ``comfyui_flashvsr`` whatever its folder is called.

ComfyUI imports the pack by path, so inside the pack every import is relative; tests need one stable
name for the same files.
"""
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "comfyui_flashvsr"


def _register_package() -> None:
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


# Test helpers, in import order: each becomes ``flashvsr_tests_<file>`` (importlib mode puts no test
# directory on sys.path). They live in tests/, not in the shipped package.
TEST_HELPERS = ("fake_hub", "tiny_weights", "fixture_weights", "fixture_run", "comfy_client", "parallel_checks", "triton_child")


def register_test_helpers() -> None:
    """Also called by scripts that reuse the helpers (scripts/gpu_profile.py)."""
    for stem in TEST_HELPERS:
        name = f"flashvsr_tests_{stem}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{stem}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)


_register_package()
register_test_helpers()
