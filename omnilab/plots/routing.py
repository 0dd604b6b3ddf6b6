"""Routing figures. Each takes an analysis output (named in its docstring) and returns a go.Figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..trace import MODALITIES
from ._style import (
    TEMPLATE,
    as_text,
    centred_colorscale,
    integer_ticks,
    modality_colorscale,
    pick,
    wrap,
)

__all__ = [
    "coactivation_heatmap",
    "expert_load_bars",
    "expert_load_heatmap",
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
        title=wrap(title) or f"Routing of {component} layer {layer}",
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
        title=wrap(title) or f"Route of pos {pos} ({modality}) {text!r}",
        showlegend=False,
        xaxis_title="layer",
        yaxis_title="expert",
        meta={"pos": _plain(pos)},
    )
    integer_ticks(fig, "xaxis")
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
        title=wrap(title) or f"Expert load, {component} layer {layer}",
        xaxis_title="expert",
        yaxis_title="share of assignments",
        meta={"layer": _plain(layer)},
    )
    return fig


LIFT_LIMIT = 4  # log2 lift is drawn within ±4 (1/16x .. 16x); hover shows the exact value


def specialization_heatmap(
    specialization: pd.DataFrame, *, layer=None, component=None, value: str = "share", title=None
) -> go.Figure:
    """Modality × expert at one layer (or layer="all": one row of panels per layer, one colour scale):
    `value` per cell ("share": the expert's modality mix, "coverage", or "lift": share / expected);
    hover shows count, share, expected share and lift.

    Lift is drawn as log2(lift) on a diverging scale whose white is lift 1 (no preference): red cells
    are experts a modality uses more than its share of the layer, blue ones less (the colorbar reads
    in lift). Input: `analysis.modality_specialization(trace)`.
    """
    if value not in ("share", "lift", "coverage"):
        raise ValueError(f"value={value!r}; use 'share', 'lift' or 'coverage'")
    if component is not None:
        specialization, _ = pick(specialization, "component", component, "modality_specialization")
    if isinstance(layer, str) and layer == "all":
        layers = sorted(pd.unique(specialization["layer"]).tolist())
    else:
        layers = [pick(specialization, "layer", layer, "modality_specialization")[1]]
    every = specialization[specialization["layer"].isin(layers)]
    modalities = [m for m in MODALITIES if m in set(as_text(every["modality"]))]
    experts = np.arange(int(every["expert"].max()) + 1) if len(every) else np.zeros(0, dtype=int)
    fig = make_subplots(
        rows=len(layers), cols=1, shared_xaxes=True, vertical_spacing=0.25 / len(layers) if len(layers) > 1 else 0,
        subplot_titles=[f"layer {int(layer)}" for layer in layers] if len(layers) > 1 else None,
    )  # fmt: skip
    for row, one in enumerate(layers, start=1):
        rows = every[every["layer"] == one]
        shape = (len(modalities), len(experts))
        grids = {c: np.full(shape, np.nan) for c in ("count", "share", "expected", "lift", "coverage")}
        mi = np.array([modalities.index(m) for m in as_text(rows["modality"])], dtype=np.int64)
        ei = rows["expert"].to_numpy().astype(np.int64)
        for column, grid in grids.items():
            if column in rows:
                grid[mi, ei] = rows[column].to_numpy(dtype=float)
        z = grids[value]
        if value == "lift":
            with np.errstate(divide="ignore"):
                z = np.clip(np.log2(z), -LIFT_LIMIT, LIFT_LIMIT)
        fig.add_trace(
            go.Heatmap(
                z=z,
                x=experts,
                y=modalities,
                customdata=np.stack(
                    [grids["count"], grids["share"], grids["expected"], grids["lift"]], axis=-1
                ),
                coloraxis="coloraxis",
                hovertemplate=f"layer {int(one)} · " + "%{y} · expert %{x}<br>count %{customdata[0]}<br>"
                "share %{customdata[1]:.3f}<br>expected %{customdata[2]:.3f}<br>lift %{customdata[3]:.2f}"
                "<extra></extra>",
                name=value,
            ),
            row=row,
            col=1,
        )
    if value == "lift":
        ticks = list(range(-LIFT_LIMIT, LIFT_LIMIT + 1))
        coloraxis = {
            "colorscale": centred_colorscale(-LIFT_LIMIT, 0, LIFT_LIMIT),
            "cmin": -LIFT_LIMIT,
            "cmax": LIFT_LIMIT,
            "colorbar": {
                "title": "lift",
                "tickvals": ticks,
                "ticktext": [f"{2.0**t:g}" for t in ticks],
            },
        }
    else:
        coloraxis = {"colorscale": "Viridis", "cmin": 0, "colorbar": {"title": value}}
    component = every["component"].iloc[0] if len(every) else ""
    where = f"layers {layers[0]}-{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Modality specialization ({value}), {component} {where}",
        coloraxis=coloraxis,
        height=max(300, 120 + 45 * len(modalities) * len(layers) + 40 * len(layers)),
        meta={"layer": _plain(layers[0]) if len(layers) == 1 else [_plain(v) for v in layers]},
    )
    fig.update_xaxes(title_text="expert", row=len(layers), col=1)
    fig.update_yaxes(title_text="modality")
    return fig


def expert_load_heatmap(
    specialization: pd.DataFrame, *, component=None, modalities=None, cmax: float | None = None, title=None
) -> go.Figure:
    """Layer × expert load, one panel per modality: each cell the share of that modality's assignments
    at that layer taken by the expert (`coverage`). One diverging scale for all panels, white at the
    uniform share 1/E (the null of a router that ignores the token): red is more than its even share.

    Input: `analysis.modality_specialization(trace)` (coverage per component, layer, expert, modality).
    `cmax` fixes the top of the scale (give two models' figures the same one to compare them).
    """
    rows = specialization
    if component is not None:
        rows, component = pick(rows, "component", component, "modality_specialization")
    else:
        rows, component = pick(rows, "component", None, "modality_specialization")
    present = [m for m in MODALITIES if m in set(as_text(rows["modality"]))]
    chosen = [m for m in (modalities or present) if m in present]
    if not chosen:
        raise ValueError(
            f"expert_load_heatmap: none of modalities {modalities} has rows; present: {', '.join(present)}"
        )
    layers = np.array(sorted(pd.unique(rows["layer"]).tolist()))
    experts = int(rows["expert"].max()) + 1
    uniform = 1.0 / experts
    grids = {}
    for modality in chosen:
        part = rows[as_text(rows["modality"]) == modality]
        grid = np.zeros((len(layers), experts))
        grid[np.searchsorted(layers, part["layer"].to_numpy()), part["expert"].to_numpy().astype(int)] = part[
            "coverage"
        ].to_numpy(dtype=float)
        grids[modality] = grid
    top = float(cmax) if cmax is not None else max(float(max(g.max() for g in grids.values())), 2 * uniform)
    fig = make_subplots(
        rows=1, cols=len(chosen), shared_yaxes=True, subplot_titles=chosen, horizontal_spacing=0.03
    )
    for col, modality in enumerate(chosen, start=1):
        fig.add_trace(
            go.Heatmap(
                z=grids[modality],
                x=np.arange(experts),
                y=layers,
                coloraxis="coloraxis",
                name=modality,
                hovertemplate=f"{modality} · layer " + "%{y} · expert %{x}<br>%{z:.3f} of its assignments "
                f"(uniform {uniform:.3f})<extra></extra>",
            ),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="expert", row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(**{"tickformat": "d", "dtick": 1, "tick0": 0})
    # white at 1/E: the scale runs 0 .. 2/E symmetric around it, or further up when a cell exceeds that
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Expert load per modality, {component} (white: uniform 1/E = {uniform:.3f})",
        coloraxis={
            "colorscale": centred_colorscale(0.0, uniform, top),
            "cmin": 0,
            "cmax": top,
            "colorbar": {"title": "share of the<br>modality's<br>assignments"},
        },
        meta={"uniform": uniform, "component": str(component)},
        height=max(380, 160 + 40 * len(layers)),
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
        title=wrap(title) or f"Co-activation, {component} layer {layer}",
        xaxis_title="expert j (co-activated)",
        yaxis_title="expert i (given)",
        meta={"layer": _plain(layer)},
    )
    fig.update_yaxes(autorange="reversed")
    return fig


def _plain(value):
    """numpy scalars to Python (figure metadata must serialize to JSON)."""
    return value.item() if isinstance(value, np.generic) else value
