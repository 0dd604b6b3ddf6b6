"""Read and validate the audio, images and videos that go into Qwen3-Omni.

Every loader takes a local file (or an in-memory array), checks it before doing expensive work
(size, real content type, duration and pixel count from the header), decodes it and hands back
what the model's processor expects:

- `load_audio`: float32 mono at 16 kHz in [-1, 1];
- `load_image`: an RGB `PIL.Image.Image`;
- `load_video`: a `Video` of uint8 frames [T, H, W, 3] sampled at `fps`, with an even frame count
  (Qwen's temporal patch is 2), and the audio track when asked for.

Anything unusable raises `MediaError` naming the item, the reason and the way out. Nothing is
fetched from the network. Limits are module-level constants, read at call time.

`files.py` names items and checks files by their content; `audio.py`, `image.py` and `video.py` load
each kind; `limits.py` holds the limits (set them here: `media.MAX_AUDIO_SECONDS = ...`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from . import limits
from .audio import check_model_audio, load_audio
from .files import check_file, sniff
from .image import load_image
from .limits import *  # noqa: F403 (the limits, named in limits.py)
from .video import Video, load_video

__all__ = ["Video", "check_file", "check_model_audio", "load_audio", "load_image", "load_video", "sniff"]
__all__ += [name for name in vars(limits) if name.isupper()]


class _Media(types.ModuleType):
    """This package, where setting a limit (`media.MAX_AUDIO_SECONDS = 60`) sets the one the loaders read."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name.isupper() and hasattr(limits, name):
            setattr(limits, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Media
