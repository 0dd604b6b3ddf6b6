"""Attention and attribution figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, centred_colorscale, log_ticks, modality_color, pick, wrap

__all__ = [
    "attention_heads",
    "attention_heatmap",
    "attention_mass_heatmap",
    "attention_time_lines",
    "tower_attention_heatmap",
]

SCALES = ("log", "uniform", "rank", "linear")
LOG_FLOOR = -4  # log10 of the smallest weight a log scale tells apart (1e-4)
UNIFORM_LIMIT = 5  # "uniform" scale: log2(weight × visible keys) drawn within ±5 (1/32x .. 32x)


def scaled_weights(z: np.ndarray, visible: np.ndarray, scale: str) -> tuple[np.ndarray, dict]:
    """Attention weights [queries, keys] on a colour scale, and the heatmap settings that go with it.

    log: log10(weight), from 1e-4 to 1 (a median weight of 0.01 is mid-scale, not white);
    uniform: log2(weight × visible keys), the weight against causal-uniform attention (1 / the keys a
    query can see), diverging with white at 1x, the null of a head that attends evenly;
    rank: each key's rank in its query's row (0 = the strongest), on a log scale;
    linear: the weight itself, 0..1. `visible`: keys each query row can see.
    """
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}; use one of {', '.join(SCALES)}")
    with np.errstate(divide="ignore", invalid="ignore"):
        if scale == "linear":
            return z, {"colorscale": "Greys", "zmin": 0, "zmax": 1, "colorbar": {"title": "weight"}}
        if scale == "log":
            shown = np.clip(np.log10(z), LOG_FLOOR, 0)
            return shown, {
                "colorscale": "Viridis",
                "zmin": LOG_FLOOR,
                "zmax": 0,
                "colorbar": {"title": "weight", **log_ticks(LOG_FLOOR, 0)},
            }
        if scale == "uniform":
            shown = np.clip(
                np.log2(z * np.asarray(visible, dtype=float)[:, None]), -UNIFORM_LIMIT, UNIFORM_LIMIT
            )
            ticks = list(range(-UNIFORM_LIMIT + UNIFORM_LIMIT % 2, UNIFORM_LIMIT + 1, 2))  # 1/16 .. 16
            return shown, {
                "colorscale": centred_colorscale(-UNIFORM_LIMIT, 0, UNIFORM_LIMIT),
                "zmin": -UNIFORM_LIMIT,
                "zmax": UNIFORM_LIMIT,
                "colorbar": {
                    "title": "× causal-<br>uniform",
                    "tickvals": ticks,
                    "ticktext": [f"{2.0**t:g}" for t in ticks],
                },
            }
        # rank: 0 = the query's strongest key; NaN (unseen keys) sort last and stay NaN
        order = np.argsort(np.argsort(-np.nan_to_num(z, nan=-np.inf), axis=1), axis=1).astype(float)
        order[~np.isfinite(z)] = np.nan
        top = max(int(np.nanmax(order)) if np.isfinite(order).any() else 1, 1)
        high = int(np.ceil(np.log10(top + 1)))
        return np.log10(order + 1), {
            "colorscale": "Viridis_r",
            "zmin": 0,
            "zmax": high,
            "colorbar": {"title": "rank in<br>its row", "tickvals": list(range(high + 1)),
                         "ticktext": [f"{10**v - 1:g}" for v in range(high + 1)]},
        }  # fmt: skip


def _visible(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """How many of `keys` each causal query can see (keys at or before it)."""
    return np.maximum(np.searchsorted(keys, queries, side="right"), 1)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values (end exclusive)."""
    if not len(values):
        return []
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    return list(zip(np.r_[0, change].tolist(), np.r_[change, len(values)].tolist(), strict=True))


