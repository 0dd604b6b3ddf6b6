"""Routing figures. Each takes an analysis output (named in its docstring) and returns a go.Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..trace import MODALITIES
from ._style import TEMPLATE, as_text, modality_colorscale, pick

__all__ = [
    "agreement_lines",
    "coactivation_heatmap",
    "expert_load_bars",
    "paths_sankey",
    "routing_heatmap",
    "specialization_heatmap",
    "token_route",
]


def routing_heatmap(
    paths: pd.DataFrame, *, layer=None, num_experts: int | None = None, title=None
) -> go.Figure:
    """Tokens × experts at one layer: each cell the router weight of a chosen expert (0 elsewhere).

    Input: `analysis.token_paths(trace, component=..., ranks=None)` (all k choices). A narrow strip on
    the left colours each token by modality; hovering shows pos, modality, the token's text, the
    expert and its weight. Trace 0 is the modality strip, trace 1 the routing heatmap; y is pos.
    """
    rows, layer = pick(paths, "layer", layer, "token_paths")
    positions = np.unique(rows["pos"].to_numpy()) if len(rows) else np.zeros(0, dtype=np.int64)
    experts = int(num_experts or (int(rows["expert"].max()) + 1 if len(rows) else 0))
    row_of = np.searchsorted(positions, rows["pos"].to_numpy())
    z = np.zeros((len(positions), experts))
    z[row_of, rows["expert"].to_numpy().astype(np.int64)] = rows["weight"].to_numpy(dtype=float)
    first = rows.drop_duplicates("pos").set_index("pos").reindex(positions)
    text = as_text(first["text"]) if len(first) else np.zeros(0, dtype=object)
    modality = as_text(first["modality"]) if len(first) else np.zeros(0, dtype=object)
    codes = np.array([MODALITIES.index(m) if m in MODALITIES else np.nan for m in modality], dtype=float)
    hover_token = np.stack([text, modality], axis=-1) if len(text) else np.zeros((0, 2), dtype=object)

    fig = make_subplots(
        rows=1, cols=2, shared_yaxes=True, column_widths=[0.03, 0.97], horizontal_spacing=0.005
    )
    fig.add_trace(
        go.Heatmap(
            z=codes[:, None],
            x=["modality"],
            y=positions,
            customdata=hover_token[:, None, :],
            colorscale=modality_colorscale(),
            zmin=0,
            zmax=len(MODALITIES),
            showscale=False,
            hovertemplate="pos %{y}<br>%{customdata[1]}<br>%{customdata[0]}<extra></extra>",
            name="modality",
        ),
        row=1,
        col=1,
    )
    cell_text = np.broadcast_to(text[:, None], z.shape) if len(text) else np.zeros(z.shape, dtype=object)
    cell_modality = np.broadcast_to(modality[:, None], z.shape) if len(modality) else cell_text
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=np.arange(experts),
            y=positions,
            customdata=np.stack([cell_text, cell_modality], axis=-1),
            colorscale="Blues",
            zmin=0,
            colorbar={"title": "weight"},
            hovertemplate=(
                "pos %{y} · %{customdata[1]}<br>token %{customdata[0]}<br>expert %{x}<br>"
                "weight %{z:.3f}<extra></extra>"
            ),
            name="routing",
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(autorange="reversed", title_text="pos", row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_xaxes(title_text="expert", row=1, col=2)
    component = rows["component"].iloc[0] if len(rows) else ""
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Routing of {component} layer {layer}",
        meta={"layer": _plain(layer), "component": str(component)},
    )
    return fig


def token_route(paths: pd.DataFrame, *, pos, title=None) -> go.Figure:
    """One token's route through all layers: its k experts at each layer, sized and coloured by weight,
    the first choices joined by a line.

    Input: `analysis.token_paths(trace, component=..., ranks=None)` (any tokens; `pos` selects one).
    Trace 0 is the first-choice line, trace 1 all choices.
    """
    rows, pos = pick(paths, "pos", pos, "token_paths")
    rows = rows.sort_values(["layer", "rank"])
    first = rows[rows["rank"] == 0]
    weight = rows["weight"].to_numpy(dtype=float)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=first["layer"],
            y=first["expert"],
            mode="lines",
            line={"color": "#888", "width": 1},
            name="first choice",
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=rows["layer"],
            y=rows["expert"],
            mode="markers",
            marker={
                "size": 6 + 24 * weight / max(weight.max(), 1e-9) if len(weight) else 6,
                "color": weight,
                "colorscale": "Blues",
                "showscale": True,
                "colorbar": {"title": "weight"},
                "line": {"width": 0.5, "color": "#333"},
            },
            customdata=np.stack([rows["rank"].to_numpy(), weight], axis=-1),
            hovertemplate="layer %{x}<br>expert %{y}<br>rank %{customdata[0]}<br>weight %{customdata[1]:.3f}"
            "<extra></extra>",
            name="experts",
        )
    )
    text = as_text(rows["text"].iloc[:1])[0] if len(rows) else ""
    modality = as_text(rows["modality"].iloc[:1])[0] if len(rows) else ""
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Route of pos {pos} ({modality}) {text!r}",
        showlegend=False,
        xaxis_title="layer",
        yaxis_title="expert",
        meta={"pos": _plain(pos)},
    )
    return fig


def expert_load_bars(load: pd.DataFrame, *, layer=None, component=None, title=None) -> go.Figure:
    """Each expert's share of one layer's assignments, with the uniform share 1/E as a dashed line.

    Input: `analysis.expert_load(trace)`. Hover shows count, share and mean router probability.
    """
    if component is not None:
        load, _ = pick(load, "component", component, "expert_load")
    rows, layer = pick(load, "layer", layer, "expert_load")
    component = rows["component"].iloc[0] if len(rows) else ""
    fig = go.Figure(
        go.Bar(
            x=rows["expert"],
            y=rows["share"],
            customdata=np.stack([rows["count"].to_numpy(), rows["p_mean"].to_numpy()], axis=-1),
            hovertemplate="expert %{x}<br>share %{y:.4f}<br>count %{customdata[0]}<br>"
            "mean probability %{customdata[1]:.4f}<extra></extra>",
            marker_color="#4C78A8",
            name="share",
        )
    )
    if len(rows):
        fig.add_hline(
            y=float(rows["uniform"].iloc[0]),
            line_dash="dash",
            line_color="#E45756",
            annotation_text="uniform 1/E",
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Expert load, {component} layer {layer}",
        xaxis_title="expert",
        yaxis_title="share of assignments",
        meta={"layer": _plain(layer)},
    )
    return fig


def specialization_heatmap(
    specialization: pd.DataFrame, *, layer=None, component=None, value: str = "share", title=None
) -> go.Figure:
    """Modality × expert at one layer: `value` ("share": the expert's modality mix, or "lift": share /
    expected) per cell; hover shows count, share, expected share and lift.

    Input: `analysis.modality_specialization(trace)`.
    """
    if value not in ("share", "lift", "coverage"):
        raise ValueError(f"value={value!r}; use 'share', 'lift' or 'coverage'")
    if component is not None:
        specialization, _ = pick(specialization, "component", component, "modality_specialization")
    rows, layer = pick(specialization, "layer", layer, "modality_specialization")
    modalities = [m for m in MODALITIES if m in set(as_text(rows["modality"]))]
    experts = np.arange(int(rows["expert"].max()) + 1) if len(rows) else np.zeros(0, dtype=int)
    shape = (len(modalities), len(experts))
    grids = {c: np.full(shape, np.nan) for c in (value, "count", "share", "expected", "lift")}
    mi = np.array([modalities.index(m) for m in as_text(rows["modality"])], dtype=np.int64)
    ei = rows["expert"].to_numpy().astype(np.int64)
    for column, grid in grids.items():
        grid[mi, ei] = rows[column].to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=grids[value],
            x=experts,
            y=modalities,
            customdata=np.stack([grids["count"], grids["share"], grids["expected"], grids["lift"]], axis=-1),
            colorscale="Viridis",
            colorbar={"title": value},
            hovertemplate="%{y} · expert %{x}<br>count %{customdata[0]}<br>share %{customdata[1]:.3f}<br>"
            "expected %{customdata[2]:.3f}<br>lift %{customdata[3]:.2f}<extra></extra>",
            name=value,
        )
    )
    component = rows["component"].iloc[0] if len(rows) else ""
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Modality specialization ({value}), {component} layer {layer}",
        xaxis_title="expert",
        yaxis_title="modality",
        meta={"layer": _plain(layer)},
    )
    return fig


def coactivation_heatmap(coactivation: pd.DataFrame, *, layer=None, component=None, title=None) -> go.Figure:
    """Expert × expert at one layer: P(other ∈ S | expert ∈ S); hover shows the count and the lift
    over random routing. Input: `analysis.coactivation(trace)`.
    """
    if component is not None:
        coactivation, _ = pick(coactivation, "component", component, "coactivation")
    rows, layer = pick(coactivation, "layer", layer, "coactivation")
    size = int(max(rows["expert"].max(), rows["other"].max())) + 1 if len(rows) else 0
    p = np.full((size, size), np.nan)
    count = np.zeros((size, size))
    lift = np.full((size, size), np.nan)
    ei, oi = rows["expert"].to_numpy().astype(np.int64), rows["other"].to_numpy().astype(np.int64)
    p[ei, oi] = rows["p"].to_numpy(dtype=float)
    count[ei, oi] = rows["count"].to_numpy(dtype=float)
    lift[ei, oi] = rows["lift"].to_numpy(dtype=float)
    fig = go.Figure(
        go.Heatmap(
            z=p,
            x=np.arange(size),
            y=np.arange(size),
            customdata=np.stack([count, lift], axis=-1),
            colorscale="Magma",
            reversescale=True,
            colorbar={"title": "P(j | i)"},
            hovertemplate="P(expert %{x} | expert %{y}) = %{z:.3f}<br>together %{customdata[0]} times<br>"
            "lift %{customdata[1]:.2f}<extra></extra>",
            name="coactivation",
        )
    )
    component = rows["component"].iloc[0] if len(rows) else ""
    fig.update_layout(
        template=TEMPLATE,
        title=title or f"Co-activation, {component} layer {layer}",
        xaxis_title="expert j (co-activated)",
        yaxis_title="expert i (given)",
        meta={"layer": _plain(layer)},
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def paths_sankey(
    transitions: pd.DataFrame, *, component=None, layers=None, top: int | None = 12, title=None
) -> go.Figure:
    """Cross-layer expert paths as a Sankey: a node per (layer, expert), a link per transition with its
    token count. Input: `analysis.layer_transitions(trace)`; `layers` selects a range of layers and
    `top` keeps the most frequent links out of each layer (None: all).
    """
    rows = transitions
    if component is not None:
        rows, _ = pick(rows, "component", component, "layer_transitions")
    if layers is not None:
        rows = rows[rows["layer"].isin(list(layers)) & rows["next_layer"].isin(list(layers))]
    if top is not None and len(rows):
        rows = rows.sort_values("count", ascending=False).groupby("layer", observed=True).head(top)
    rows = rows.sort_values(["layer", "expert", "next_expert"])
    sources = list(zip(rows["layer"].to_numpy(), rows["expert"].to_numpy(), strict=True))
    targets = list(zip(rows["next_layer"].to_numpy(), rows["next_expert"].to_numpy(), strict=True))
    nodes = sorted(set(sources) | set(targets))
    index = {node: i for i, node in enumerate(nodes)}
    depth = max((n[0] for n in nodes), default=0) - min((n[0] for n in nodes), default=0)
    low = min((n[0] for n in nodes), default=0)
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={
                "label": [f"L{layer} E{expert}" for layer, expert in nodes],
                "x": [0.01 + 0.98 * (layer - low) / max(depth, 1) for layer, _ in nodes],
                "pad": 4,
                "thickness": 10,
                "hovertemplate": "%{label}<br>%{value} tokens<extra></extra>",
            },
            link={
                "source": [index[s] for s in sources],
                "target": [index[t] for t in targets],
                "value": rows["count"].to_numpy(),
                "customdata": rows["share"].to_numpy(),
                "hovertemplate": "%{source.label} → %{target.label}<br>%{value} tokens "
                "(%{customdata:.1%} of the source)<extra></extra>",
            },
        )
    )
    fig.update_layout(template=TEMPLATE, title=title or "Expert paths across layers")
    return fig


def agreement_lines(agreement: pd.DataFrame, *, title=None) -> go.Figure:
    """Routing agreement per layer between two runs (one line per measure, the random baseline dashed).

    Input: `analysis.routing_agreement(a, b)` (by="layer").
    """
    fig = go.Figure()
    for component, rows in agreement.groupby("component", observed=True, sort=True):
        for column, dash in (("agreement", "solid"), ("top1_agreement", "dot"), ("exact", "dashdot")):
            fig.add_trace(
                go.Scatter(
                    x=rows["layer"],
                    y=rows[column],
                    mode="lines+markers",
                    line={"dash": dash},
                    name=f"{component} {column}",
                    customdata=rows["tokens"],
                    hovertemplate="layer %{x}<br>%{y:.3f} over %{customdata} tokens<extra></extra>",
                )
            )
        fig.add_trace(
            go.Scatter(
                x=rows["layer"],
                y=rows["baseline"],
                mode="lines",
                line={"dash": "dash", "color": "#999"},
                name=f"{component} random k/E",
            )
        )
    fig.update_layout(
        template=TEMPLATE,
        title=title or "Routing agreement between two runs",
        xaxis_title="layer",
        yaxis_title="|S_a ∩ S_b| / k",
        yaxis_range=[0, 1.02],
    )
    return fig


def _plain(value):
    """numpy scalars to Python (figure metadata must serialize to JSON)."""
    return value.item() if isinstance(value, np.generic) else value
