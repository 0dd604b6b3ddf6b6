"""The value of one assistant turn, and the audio constants it is measured in (a leaf module)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .trace import Trace

SAMPLE_RATE = 24_000  # code2wav output
SAMPLES_PER_FRAME = 1_920  # 80 ms at 24 kHz: one talker frame (12.5 Hz)


@dataclass(frozen=True)
class Reply:
    """One assistant turn.

    text: the decoded reply (special tokens removed); token_ids: the generated thinker ids (the
    end-of-turn token included when it was produced); audio: float32 mono at `sample_rate`, or None;
    codes: the talker's codec frames [frames, 16] (codebook 0 from the talker, 1-15 from the code
    predictor), or None; trace: the Trace of this turn when one was recorded, else None.
    """

    text: str
    token_ids: list[int]
    audio: np.ndarray | None
    sample_rate: int
    codes: np.ndarray | None
    model_id: str
    random_weights: bool
    trace: Trace | None = None

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / self.sample_rate
