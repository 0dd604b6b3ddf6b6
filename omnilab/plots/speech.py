"""Speech figures: the codebook grid and the spectrogram with its waveform."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._style import (
    CATEGORY_COLORS,
    TEMPLATE,
    as_text,
    centred_colorscale,
    step_colorscale,
    symmetric_bound,
    wrap,
)

__all__ = ["codebook_heatmap", "spectrogram", "spectrogram_compare"]

# The colour range of an absolute spectrogram (dBFS), down to where random-weight talkers speak (~-120).
DBFS_RANGE = (-150.0, 0.0)


def codebook_heatmap(grid: pd.DataFrame, *, cursor: float | None = None, title=None) -> go.Figure:
    """Frames × codebooks: each cell the code (x is the frame's time in seconds); hover shows the frame,
    codebook, code and the text being spoken. Input: `analysis.codebook_grid(trace)`. `cursor` (seconds)
    draws a vertical line (layout shape named "cursor").

    Codes are categories, not amounts: each cell is coloured from a qualitative palette by code id
    (code mod the palette's size), so one code always has one colour, a repeated code shows as a run
    of one colour, and neighbouring ids are unrelated colours. z holds that colour index; the hover
    (customdata[2]) and `meta["codes"]` hold the codes themselves. No colorbar: the hover reads them.
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
        [np.broadcast_to(frames[None, :], z.shape), np.broadcast_to(spoken[None, :], z.shape), z], axis=-1
    )
    palette = len(CATEGORY_COLORS)
    fig = go.Figure(
        go.Heatmap(
            z=np.where(np.isfinite(z), np.mod(z, palette), np.nan),
            x=seconds,
            y=codebooks,
            customdata=custom,
            colorscale=step_colorscale(CATEGORY_COLORS),
            zmin=-0.5,
            zmax=palette - 0.5,
            showscale=False,
            xgap=1,
            ygap=1,
            hovertemplate="frame %{customdata[0]} (%{x:.2f} s)<br>codebook %{y}: code %{customdata[2]}<br>"
            "speaking %{customdata[1]}<extra></extra>",
            name="codes",
        )
    )
    if cursor is not None:
        fig.add_vline(x=float(cursor), line_color="#D62728", line_width=2, name="cursor")
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Codec codes per frame (codebook 0: talker, 1-15: code predictor)",
        xaxis_title="seconds",
        yaxis_title="codebook",
        meta={"codes": "customdata[2]", "palette": palette},
    )
    fig.update_yaxes(tickformat="d", dtick=1 if len(codebooks) <= 16 else None)
    return fig


def _mel_grid(mel: pd.DataFrame, column: str):
    frames = np.unique(mel["frame"].to_numpy()) if len(mel) else np.zeros(0, dtype=np.int64)
    bands = np.unique(mel["mel"].to_numpy()) if len(mel) else np.zeros(0, dtype=np.int64)
    z = np.full((len(bands), len(frames)), np.nan)
    fi = np.searchsorted(frames, mel["frame"].to_numpy())
    bi = np.searchsorted(bands, mel["mel"].to_numpy())
    z[bi, fi] = mel[column].to_numpy(dtype=float)
    seconds = np.zeros(len(frames))
    seconds[fi] = mel["seconds"].to_numpy(dtype=float)
    hz = np.zeros(len(bands))
    hz[bi] = mel["hz"].to_numpy(dtype=float)
    return z, seconds, hz


def _peak_dbfs(wave: pd.DataFrame) -> float:
    peak = float(np.nanmax(np.abs(wave[["low", "high"]].to_numpy(dtype=float)))) if len(wave) else 0.0
    return 20 * np.log10(peak) if peak > 0 else -np.inf


