"""Speech figures: the codebook grid and the spectrogram with its waveform."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._style import TEMPLATE, as_text

__all__ = ["codebook_heatmap", "spectrogram"]


def codebook_heatmap(grid: pd.DataFrame, *, cursor: float | None = None, title=None) -> go.Figure:
    """Frames × codebooks: each cell the code (x is the frame's time in seconds); hover shows the frame,
    codebook, code and the text being spoken. Input: `analysis.codebook_grid(trace)`. `cursor` (seconds)
    draws a vertical line (layout shape named "cursor").
    """
    frames = np.unique(grid["frame"].to_numpy()) if len(grid) else np.zeros(0, dtype=np.int64)
    codebooks = np.unique(grid["codebook"].to_numpy()) if len(grid) else np.zeros(0, dtype=np.int64)
    fi = np.searchsorted(frames, grid["frame"].to_numpy())
    ci = np.searchsorted(codebooks, grid["codebook"].to_numpy())
    z = np.full((len(codebooks), len(frames)), np.nan)
    z[ci, fi] = grid["code"].to_numpy(dtype=float)
    seconds = np.zeros(len(frames))
    seconds[fi] = grid["seconds"].to_numpy(dtype=float)
    spoken = np.full(len(frames), "", dtype=object)
    spoken[fi] = as_text(grid["text"])
    custom = np.stack(
        [np.broadcast_to(frames[None, :], z.shape), np.broadcast_to(spoken[None, :], z.shape)], axis=-1
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=seconds,
            y=codebooks,
            customdata=custom,
            colorscale="Turbo",
            colorbar={"title": "code"},
            hovertemplate="frame %{customdata[0]} (%{x:.2f} s)<br>codebook %{y}: code %{z}<br>"
            "speaking %{customdata[1]}<extra></extra>",
            name="codes",
        )
    )
    if cursor is not None:
        fig.add_vline(x=float(cursor), line_color="#D62728", line_width=2, name="cursor")
    fig.update_layout(
        template=TEMPLATE,
        title=title or "Codec codes per frame (codebook 0: talker, 1-15: code predictor)",
        xaxis_title="seconds",
        yaxis_title="codebook",
    )
    return fig


def spectrogram(
    mel: pd.DataFrame, wave: pd.DataFrame | None = None, *, cursor: float | None = None, title=None
) -> go.Figure:
    """The reply's waveform (top, min/max envelope) over its log-mel spectrogram (bottom), sharing the
    time axis. Inputs: `analysis.mel_spectrogram(trace)` and `analysis.waveform_envelope(trace)`.
    Traces: "low" and "high" (the envelope, when `wave` is given), then "mel". `cursor` (seconds) draws
    a vertical line across both (layout shapes named "cursor").
    """
    rows = 2 if wave is not None else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.3, 0.7] if rows == 2 else None,
        vertical_spacing=0.04,
    )
    if wave is not None:
        fig.add_trace(
            go.Scatter(
                x=wave["seconds"],
                y=wave["low"],
                mode="lines",
                line={"width": 0.5, "color": "#4C78A8"},
                name="low",
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=wave["seconds"],
                y=wave["high"],
                mode="lines",
                fill="tonexty",
                line={"width": 0.5, "color": "#4C78A8"},
                name="high",
                showlegend=False,
                hovertemplate="%{x:.3f} s<extra></extra>",
            ),
            row=1,
            col=1,
        )
        fig.update_yaxes(title_text="amplitude", row=1, col=1)
    frames = np.unique(mel["frame"].to_numpy()) if len(mel) else np.zeros(0, dtype=np.int64)
    bands = np.unique(mel["mel"].to_numpy()) if len(mel) else np.zeros(0, dtype=np.int64)
    z = np.full((len(bands), len(frames)), np.nan)
    fi = np.searchsorted(frames, mel["frame"].to_numpy())
    bi = np.searchsorted(bands, mel["mel"].to_numpy())
    z[bi, fi] = mel["db"].to_numpy(dtype=float)
    seconds = np.zeros(len(frames))
    seconds[fi] = mel["seconds"].to_numpy(dtype=float)
    hz = np.zeros(len(bands))
    hz[bi] = mel["hz"].to_numpy(dtype=float)
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=seconds,
            y=hz,
            colorscale="Magma",
            colorbar={"title": "dB"},
            name="mel",
            hovertemplate="%{x:.2f} s<br>%{y:.0f} Hz<br>%{z:.1f} dB<extra></extra>",
        ),
        row=rows,
        col=1,
    )
    fig.update_yaxes(title_text="Hz (mel bands)", row=rows, col=1)
    fig.update_xaxes(title_text="seconds", row=rows, col=1)
    if cursor is not None:
        fig.add_vline(x=float(cursor), line_color="#D62728", line_width=2, name="cursor")
    fig.update_layout(template=TEMPLATE, title=title or "Reply audio")
    return fig
