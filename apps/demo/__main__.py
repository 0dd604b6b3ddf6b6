"""`python -m apps.demo [--model organism] [--port 7860] [--max-upload-mb 200]` from the repository
root: serve the demo (see serve.py)."""

import sys

from .serve import main

sys.exit(main())
