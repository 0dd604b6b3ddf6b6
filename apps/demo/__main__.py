"""`python -m apps.demo [--model tiny] [--port 7860]` from the repository root: serve the demo."""

from .layout import main

main()
