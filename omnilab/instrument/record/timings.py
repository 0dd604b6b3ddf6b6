"""Stage timings: seconds and calls of each stage of a turn (the timings table)."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from ..sites import component_module
from .base import Columns, Recorder, Recording, Turn

# The stages of a turn, in the order they first run (the names of the timings table).
STAGES = (
    "thinker_prefill",
    "thinker_decode",
    "talker_prefill",
    "talker_decode",
    "code_predictor",
    "code2wav",
)


class TimingsRecorder(Recorder):
    """Times each forward of the thinker, talker, code predictor and code2wav (`hooks=True`), or
    takes the stage times a caller measures itself (`add`, as a stream does)."""

    kind = "timings"

    def __init__(self, *, hooks: bool = True):
        self.hooks = hooks
        self.times: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._t0: dict[int, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] += seconds
        self.calls[stage] += 1

    def stages(self) -> tuple[tuple[str, float, int], ...]:
        """(stage, seconds, calls) in the order the stages run (preprocessing first when timed)."""
        return tuple((s, self.times[s], self.calls[s]) for s in ("preprocessing", *STAGES) if s in self.times)

    def attach(self, recording: Recording) -> None:
        if not self.hooks:
            return
        model, tracker = recording.model, recording.tracker
        for component in ("thinker", "talker"):
            module = component_module(model, component)
            if module is not None:
                self._time(recording, module, lambda c=component: f"{c}_{tracker.current[c].phase}")
        if getattr(model, "has_talker", False):
            self._time(recording, model.talker.code_predictor, lambda: "code_predictor")
            self._time(recording, model.code2wav, lambda: "code2wav")

    def _time(self, recording: Recording, module, stage_of) -> None:
        def pre(mod, args):
            if recording.mine():
                self._t0[id(mod)] = time.perf_counter()

        def post(mod, args, output):
            if recording.mine():
                self.add(stage_of(), time.perf_counter() - self._t0.pop(id(mod), time.perf_counter()))

        recording.add_handle(module.register_forward_pre_hook(pre))
        recording.add_handle(module.register_forward_hook(post))

    def tables(self, recording: Recording, turn: Turn) -> dict[str, Columns]:
        # The code predictor runs between talker forwards (while preparing the next step's inputs),
        # so the stages do not nest and each is its own time.
        stages = self.stages()
        return {
            "timings": {
                "stage": np.array([s for s, _, _ in stages], dtype=object),
                "seconds": np.array([t for _, t, _ in stages], dtype=np.float64),
                "calls": np.array([c for _, _, c in stages], dtype=np.int32),
            }
        }