def attention_heatmap(
    attention: pd.DataFrame, *, layer=None, head=None, scale: str = "log", title=None
) -> go.Figure:
    """Query × key attention at one (layer, head), with the modality blocks outlined.

    `scale` (see `scaled_weights`): "log" (default; attention weights are mostly near 0, so a linear
    scale is white), "uniform" (against causal-uniform attention, diverging at 1x), "rank" or
    "linear". Hover always shows the weight itself (customdata[4]).

    Input: `analysis.attention_map(trace, layer=..., head=... or average_heads=True)`. Each run of one
    modality along the sequence is a block; the figure draws one rectangle per pair of query block and
    key block (layout shapes named "query-block/key-block"), coloured by the key's modality. Hover shows
    both tokens' pos, modality and text.
    """
    rows, layer = pick(attention, "layer", layer, "attention_map")
    rows, head = pick(rows, "head", head, "attention_map")
    # Queries and keys on their own axes: a few recorded query rows over every key stay a few rows.
    queries, qi = np.unique(rows["query_pos"].to_numpy(), return_inverse=True)
    keys, ki = np.unique(rows["key_pos"].to_numpy(), return_inverse=True)
    z = np.full((len(queries), len(keys)), np.nan)
    z[qi, ki] = rows["weight"].to_numpy(dtype=float)
    q_text, q_mod = np.full(len(queries), "", dtype=object), np.full(len(queries), "", dtype=object)
    k_text, k_mod = np.full(len(keys), "", dtype=object), np.full(len(keys), "", dtype=object)
    q_text[qi], q_mod[qi] = as_text(rows["query_text"]), as_text(rows["query_modality"])
    k_text[ki], k_mod[ki] = as_text(rows["key_text"]), as_text(rows["key_modality"])
    shape = (len(queries), len(keys))
    custom = np.stack(
        [
            np.broadcast_to(q_mod[:, None], shape),
            np.broadcast_to(q_text[:, None], shape),
            np.broadcast_to(k_mod[None, :], shape),
            np.broadcast_to(k_text[None, :], shape),
            z,
        ],
        axis=-1,
    )
    shown, colors = scaled_weights(z, _visible(queries, keys), scale)
    fig = go.Figure(
        go.Heatmap(
            z=shown,
            x=keys,
            y=queries,
            customdata=custom,
            **colors,
            hovertemplate="query %{y} (%{customdata[0]}) %{customdata[1]}<br>"
            "key %{x} (%{customdata[2]}) %{customdata[3]}<br>weight %{customdata[4]:.4g}<extra></extra>",
            name="attention",
        )
    )
    # modality blocks: runs of one modality along each axis
    shapes = []
    for qs, qe in _runs(q_mod):
        for ks, ke in _runs(k_mod):
            if keys[ks] > queries[qe - 1]:  # causal: no key block after the query block
                continue
            shapes.append(
                {
                    "type": "rect",
                    "x0": keys[ks] - 0.5,
                    "x1": keys[ke - 1] + 0.5,
                    "y0": queries[qs] - 0.5,
                    "y1": queries[qe - 1] + 0.5,
                    "line": {"color": modality_color(k_mod[ks]), "width": 1.5},
                    "name": f"{q_mod[qs]}/{k_mod[ks]}",
                }
            )
    fig.update_layout(shapes=shapes)
    component = rows["component"].iloc[0] if len(rows) else ""
    head_label = "mean of heads" if head == -1 else f"head {head}"
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Attention, {component} layer {layer}, {head_label}",
        xaxis_title="key pos",
        yaxis_title="query pos",
        meta={"layer": int(layer), "head": int(head), "scale": scale},
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def attention_heads(
    attention: pd.DataFrame,
    *,
    layer=None,
    heads=None,
    scale: str = "uniform",
    columns: int = 4,
    labels: bool = True,
    title=None,
) -> go.Figure:
    """Every head's query × key pattern at one layer as small multiples on one colour scale (circuitsvis'
    attention_patterns, static), tokens written on the axes.

    Input: `analysis.attention_map(trace, layer=...)` (all heads; `heads` picks some). `scale` as in
    `attention_heatmap`; the default "uniform" colours each weight against causal-uniform attention
    (1 / keys visible), so white is the null of a head that spreads evenly and a head's stripes show
    in red. `labels`: token pieces as tick labels (pos when False or when there are over 40 tokens).
    One heatmap trace per head (named "head h"), all on `coloraxis`.
    """
    rows, layer = pick(attention, "layer", layer, "attention_map")
    present = sorted(int(h) for h in pd.unique(rows["head"]))
    chosen = present if heads is None else [int(h) for h in np.atleast_1d(heads)]
    missing = sorted(set(chosen) - set(present))
    if missing:
        raise ValueError(f"attention_map has no head {missing} at layer {layer}; present: {present}")
    queries = np.unique(rows["query_pos"].to_numpy())
    keys = np.unique(rows["key_pos"].to_numpy())
    text = {}
    for pos_column, text_column in (("query_pos", "query_text"), ("key_pos", "key_text")):
        for pos, piece in zip(rows[pos_column].to_numpy(), as_text(rows[text_column]), strict=True):
            text.setdefault(int(pos), piece)
    named = labels and len(keys) <= 40
    tick = {int(p): f"{_short(text.get(int(p), ''))}·{int(p)}" for p in np.union1d(queries, keys)}
    columns = max(1, min(columns, len(chosen)))
    grid_rows = int(np.ceil(len(chosen) / columns))
    fig = make_subplots(
        rows=grid_rows, cols=columns, subplot_titles=[f"head {h}" for h in chosen],
        horizontal_spacing=0.1 / columns if not named else 0.25 / columns, vertical_spacing=0.3 / grid_rows,
    )  # fmt: skip
    visible = _visible(queries, keys)
    settings = None
    for i, head in enumerate(chosen):
        part = rows[rows["head"] == head]
        z = np.full((len(queries), len(keys)), np.nan)
        z[np.searchsorted(queries, part["query_pos"].to_numpy()), np.searchsorted(keys, part["key_pos"].to_numpy())] = (
            part["weight"].to_numpy(dtype=float)
        )  # fmt: skip
        shown, settings = scaled_weights(z, visible, scale)
        fig.add_trace(
            go.Heatmap(
                z=shown, x=keys, y=queries, customdata=z, coloraxis="coloraxis", name=f"head {head}",
                hovertemplate=f"head {head}<br>" + "query %{y} → key %{x}<br>weight %{customdata:.4g}<extra></extra>",
            ),
            row=i // columns + 1, col=i % columns + 1,
        )  # fmt: skip
    colorbar = settings.pop("colorbar")
    fig.update_layout(
        coloraxis={"colorscale": settings["colorscale"], "cmin": settings["zmin"], "cmax": settings["zmax"],
                   "colorbar": colorbar},
    )  # fmt: skip
    axis_ticks = {"tickmode": "array", "tickfont": {"size": 8}}
    if named:
        fig.update_xaxes(
            tickvals=list(keys), ticktext=[tick[int(k)] for k in keys], tickangle=-90, **axis_ticks
        )
        fig.update_yaxes(tickvals=list(queries), ticktext=[tick[int(q)] for q in queries], **axis_ticks)
    fig.update_yaxes(autorange="reversed")
    component = rows["component"].iloc[0] if len(rows) else ""
    null = {"uniform": "white = causal-uniform", "log": "log scale", "rank": "rank scale", "linear": ""}[
        scale
    ]
    side = 260 if not named else 320
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Attention heads, {component} layer {layer} ({null})",
        height=140 + side * grid_rows,
        width=max(700, 60 + side * columns),
        meta={"layer": int(layer), "heads": chosen, "scale": scale},
    )
    return fig


