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


def _register_test_helpers() -> None:
    """tests/fake_hub.py as ``flashvsr_tests_fake_hub`` (importlib mode puts no test dir on sys.path)."""
    name = "flashvsr_tests_fake_hub"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "fake_hub.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_register_package()
_register_test_helpers()
