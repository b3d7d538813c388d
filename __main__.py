"""``python -m comfyui_flashvsr ...``: the command line (see ``flashvsr/cli.py``)."""
from .flashvsr.cli import main

raise SystemExit(main())
