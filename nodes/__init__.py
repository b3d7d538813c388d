"""The ComfyUI nodes. Only ``extension.py``, ``basic.py``, ``advanced.py`` and ``comfy_glue.py``
import ComfyUI; ``options.py``, ``runner.py`` and ``schema.py`` work without it."""
