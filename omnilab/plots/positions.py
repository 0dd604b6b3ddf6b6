"""TM-RoPE figures. Input: `analysis.position_layout(trace)` (and `av_alignment` for the flags)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_color

__all__ = ["positions_3d", "seconds_timeline"]


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
        title=title or "TM-RoPE positions (t, h, w)",
        scene={"xaxis_title": "t", "yaxis_title": "h", "zaxis_title": "w"},
        legend_title_text="modality",
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
        title=title or "Tokens in TM-RoPE time",
        xaxis_title="seconds (t / position_id_per_seconds)",
        yaxis={"title": "modality", "categoryorder": "array", "categoryarray": list(MODALITIES)[::-1]},
    )
    return fig
