"""Attribution figures. Each takes an output of `omnilab.analysis.attribution` and returns a go.Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_color

__all__ = ["attribution_modality", "attribution_tokens"]


def _frame(data, columns: set[str], what: str, source: str) -> pd.DataFrame:
    frame = getattr(data, "tokens", data) if not isinstance(data, pd.DataFrame) else data
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{what} takes {source} (a DataFrame); got {type(data).__name__}")
    missing = columns - set(frame.columns)
    if missing:
        raise ValueError(f"{what} needs columns {', '.join(sorted(columns))}; missing {sorted(missing)}")
    return frame


def _visible(piece: str) -> str:
    """A token piece as hover text: whitespace shown as escapes, markup characters escaped."""
    piece = piece.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return piece.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _order(names: np.ndarray) -> list[str]:
    present = set(names)
    return [m for m in MODALITIES if m in present] + sorted(present - set(MODALITIES))


def attribution_tokens(tokens, *, title=None) -> go.Figure:
    """Attribution of every input position: bars over pos, one trace per modality (coloured as
    everywhere in omnilab, toggled in the legend); hover shows pos, the token piece, its item and
    media time.

    Input: `analysis.attribute(...).tokens` (or the Attribution itself): pos, modality, piece,
    attribution; item and seconds when present.
    """
    frame = _frame(
        tokens, {"pos", "modality", "piece", "attribution"}, "attribution_tokens", "Attribution.tokens"
    )
    names = as_text(frame["modality"])
    item = frame["item"].to_numpy() if "item" in frame else np.full(len(frame), -1)
    seconds = frame["seconds"].to_numpy(dtype=float) if "seconds" in frame else np.full(len(frame), np.nan)
    where = np.array(
        [
            f"item {i} · {s:.2f} s" if np.isfinite(s) else (f"item {i}" if i >= 0 else "")
            for i, s in zip(item, seconds, strict=True)
        ],
        dtype=object,
    )
    pieces = np.array([_visible(p) for p in as_text(frame["piece"])], dtype=object)
    fig = go.Figure()
    for modality in _order(names):
        rows = names == modality
        fig.add_trace(
            go.Bar(
                x=frame["pos"].to_numpy()[rows],
                y=frame["attribution"].to_numpy(dtype=float)[rows],
                name=modality,
                marker_color=modality_color(modality),
                customdata=np.stack([pieces[rows], where[rows]], axis=-1),
                hovertemplate="pos %{x} · %{customdata[0]}<br>%{customdata[1]}<br>attribution %{y:.4g}"
                f"<extra>{modality}</extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title or "Attribution over input positions",
        xaxis_title="pos",
        yaxis_title="attribution",
        barmode="overlay",
        bargap=0,
        legend_title_text="modality",
    )
    return fig


def attribution_modality(by_modality: pd.DataFrame, *, title=None) -> go.Figure:
    """Attribution per modality: one bar each, coloured by modality, labelled with its share of the
    total (signed: shares of mixed-sign attributions can exceed 100 % or be negative).

    Input: `analysis.attribution_by_modality(attr)`: modality, attribution, share (tokens shown on
    hover when present).
    """
    frame = _frame(
        by_modality, {"modality", "attribution", "share"}, "attribution_modality", "attribution_by_modality"
    )
    names = as_text(frame["modality"])
    share = frame["share"].to_numpy(dtype=float)
    count = frame["tokens"].to_numpy() if "tokens" in frame else np.full(len(frame), -1)
    fig = go.Figure(
        go.Bar(
            x=names,
            y=frame["attribution"].to_numpy(dtype=float),
            marker_color=[modality_color(m) for m in names],
            text=[f"{s:.0%}" if np.isfinite(s) else "" for s in share],
            textposition="outside",
            customdata=np.stack([share, count], axis=-1),
            hovertemplate="%{x}: %{y:.4g}<br>share %{customdata[0]:.1%} of the total<br>"
            "%{customdata[1]} tokens<extra></extra>",
            name="attribution",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title or "Attribution by modality",
        xaxis_title="modality",
        yaxis_title="attribution",
        showlegend=False,
    )
    return fig
