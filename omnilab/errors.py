"""One error type per family, defined once.

Every message names the thing, the reason and the way out.
"""

from __future__ import annotations


class OmnilabError(Exception):
    """Base of every error omnilab raises on purpose."""


class MediaError(OmnilabError, ValueError):
    """An audio, image or video input that cannot be used (missing, corrupt, too long, too big)."""


class ConversationError(OmnilabError, ValueError):
    """A conversation that is not in the Qwen chat format, or asks for something the model cannot do."""


class ModelLoadError(OmnilabError):
    """A model name, path or checkpoint that cannot be loaded."""


class TraceError(OmnilabError):
    """A trace or trace store that cannot be read (truncated, foreign, other schema version)."""


class InterventionError(OmnilabError, ValueError):
    """An intervention that does not fit the model (unknown layer, expert out of range)."""
