"""TM-RoPE figures. Input: `analysis.position_layout(trace)` (and `av_alignment` for the flags)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_color, wrap

__all__ = ["positions_3d", "positions_by_index", "seconds_timeline"]

# Text tokens sit on the line t = h = w; plotly's default camera looks down that diagonal and draws
# them as one dot. This eye is nearly perpendicular to it.
CAMERA_EYE = {"x": 1.7, "y": -1.5, "z": 0.35}


def _by_modality(layout: pd.DataFrame):
    names = as_text(layout["modality"])
    for modality in [*MODALITIES, ""]:
        rows = layout[names == modality]
        if len(rows):
            yield modality or "unknown", rows


def _hover(rows: pd.DataFrame) -> np.ndarray:
    return np.stack(
        [as_text(rows["text"]), rows["pos"].to_numpy(), as_text(rows["item"]), as_text(rows["frame"])],
        axis=-1,
    )


def positions_3d(layout: pd.DataFrame, *, highlight=None, title=None) -> go.Figure:
    """Every token at its TM-RoPE position (t, h, w), one trace per modality; hover shows pos and text.

    `highlight` (a pos or list of pos) adds a last trace marking those tokens.
    """
    fig = go.Figure()
    for modality, rows in _by_modality(layout):
        fig.add_trace(
            go.Scatter3d(
                x=rows["t"],
                y=rows["h"],
                z=rows["w"],
                mode="markers",
                marker={"size": 3, "color": modality_color(modality)},
                name=modality,
                customdata=_hover(rows),
                hovertemplate="pos %{customdata[1]} · %{customdata[0]}<br>t %{x} h %{y} w %{z}<br>"
                "item %{customdata[2]} frame %{customdata[3]}<extra>" + modality + "</extra>",
            )
        )
    if highlight is not None:
        chosen = layout[layout["pos"].isin(np.atleast_1d(highlight))]
        fig.add_trace(
            go.Scatter3d(
                x=chosen["t"],
                y=chosen["h"],
                z=chosen["w"],
                mode="markers",
                marker={"size": 8, "color": "rgba(0,0,0,0)", "line": {"width": 3, "color": "#000"}},
                name="selected",
                customdata=_hover(chosen),
                hovertemplate="pos %{customdata[1]} · %{customdata[0]}<extra>selected</extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "TM-RoPE positions (t, h, w)",
        scene={
            "xaxis_title": "t",
            "yaxis_title": "h",
            "zaxis_title": "w",
            "aspectmode": "cube",
            "camera": {"eye": CAMERA_EYE, "up": {"x": 0, "y": 0, "z": 1}},
        },
        legend_title_text="modality",
    )
    return fig


def positions_by_index(layout: pd.DataFrame, *, title=None) -> go.Figure:
    """Qwen's own picture of TM-RoPE: the three position ids (t, h, w) of every token against its
    index in the sequence, one panel each, coloured by modality; the t panel carries a second axis in
    seconds (t / position_id_per_seconds), so interleaved audio and video line up by time. Every image
    patch is its own point (an image's h and w climb within one t).

    Input: `analysis.position_layout(trace)`. Traces: per panel one per modality (named
    "t · audio", ...), then an invisible "seconds" trace that carries the second axis.
    """
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04,
        specs=[[{"secondary_y": True}], [{}], [{}]],
    )  # fmt: skip
    for row, axis in enumerate(("t", "h", "w"), start=1):
        for modality, rows in _by_modality(layout):
            fig.add_trace(
                go.Scatter(
                    x=rows["pos"],
                    y=rows[axis],
                    mode="markers",
                    marker={"size": 4, "color": modality_color(modality)},
                    name=f"{axis} · {modality}",
                    legendgroup=modality,
                    showlegend=row == 1,
                    customdata=np.concatenate([_hover(rows), rows[["position_seconds"]].to_numpy()], axis=1),
                    hovertemplate="pos %{x} · %{customdata[0]}<br>" + axis + " %{y} (%{customdata[4]:.2f} s)"
                    "<br>item %{customdata[2]} frame %{customdata[3]}<extra>" + modality + "</extra>",
                ),
                row=row,
                col=1,
                **({"secondary_y": False} if row == 1 else {}),
            )
        fig.update_yaxes(
            title_text=f"{axis} (position id)", row=row, col=1, **({"secondary_y": False} if row == 1 else {})
        )
    fig.add_trace(
        go.Scatter(
            x=layout["pos"], y=layout["position_seconds"], mode="markers", marker={"opacity": 0},
            name="seconds", showlegend=False, hoverinfo="skip",
        ),
        row=1, col=1, secondary_y=True,
    )  # fmt: skip
    fig.update_yaxes(title_text="seconds", row=1, col=1, secondary_y=True, showgrid=False)
    t = layout["t"].to_numpy(dtype=float)
    seconds = layout["position_seconds"].to_numpy(dtype=float)
    timed = (t > 0) & np.isfinite(seconds) & (seconds > 0)
    if timed.any():  # both axes over one range, so a tick on the right reads the t beside it in seconds
        per_second = float(np.median(t[timed] / seconds[timed]))
        pad = 0.04 * max(t.max() - t.min(), 1.0)
        low, high = float(t.min() - pad), float(t.max() + pad)
        fig.update_yaxes(range=[low, high], row=1, col=1, secondary_y=False)
        fig.update_yaxes(range=[low / per_second, high / per_second], row=1, col=1, secondary_y=True)
    fig.update_xaxes(title_text="token index (pos)", row=3, col=1)
    for name in ("legend",):
        fig.update_layout({name: {"title": {"text": "modality"}}})
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "TM-RoPE position ids by token index (t carries time: seconds on the right)",
        height=620,
    )
    return fig


def seconds_timeline(
    layout: pd.DataFrame, *, alignment: pd.DataFrame | None = None, highlight=None, title=None
) -> go.Figure:
    """Tokens on a time axis, one row per modality: x is position_seconds (t / position_id_per_seconds,
    the time TM-RoPE gives each token, text included). With `alignment` (`analysis.av_alignment`), audio
    tokens flagged as misaligned get a red cross trace named "misaligned". `highlight` marks tokens.
    """
    fig = go.Figure()
    for modality, rows in _by_modality(layout):
        fig.add_trace(
            go.Scatter(
                x=rows["position_seconds"],
                y=[modality] * len(rows),
                mode="markers",
                marker={"size": 7, "color": modality_color(modality), "symbol": "line-ns-open"},
                name=modality,
                customdata=np.concatenate([_hover(rows), rows[["t"]].to_numpy()], axis=1),
                hovertemplate="pos %{customdata[1]} · %{customdata[0]}<br>%{x:.3f} s (t %{customdata[4]})<br>"
                "item %{customdata[2]} frame %{customdata[3]}<extra>" + modality + "</extra>",
            )
        )
    bad = alignment[~alignment["aligned"].astype(bool)] if alignment is not None and len(alignment) else []
    if len(bad):
        rows = layout.set_index("pos").reindex(bad["pos"])
        fig.add_trace(
            go.Scatter(
                x=rows["position_seconds"],
                y=["audio"] * len(bad),
                mode="markers",
                marker={"size": 12, "color": "#D62728", "symbol": "x"},
                name="misaligned",
                customdata=np.stack([bad["pos"].to_numpy(), bad["offset"].to_numpy()], axis=-1),
                hovertemplate="pos %{customdata[0]}: %{customdata[1]:+.3f} s from its audio time<extra></extra>",
            )
        )
    if highlight is not None:
        chosen = layout[layout["pos"].isin(np.atleast_1d(highlight))]
        fig.add_trace(
            go.Scatter(
                x=chosen["position_seconds"],
                y=as_text(chosen["modality"]),
                mode="markers",
                marker={"size": 14, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": "#000"}},
                name="selected",
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Tokens in TM-RoPE time",
        xaxis_title="seconds (t / position_id_per_seconds)",
        yaxis={"title": "modality", "categoryorder": "array", "categoryarray": list(MODALITIES)[::-1]},
    )
    return fig
