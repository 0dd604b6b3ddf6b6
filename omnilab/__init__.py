"""omnilab: a Jupyter-first research workbench for the Qwen3-Omni model family.

import omnilab
lab = omnilab.load()            # the embedded default: tiny, random weights, offline
reply = lab.generate([{"role": "user", "content": "Hello"}])
"""

from __future__ import annotations

from ._version import __version__  # noqa: F401
from .errors import (
    ConversationError,
    InterventionError,
    MediaError,
    ModelLoadError,
    OmnilabError,
    TraceError,
)
from .lab import OmniLab, Reply, load


def card(name: str = "qwen3-omni-30b-a3b-instruct"):
    """The architecture card of a model: a preset, a loaded OmniLab, or a real config built on the meta device."""
    from .models import card as card_module

    if isinstance(name, OmniLab):
        return name.card()
    if name in ("tiny", "small"):
        from .models.presets import preset_config

        return card_module.card(card_module.meta_model(preset_config(name)))
    from .models import real_size

    if name in real_size.NAMES:
        return card_module.card(card_module.meta_model(real_size.config(name)))
    return card_module.card(card_module.meta_model(card_module.real_config(name)))


def __getattr__(attr: str):
    # Heavier parts load on first use.
    if attr == "Trace":
        from .trace import Trace

        return Trace
    if attr == "open_store":
        from .store import open_store

        return open_store
    raise AttributeError(f"module 'omnilab' has no attribute {attr!r}")


__all__ = [
    "ConversationError",
    "InterventionError",
    "MediaError",
    "ModelLoadError",
    "OmniLab",
    "OmnilabError",
    "Reply",
    "Trace",
    "TraceError",
    "card",
    "load",
    "open_store",
]