def _short(piece: str, size: int = 8) -> str:
    """A token piece fit for a tick label: whitespace made visible, long pieces cut."""
    piece = piece.replace("\n", "\\n").replace(" ", "·").replace("<|", "").replace("|>", "")
    return piece if len(piece) <= size else piece[: size - 1] + "…"


def attention_mass_heatmap(mass: pd.DataFrame, *, layer=None, head=None, title=None) -> go.Figure:
    """Query modality × key modality: the mean attention mass, at one (layer, head).

    Input: `analysis.attention_modality_mass(trace)`.
    """
    rows, layer = pick(mass, "layer", layer, "attention_modality_mass")
    rows, head = pick(rows, "head", head, "attention_modality_mass")
    queries = [m for m in MODALITIES if m in set(as_text(rows["query_modality"]))]
    keys = [m for m in MODALITIES if m in set(as_text(rows["key_modality"]))]
    z = np.full((len(queries), len(keys)), np.nan)
    count = np.zeros_like(z)
    qi = [queries.index(m) for m in as_text(rows["query_modality"])]
    ki = [keys.index(m) for m in as_text(rows["key_modality"])]
    z[qi, ki] = rows["mass"].to_numpy(dtype=float)
    count[qi, ki] = rows["queries"].to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=keys,
            y=queries,
            customdata=count,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            text=np.round(z, 2),
            texttemplate="%{text}",
            hovertemplate="%{y} → %{x}: %{z:.3f}<br>over %{customdata} queries<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Attention mass by modality, layer {layer} head {head}",
        xaxis_title="key modality",
        yaxis_title="query modality",
    )
    return fig


