"""``python -m comfyui_flashvsr ...``: the command line (see ``flashvsr/cli/main.py``)."""
from .flashvsr.cli.main import main

raise SystemExit(main())