def spectrogram(
    mel: pd.DataFrame, wave: pd.DataFrame | None = None, *, cursor: float | None = None, title=None
) -> go.Figure:
    """The reply's waveform (top, min/max envelope) over its log-mel spectrogram (bottom), sharing the
    time axis. Inputs: `analysis.mel_spectrogram(trace)` and `analysis.waveform_envelope(trace)`.
    Traces: "low" and "high" (the envelope, when `wave` is given), then "mel". `cursor` (seconds) draws
    a vertical line across both (layout shapes named "cursor").

    Both are absolute: the waveform's axis is full scale (-1..1) and the spectrogram is in dBFS on a
    fixed DBFS_RANGE (when the mel table has `dbfs`; else the relative `db`), so near-silence looks
    silent instead of being stretched to fill the picture. The envelope's peak in dBFS is in
    `meta["peak_dbfs"]` and in an annotation.
    """
    rows = 2 if wave is not None else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.3, 0.7] if rows == 2 else None,
        vertical_spacing=0.04,
    )
    meta = {}
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
                hovertemplate="%{x:.3f} s · %{y:.3g}<extra></extra>",
            ),
            row=1,
            col=1,
        )
        peak = _peak_dbfs(wave)
        meta["peak_dbfs"] = float(peak) if np.isfinite(peak) else None
        fig.update_yaxes(title_text="amplitude<br>(full scale)", range=[-1, 1], row=1, col=1)
        fig.add_annotation(
            text=f"peak {peak:.0f} dBFS" if np.isfinite(peak) else "silent",
            xref="x domain", yref="y domain", x=0.99, y=0.95, showarrow=False, font={"size": 11},
        )  # fmt: skip
    absolute = "dbfs" in mel.columns
    z, seconds, hz = _mel_grid(mel, "dbfs" if absolute else "db")
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=seconds,
            y=hz,
            colorscale="Magma",
            zmin=DBFS_RANGE[0] if absolute else None,
            zmax=DBFS_RANGE[1] if absolute else None,
            colorbar={"title": "dBFS" if absolute else "dB (rel. max)"},
            name="mel",
            hovertemplate="%{x:.2f} s<br>%{y:.0f} Hz<br>%{z:.1f} "
            + ("dBFS" if absolute else "dB")
            + "<extra></extra>",
        ),
        row=rows,
        col=1,
    )
    fig.update_yaxes(title_text="Hz (mel bands)", row=rows, col=1)
    fig.update_xaxes(title_text="seconds", row=rows, col=1)
    if cursor is not None:
        fig.add_vline(x=float(cursor), line_color="#D62728", line_width=2, name="cursor")
    fig.update_layout(template=TEMPLATE, title=wrap(title) or "Reply audio", meta=meta)
    return fig


def spectrogram_compare(
    a: pd.DataFrame, b: pd.DataFrame, *, names: tuple[str, str] = ("a", "b"), title=None
) -> go.Figure:
    """Two log-mel spectrograms on one absolute scale, and their difference: three panels (a, b, b − a).

    Inputs: two `analysis.mel_spectrogram(...)` tables (e.g. of `residual_audio(keep=1)` and keep=16: what
    codebooks 1-15 add to codebook 0). a and b share one colour axis in dBFS (`coloraxis`, DBFS_RANGE);
    the difference is on a diverging scale whose white is 0 dB (`coloraxis2`, symmetric). Frames are
    matched by index (the shorter clip sets the length). Traces are named after `names` and "difference".
    """
    column = "dbfs" if "dbfs" in a.columns and "dbfs" in b.columns else "db"
    za, sa, hz = _mel_grid(a, column)
    zb, sb, _ = _mel_grid(b, column)
    frames = min(za.shape[1], zb.shape[1])
    za, zb, seconds = za[:, :frames], zb[:, :frames], (sa if len(sa) <= len(sb) else sb)[:frames]
    diff = zb - za
    bound = symmetric_bound(diff, floor=1.0)
    unit = "dBFS" if column == "dbfs" else "dB"
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.05,
        subplot_titles=[names[0], names[1], f"{names[1]} − {names[0]} (dB)"],
    )  # fmt: skip
    for row, (z, name, axis) in enumerate(((za, names[0], "coloraxis"), (zb, names[1], "coloraxis"),
                                           (diff, "difference", "coloraxis2")), start=1):  # fmt: skip
        fig.add_trace(
            go.Heatmap(
                z=z, x=seconds, y=hz, coloraxis=axis, name=name,
                hovertemplate="%{x:.2f} s · %{y:.0f} Hz<br>%{z:.1f} " + ("dB" if row == 3 else unit)
                + f"<extra>{name}</extra>",
            ),
            row=row, col=1,
        )  # fmt: skip
        fig.update_yaxes(title_text="Hz", row=row, col=1)
    fig.update_xaxes(title_text="seconds", row=3, col=1)
    low, high = DBFS_RANGE if column == "dbfs" else (float(np.nanmin([za.min(), zb.min()])), 0.0)
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"{names[1]} against {names[0]}: mean difference {np.nanmean(diff):+.1f} dB",
        coloraxis={"colorscale": "Magma", "cmin": low, "cmax": high,
                   "colorbar": {"title": unit, "y": 0.68, "len": 0.62}},
        coloraxis2={"colorscale": centred_colorscale(-bound, 0, bound), "cmin": -bound, "cmax": bound,
                    "colorbar": {"title": "dB", "y": 0.15, "len": 0.3}},
        height=720,
        meta={"mean_difference_db": float(np.nanmean(diff)) if diff.size else None},
    )  # fmt: skip
    return fig