def tower_attention_heatmap(
    tower_map: pd.DataFrame, *, layer=None, scale: str = "log", title=None
) -> go.Figure:
    """Query × key attention inside the audio or vision tower at one layer (windows show as blocks).

    `scale` as in `attention_heatmap` ("uniform" counts a query's window as the keys it can see).

    Input: `analysis.tower_attention_map(trace, tower=..., call=...)` (one head, or the mean of heads).
    Axes are the tower's frames (audio) or patches (vision); for audio the hover adds seconds.
    """
    rows, layer = pick(tower_map, "layer", layer, "tower_attention_map")
    n = int(max(rows["query"].max(), rows["key"].max())) + 1 if len(rows) else 0
    z = np.full((n, n), np.nan)
    z[rows["query"].to_numpy(), rows["key"].to_numpy()] = rows["weight"].to_numpy(dtype=float)
    seconds = np.full(n, np.nan)
    seconds[rows["query"].to_numpy()] = rows["query_seconds"].to_numpy(dtype=float)
    custom = np.stack([*np.broadcast_arrays(seconds[:, None], seconds[None, :]), z], axis=-1)
    tower = str(rows["tower"].iloc[0]) if len(rows) else "tower"
    unit = "frame" if tower == "audio_tower" else "patch"
    head = int(rows["head"].iloc[0]) if len(rows) else -1
    shown, colors = scaled_weights(z, np.maximum(np.isfinite(z).sum(axis=1), 1), scale)
    fig = go.Figure(
        go.Heatmap(
            z=shown,
            customdata=custom,
            **colors,
            hovertemplate=f"query {unit} %{{y}} (%{{customdata[0]:.2f}} s)<br>key {unit} %{{x}} "
            "(%{customdata[1]:.2f} s)<br>weight %{customdata[2]:.4g}<extra></extra>",
            name="attention",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title)
        or f"{tower.replace('_', ' ')} attention, layer {layer}, "
        + ("mean of heads" if head < 0 else f"head {head}"),
        xaxis_title=f"key {unit}",
        yaxis_title=f"query {unit}",
        yaxis_autorange="reversed",
    )
    return fig


def attention_time_lines(over_time: pd.DataFrame, *, layer=None, title=None) -> go.Figure:
    """Where in media time attention goes: mass per frame against seconds, one line per (key modality,
    item, head), coloured by modality, one panel per key modality with its own y axis.

    An audio frame is one token (1/13 s) and a video frame a grid of patches, so their masses are not
    on one scale: each modality gets its panel (shared seconds axis), its y axis named by its unit.
    Input: `analysis.attention_over_time(trace, ...)`: layer, head, modality, item, seconds, mass.
    """
    rows, layer = pick(over_time, "layer", layer, "attention_over_time")
    present = [m for m in MODALITIES if m in set(as_text(rows["modality"]))] or [""]
    fig = make_subplots(rows=len(present), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    for (modality, item, head), part in rows.groupby(["modality", "item", "head"], observed=True, sort=True):
        part = part.sort_values("seconds")
        who = "mean of heads" if int(head) < 0 else f"head {int(head)}"
        fig.add_trace(
            go.Scatter(
                x=part["seconds"].to_numpy(dtype=float),
                y=part["mass"].to_numpy(dtype=float),
                mode="lines+markers",
                name=f"{modality} {int(item)} · {who}",
                line={"color": modality_color(str(modality))},
                hovertemplate="%{x:.2f} s · mean attention %{y:.4f}<extra>"
                + f"{modality} {int(item)} · {who}</extra>",
            ),
            row=present.index(str(modality)) + 1 if str(modality) in present else 1,
            col=1,
        )
    unit = {"audio": "audio:<br>per token", "video": "video: per frame<br>(all patches)"}
    for row, modality in enumerate(present, start=1):
        fig.update_yaxes(title_text=unit.get(modality, modality), rangemode="tozero", row=row, col=1)
    fig.update_xaxes(title_text="seconds", row=len(present), col=1)
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Attention over media time, layer {layer}",
        height=max(320, 220 * len(present)),
    )
    return fig
