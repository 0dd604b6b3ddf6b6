"""SpeechExplorer: play the reply; codebook grid and spectrogram under one time cursor."""

from __future__ import annotations

import html
import io
import wave

import ipywidgets as widgets
import numpy as np
import plotly.graph_objects as go

from .. import analysis, plots
from ..analysis.speech import FRAME_SECONDS
from ._figures import Explorer


def wav_bytes(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio in [-1, 1] as a 16-bit PCM WAV file."""
    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(int(sample_rate))
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


class SpeechExplorer(Explorer):
    """Listen to the reply and see its codes and spectrogram at one moment.

    `player` plays the audio; `time` is the cursor (seconds) shared by `codes` (the frame × codebook
    grid) and `spectrum` (waveform over mel spectrogram); `info` names the frame, its 16 codes and the
    text being spoken (approximate: frame i speaks reply token i, see analysis.spoken_text). Setting
    `explorer.time.value = 1.2`, calling `select_frame(15)` or clicking the grid moves the cursor.
    """

    def __init__(self, trace, *, time: float = 0.0):
        self.trace = trace
        self.grid = analysis.codebook_grid(trace)
        self.spoken = analysis.spoken_text(trace)
        mel = analysis.mel_spectrogram(trace)
        envelope = analysis.waveform_envelope(trace)
        audio = getattr(trace, "audio", None) if not isinstance(trace, dict) else trace.get("audio")
        rate = int(
            getattr(trace, "sample_rate", 24_000)
            if not isinstance(trace, dict)
            else trace.get("sample_rate", 24_000)
        )
        frames = int(self.grid["frame"].max()) + 1 if len(self.grid) else 0
        duration = max(len(audio) / rate if audio is not None else 0.0, frames * FRAME_SECONDS)
        self.player = widgets.Audio(
            value=wav_bytes(audio, rate) if audio is not None else b"",
            format="wav",
            autoplay=False,
            loop=False,
        )
        self.time = widgets.FloatSlider(
            min=0.0,
            max=max(duration, FRAME_SECONDS),
            step=FRAME_SECONDS / 4,
            value=min(time, duration),
            description="time (s)",
            readout_format=".2f",
            continuous_update=True,
        )
        self.codes = go.FigureWidget(plots.codebook_heatmap(self.grid, cursor=self.time.value))
        self.spectrum = go.FigureWidget(
            plots.spectrogram(mel, envelope if len(envelope) else None, cursor=self.time.value)
        )
        self.info = widgets.HTML()
        for trace_ in self.codes.data:
            trace_.on_click(self._on_click)
        self.time.observe(self._on_time, names="value")
        self.widget = widgets.VBox([self.player, self.time, self.codes, self.spectrum, self.info])
        self._on_time({"new": self.time.value})

    @property
    def frame(self) -> int:
        """The talker frame under the cursor."""
        return int(self.time.value // FRAME_SECONDS)

    def select_frame(self, frame: int) -> None:
        """Move the cursor to the middle of talker frame `frame`."""
        self.time.value = min((frame + 0.5) * FRAME_SECONDS, self.time.max)

    def _on_time(self, change) -> None:
        seconds = float(change["new"])
        for figure in (self.codes, self.spectrum):
            with figure.batch_update():
                for shape in figure.layout.shapes:
                    if shape.name == "cursor":
                        shape.x0 = seconds
                        shape.x1 = seconds
        frame = self.frame
        codes = self.grid[self.grid["frame"] == frame].sort_values("codebook")["code"].tolist()
        spoken = self.spoken[self.spoken["frame"] == frame]
        text = str(spoken["text"].iloc[0]) if len(spoken) else ""
        self.info.value = (
            f"<b>{seconds:.2f} s</b> · frame {frame} · speaking <code>{html.escape(repr(text))}</code>"
            f"<br>codes {codes}"
        )

    def _on_click(self, trace, points, state) -> None:
        if points.xs:
            self.time.value = min(float(points.xs[0]) + FRAME_SECONDS / 2, self.time.max)
