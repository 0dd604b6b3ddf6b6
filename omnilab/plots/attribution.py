"""Attribution figures. Each takes an output of `omnilab.analysis.attribution` and returns a go.Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_color, symmetric_bound, wrap

__all__ = [
    "attribution_compare",
    "attribution_modality",
    "attribution_overlay",
    "attribution_patches",
    "attribution_tokens",
    "attribution_windows",
]


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
        title=wrap(title) or "Attribution over input positions",
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
        title=wrap(title) or "Attribution by modality",
        xaxis_title="modality",
        yaxis_title="attribution",
        showlegend=False,
    )
    return fig


def attribution_windows(by_window: pd.DataFrame, *, modality: str | None = None, title=None) -> go.Figure:
    """Attribution over media time: one bar per window (audio) or frame (video), spanning its time,
    one trace per media item.

    Input: `analysis.attribution_by_window(attr, modality=...)`: item, window_start, window_end,
    tokens, attribution.
    """
    frame = _frame(
        by_window,
        {"item", "window_start", "window_end", "attribution"},
        "attribution_windows",
        "attribution_by_window",
    )
    fig = go.Figure()
    for item in sorted(pd.unique(frame["item"])):
        rows = frame[frame["item"] == item]
        start = rows["window_start"].to_numpy(dtype=float)
        width = rows["window_end"].to_numpy(dtype=float) - start
        tokens = rows["tokens"].to_numpy() if "tokens" in rows else np.full(len(rows), -1)
        fig.add_trace(
            go.Bar(
                x=start + width / 2,
                width=width,
                y=rows["attribution"].to_numpy(dtype=float),
                name=f"item {item}",
                marker_color=modality_color(modality) if modality else None,
                customdata=np.stack([start, start + width, tokens], axis=-1),
                hovertemplate="%{customdata[0]:.2f}-%{customdata[1]:.2f} s · %{customdata[2]} tokens"
                "<br>attribution %{y:.4g}<extra>item " + str(item) + "</extra>",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Attribution over {modality or 'media'} time",
        xaxis_title="seconds from the item's start",
        yaxis_title="attribution",
        barmode="group",
        legend_title_text="item",
    )
    return fig


def attribution_patches(by_patch: pd.DataFrame, *, title=None) -> go.Figure:
    """Attribution of an image's patches as a grid (rows h, columns w), diverging around zero.

    Input: `analysis.attribution_by_patch(attr, item=...)`: h, w, pos, attribution.
    """
    frame = _frame(by_patch, {"h", "w", "attribution"}, "attribution_patches", "attribution_by_patch")
    h = frame["h"].to_numpy(dtype=int)
    w = frame["w"].to_numpy(dtype=int)
    z = np.full((h.max() + 1 if len(h) else 0, w.max() + 1 if len(w) else 0), np.nan)
    z[h, w] = frame["attribution"].to_numpy(dtype=float)
    pos = np.full(z.shape, -1)
    if "pos" in frame:
        pos[h, w] = frame["pos"].to_numpy()
    bound = float(np.nanmax(np.abs(z))) if z.size and np.isfinite(z).any() else 1.0
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=pos,
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            colorbar={"title": "attribution"},
            hovertemplate="patch row %{y}, column %{x} · pos %{customdata}<br>attribution %{z:.4g}<extra></extra>",
            name="attribution",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Attribution of the image's patches",
        xaxis_title="w (patch column)",
        yaxis_title="h (patch row)",
        yaxis_autorange="reversed",
    )
    return fig


def attribution_overlay(by_patch: pd.DataFrame, image, *, opacity: float = 0.55, title=None) -> go.Figure:
    """The image with its patches' attribution laid over it: the picture underneath (a layout image),
    one cell per patch on a diverging scale that is clear at 0 (no effect) and reaches `opacity` at
    ±max|attribution| (red: raises the answer, blue: lowers it).

    Inputs: `analysis.attribution_by_patch(attr, item=...)` (h, w, attribution) and the image the
    model saw (a PIL image, an array [H, W, 3] or a path). The patch grid is stretched over the whole
    image. Trace 0 is the "attribution" heatmap; `layout.images[0]` is the picture.
    """
    from PIL import Image

    frame = _frame(by_patch, {"h", "w", "attribution"}, "attribution_overlay", "attribution_by_patch")
    if not isinstance(image, Image.Image):
        image = Image.open(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else (
            Image.fromarray(np.asarray(image, dtype=np.uint8))
        )  # fmt: skip
    image = image.convert("RGB")
    width, height = image.size
    h = frame["h"].to_numpy(dtype=int)
    w = frame["w"].to_numpy(dtype=int)
    z = np.full((h.max() + 1 if len(h) else 0, w.max() + 1 if len(w) else 0), np.nan)
    z[h, w] = frame["attribution"].to_numpy(dtype=float)
    bound = symmetric_bound(z)
    dy, dx = height / max(z.shape[0], 1), width / max(z.shape[1], 1)
    fig = go.Figure(
        go.Heatmap(
            z=z, x0=dx / 2, dx=dx, y0=dy / 2, dy=dy, zmin=-bound, zmax=bound,
            colorscale=[[0.0, f"rgba(33,102,172,{opacity})"], [0.5, "rgba(247,247,247,0)"],
                        [1.0, f"rgba(178,24,43,{opacity})"]],
            colorbar={"title": "attribution"},
            hovertemplate="patch at x %{x:.0f}, y %{y:.0f} px<br>attribution %{z:.4g}<extra></extra>",
            name="attribution",
        )
    )  # fmt: skip
    fig.add_layout_image(
        source=image, xref="x", yref="y", x=0, y=0, sizex=width, sizey=height, sizing="stretch", layer="below"
    )
    fig.update_xaxes(range=[0, width], showgrid=False, title_text="x (pixels)", constrain="domain")
    fig.update_yaxes(range=[height, 0], showgrid=False, title_text="y (pixels)", scaleanchor="x")
    fig.update_layout(
        template=TEMPLATE, title=wrap(title) or "Attribution of the image's patches, on the image"
    )
    return fig


def attribution_compare(by_method: dict, *, value: str = "share", title=None) -> go.Figure:
    """Two or more attribution methods side by side per modality (grouped bars of each modality's signed
    `value`, "share" of the method's total or "attribution"), with every modality where the methods
    disagree in sign marked "signs disagree" (annotations) and listed in `meta["disagree"]`.

    Input: {method name: `analysis.attribution_by_modality(attr)`}, e.g. Integrated Gradients and
    feature ablation. One bar trace per method, named after it; a name containing "null" (a baseline
    such as each modality's share of the tokens) is drawn grey.
    """
    if value not in ("share", "attribution"):
        raise ValueError(f"value={value!r}; use 'share' or 'attribution'")
    frames = {
        name: _frame(f, {"modality", value}, "attribution_compare", "attribution_by_modality")
        for name, f in by_method.items()
    }
    order = _order(np.concatenate([as_text(f["modality"]) for f in frames.values()]))
    table = {
        name: dict(zip(as_text(f["modality"]), f[value].to_numpy(dtype=float), strict=True))
        for name, f in frames.items()
    }
    palette = ["#4C78A8", "#F58518", "#54A24B", "#B279A2"]
    fig = go.Figure()
    for i, (name, values) in enumerate(table.items()):
        y = [values.get(m, np.nan) for m in order]
        fig.add_trace(
            go.Bar(
                x=order, y=y, name=name,
                marker_color="#9D9D9D" if "null" in name else palette[i % len(palette)],
                text=[f"{v:+.0%}" if value == "share" and np.isfinite(v) else "" for v in y],
                textposition="outside",
                hovertemplate="%{x}: %{y:.4g}<extra>" + name + "</extra>",
            )
        )  # fmt: skip
    disagree = []
    for modality in order:
        signs = {np.sign(v[modality]) for v in table.values() if modality in v and np.isfinite(v[modality])}
        if len(signs - {0.0}) > 1:
            disagree.append(modality)
            fig.add_annotation(x=modality, y=1.0, yref="paper", text="signs disagree", showarrow=False,
                               font={"color": "#D62728"})  # fmt: skip
    fig.add_hline(y=0, line_color="#333", line_width=1)
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or ("Methods disagree in sign on " + ", ".join(disagree) if disagree else "Methods agree in sign"),
        barmode="group",
        xaxis_title="modality",
        yaxis={"title": "share of the method's total" if value == "share" else "attribution",
               "tickformat": "+.0%" if value == "share" else None},
        legend_title_text="method",
        meta={"disagree": disagree},
    )  # fmt: skip
    return fig
