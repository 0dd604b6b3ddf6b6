"""What a stream hands out: its events, the latency breakdown, and Qwen3-Omni's published figures."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..reply import SAMPLE_RATE, Reply
from ..trace import Trace

EVENT_KINDS = ("text", "audio", "trace", "done")

# Qwen3-Omni technical report, 30B-A3B, one request: the first-packet breakdown a GPU run can be held
# against (seconds).
PUBLISHED = {
    "thinker_ttft": 0.088,
    "talker_ttft": 0.057,
    "code_predictor_per_frame": 0.014,
    "code2wav_per_chunk": 0.003,
    "first_packet_latency": 0.234,
}


# -- what a stream hands out ------------------------------------------------------------------------
@dataclass(frozen=True)
class Timings:
    """Where the time of one streamed reply went (seconds), named as in Qwen3-Omni's latency table.

    preprocessing: chat template and media features (the processor); thinker_ttft: from the model
    inputs to the first reply token (media encoders, prefill, first token); talker_ttft: from that
    token to the talker's first codebook-0 token (its prompt, its prefill); code_predictor_per_frame:
    mean time for a frame's residual codebooks 1-15; code2wav_per_chunk: mean time of one causal
    decode (`chunk_frames` new frames plus left context); first_packet_latency: from the first `next()` to the
    first audio chunk; full_reply_latency: from the first `next()` to the end; real_time_factor:
    full_reply_latency / seconds of speech (below 1: faster than real time). `stages` holds the
    trace's timings rows: (stage, seconds, calls).
    """

    preprocessing: float
    thinker_ttft: float
    talker_ttft: float
    code_predictor_per_frame: float
    code2wav_per_chunk: float
    first_packet_latency: float
    full_reply_latency: float
    real_time_factor: float
    thinker_tokens: int
    frames: int
    chunks: int
    speech_seconds: float
    device: str = "cpu"
    stages: tuple = ()

    def as_dict(self) -> dict:
        """The figures as a plain dict (stages as {stage: {"seconds", "calls"}})."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "stages"}
        out["stages"] = {stage: {"seconds": s, "calls": c} for stage, s, c in self.stages}
        return out


@dataclass(frozen=True)
class StreamEvent:
    """One thing a stream hands out.

    kind "text": `text` is the new piece of the reply. kind "audio": `audio` is float32 mono at
    `sample_rate`, the samples after the `sample_offset` already sent; `frame` is the last frame it
    covers. kind "trace": `component`, `phase`, `step` of one forward, `routing` (trace routing
    columns) and `positions` (pos, token_id, t, h, w) of the rows it added; `frame` for a talker
    step that consumed that frame's codes. kind "done": `reply` (an omnilab Reply, its trace
    attached), `trace` and `timings`. `seconds`: time since the stream started (its first `next()`).
    """

    kind: str
    seconds: float = 0.0
    text: str = ""
    audio: np.ndarray | None = None
    sample_rate: int = SAMPLE_RATE
    sample_offset: int = 0
    component: str = ""
    phase: str = ""
    step: int = -1
    frame: int = -1
    routing: pd.DataFrame | None = None
    positions: pd.DataFrame | None = None
    reply: Reply | None = None
    trace: Trace | None = None
    timings: Timings | None = None


def format_timings(timings: Timings) -> str:
    """The latency breakdown as a readable table, next to Qwen3-Omni's published GPU figures."""
    ms = lambda s: "—" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:9.1f} ms"  # noqa: E731
    rows = [
        ("preprocessing", timings.preprocessing, None),
        ("thinker TTFT", timings.thinker_ttft, "thinker_ttft"),
        ("talker TTFT", timings.talker_ttft, "talker_ttft"),
        ("code predictor / frame", timings.code_predictor_per_frame, "code_predictor_per_frame"),
        ("code2wav / chunk", timings.code2wav_per_chunk, "code2wav_per_chunk"),
        ("first-packet latency", timings.first_packet_latency, "first_packet_latency"),
        ("full-reply latency", timings.full_reply_latency, None),
    ]
    lines = [f"latency breakdown ({timings.device})", f"{'stage':<24}{'this run':>12}{'published':>13}"]
    for name, value, key in rows:
        lines.append(f"{name:<24}{ms(value):>12}{ms(PUBLISHED.get(key)) if key else '':>13}")
    rtf = timings.real_time_factor
    lines.append(f"{'real-time factor':<24}{'—' if math.isnan(rtf) else f'{rtf:9.3f}':>12}")
    lines.append(
        f"{timings.thinker_tokens} tokens, {timings.frames} frames ({timings.speech_seconds:.2f} s of speech) "
        f"in {timings.chunks} chunks; published: Qwen3-Omni-30B-A3B on GPU, one request"
    )
    return "\n".join(lines)
