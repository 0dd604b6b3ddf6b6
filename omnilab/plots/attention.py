"""Attention and attribution figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_color, pick

__all__ = ["attention_heatmap", "attention_mass_heatmap", "attention_time_lines", "tower_attention_heatmap"]


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of equal values (end exclusive)."""
    if not len(values):
        return []
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    return list(zip(np.r_[0, change].tolist(), np.r_[change, len(values)].tolist(), strict=True))


def attention_heatmap(attention: pd.DataFrame, *, layer=None, head=None, title=None) -> go.Figure:
    """Query × key attention at one (layer, head), with the modality blocks outlined.

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
        ],
        axis=-1,
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=keys,
            y=queries,
            customdata=custom,
            colorscale="Greys",
            zmin=0,
            colorbar={"title": "weight"},
            hovertemplate="query %{y} (%{customdata[0]}) %{customdata[1]}<br>"
            "key %{x} (%{customdata[2]}) %{customdata[3]}<br>weight %{z:.4f}<extra></extra>",
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
        title=title or f"Attention, {component} layer {layer}, {head_label}",
        xaxis_title="key pos",
        yaxis_title="query pos",
        meta={"layer": int(layer), "head": int(head)},
    )
    fig.update_yaxes(autorange="reversed")
    return fig


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
        title=title or f"Attention mass by modality, layer {layer} head {head}",
        xaxis_title="key modality",
        yaxis_title="query modality",
    )
    return fig


def tower_attention_heatmap(tower_map: pd.DataFrame, *, layer=None, title=None) -> go.Figure:
    """Query × key attention inside the audio or vision tower at one layer (windows show as blocks).

    Input: `analysis.tower_attention_map(trace, tower=..., call=...)` (one head, or the mean of heads).
    Axes are the tower's frames (audio) or patches (vision); for audio the hover adds seconds.
    """
    rows, layer = pick(tower_map, "layer", layer, "tower_attention_map")
    n = int(max(rows["query"].max(), rows["key"].max())) + 1 if len(rows) else 0
    z = np.full((n, n), np.nan)
    z[rows["query"].to_numpy(), rows["key"].to_numpy()] = rows["weight"].to_numpy(dtype=float)
    seconds = np.full(n, np.nan)
    seconds[rows["query"].to_numpy()] = rows["query_seconds"].to_numpy(dtype=float)
    custom = np.stack(np.broadcast_arrays(seconds[:, None], seconds[None, :]), axis=-1)
    tower = str(rows["tower"].iloc[0]) if len(rows) else "tower"
    unit = "frame" if tower == "audio_tower" else "patch"
    head = int(rows["head"].iloc[0]) if len(rows) else -1
    fig = go.Figure(
        go.Heatmap(
            z=z,
            customdata=custom,
            colorscale="Greys",
            zmin=0,
            colorbar={"title": "weight"},
            hovertemplate=f"query {unit} %{{y}} (%{{customdata[0]:.2f}} s)<br>key {unit} %{{x}} "
            "(%{customdata[1]:.2f} s)<br>weight %{z:.4f}<extra></extra>",
            name="attention",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=title
        or f"{tower.replace('_', ' ')} attention, layer {layer}, "
        + ("mean of heads" if head < 0 else f"head {head}"),
        xaxis_title=f"key {unit}",
        yaxis_title=f"query {unit}",
        yaxis_autorange="reversed",
    )
    return fig


def attention_time_lines(over_time: pd.DataFrame, *, layer=None, title=None) -> go.Figure:
    """Where in media time attention goes: mass per frame against seconds, one line per (key modality,
    item, head), coloured by modality.

    Input: `analysis.attention_over_time(trace, ...)`: layer, head, modality, item, seconds, mass.
    """
    rows, layer = pick(over_time, "layer", layer, "attention_over_time")
    fig = go.Figure()
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
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Attention over media time, layer {layer}",
        xaxis_title="seconds",
        yaxis_title="mean attention of a query",
    )
    return fig
