"""Speech codes: each talker frame's 16 codes (codebook 0 from the talker, 1-15 from the code predictor)."""

from __future__ import annotations

import numpy as np

from .base import Columns, Recorder, Recording, Turn


class CodesRecorder(Recorder):
    """The frames the talker consumed: its output carries them (`hidden_states[-1]`, None at prefill),
    though `generate` drops them. A stream, which has each frame before the talker runs, `add`s them."""

    kind = "codes"
    follows_forwards = False

    def __init__(self, *, hooks: bool = True):
        self.hooks = hooks
        self.frames: list[np.ndarray] = []

    def add(self, codes) -> None:
        self.frames.append(np.asarray(codes, dtype=np.int64).reshape(-1))

    def attach(self, recording: Recording) -> None:
        if self.hooks and getattr(recording.model, "has_talker", False):
            recording.add_handle(recording.model.talker.register_forward_hook(self._hook))

    def _hook(self, module, args, output) -> None:
        codes = output.hidden_states[-1] if output.hidden_states is not None else None
        if codes is not None:
            self.frames.append(codes[0].detach().cpu().numpy().astype(np.int64))

    def codes(self, books: int) -> np.ndarray:
        """The frames as one array [frames, books]."""
        return np.stack(self.frames) if self.frames else np.zeros((0, books), dtype=np.int64)

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        if not self.frames:
            return {}
        codes = np.stack(self.frames)
        frames, books = np.meshgrid(np.arange(codes.shape[0]), np.arange(codes.shape[1]), indexing="ij")
        return {"codes": {"frame": frames.ravel(), "codebook": books.ravel(), "code": codes.ravel()}}
