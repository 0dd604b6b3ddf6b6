"""Routing paths across layers: the Sankey of first choices, and agreement with a reference route.
Each takes an analysis output (named in its docstring) and returns a go.Figure."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ..trace import MODALITIES
from ._style import (
    TEMPLATE,
    as_text,
    integer_ticks,
    modality_color,
    pick,
    wrap,
)

__all__ = ["agreement_lines", "paths_sankey"]


def paths_sankey(
    transitions: pd.DataFrame, *, component=None, layers=None, top: int | None = 12, title=None
) -> go.Figure:
    """Cross-layer expert paths as a Sankey: a node per (layer, expert) in its layer's column, a link
    per transition with its token count.

    Input: `analysis.layer_transitions(trace)` (grey links), or `analysis.token_paths(trace, ranks=1)`
    (first choices; each link split and coloured by the tokens' modality, with a legend). `layers`
    selects a range of layers; `top` keeps the most frequent links out of each layer (None: all).
    Nodes sit at x = their layer's column and y = their place in it, ordered by expert, each as tall
    as its tokens (plotly ignores a node x given without its y).
    """
    rows = transitions
    if component is not None:
        rows, _ = pick(rows, "component", component, "layer_transitions")
    by_modality = {"pos", "modality", "expert", "layer"} <= set(rows.columns) and "next_layer" not in rows
    if by_modality:
        rows = _first_choice_links(rows)
    if layers is not None:
        rows = rows[rows["layer"].isin(list(layers)) & rows["next_layer"].isin(list(layers))]
    if top is not None and len(rows):
        pair = ["layer", "expert", "next_expert"]
        totals = rows.groupby(pair, observed=True)["count"].sum().reset_index()
        kept = totals.sort_values("count", ascending=False).groupby("layer", observed=True).head(top)
        rows = rows.merge(kept[pair], on=pair)
    rows = rows.sort_values(["layer", "expert", "next_expert"])
    sources = list(zip(rows["layer"].to_numpy().tolist(), rows["expert"].to_numpy().tolist(), strict=True))
    targets = list(
        zip(rows["next_layer"].to_numpy().tolist(), rows["next_expert"].to_numpy().tolist(), strict=True)
    )
    nodes = sorted(set(sources) | set(targets))
    index = {node: i for i, node in enumerate(nodes)}
    x, y = _sankey_positions(nodes, sources, targets, rows["count"].to_numpy(dtype=float))
    if by_modality:
        names = as_text(rows["modality"])
        colors = [_alpha(modality_color(m), 0.55) for m in names]
    else:
        colors = ["rgba(120,120,120,0.35)"] * len(rows)
    fig = go.Figure(
        go.Sankey(
            arrangement="fixed",
            node={
                "label": [f"L{layer} E{expert}" for layer, expert in nodes],
                "x": x,
                "y": y,
                "pad": 0,  # the gaps are in y (see _sankey_positions)
                "thickness": 10,
                "color": "#666",
                "line": {"color": "white", "width": 1},
                "hovertemplate": "%{label}<br>%{value} tokens<extra></extra>",
            },
            link={
                "source": [index[s] for s in sources],
                "target": [index[t] for t in targets],
                "value": rows["count"].to_numpy(),
                "color": colors,
                "customdata": as_text(rows["modality"]) if by_modality else rows["share"].to_numpy(),
                "hovertemplate": "%{source.label} → %{target.label}<br>%{value} tokens"
                + (" (%{customdata})" if by_modality else " (%{customdata:.1%} of the source)")
                + "<extra></extra>",
            },
        )
    )
    if by_modality:  # a legend for the link colours (Sankey traces have none)
        for modality in [m for m in MODALITIES if m in set(as_text(rows["modality"]))]:
            fig.add_trace(
                go.Scatter(
                    x=[None], y=[None], mode="markers", name=modality,
                    marker={"size": 10, "symbol": "square", "color": modality_color(modality)},
                )
            )  # fmt: skip
        fig.update_layout(xaxis_visible=False, yaxis_visible=False, legend_title_text="tokens")
    fig.update_layout(template=TEMPLATE, title=wrap(title) or "Expert paths across layers (first choices)")
    return fig


def _first_choice_links(paths: pd.DataFrame) -> pd.DataFrame:
    """token_paths (rank 0) → one row per (layer, expert, next expert, modality) with its token count."""
    first = paths[paths["rank"] == 0] if "rank" in paths else paths
    first = first[["pos", "layer", "expert", "modality"]].sort_values(["pos", "layer"])
    nxt = first.assign(layer=first["layer"] - 1).rename(columns={"expert": "next_expert"})
    pairs = first.merge(nxt[["pos", "layer", "next_expert"]], on=["pos", "layer"])
    pairs["next_layer"] = pairs["layer"] + 1
    pairs["modality"] = as_text(pairs["modality"])
    return (
        pairs.groupby(["layer", "next_layer", "expert", "next_expert", "modality"], observed=True)
        .size()
        .rename("count")
        .reset_index()
    )


def _sankey_positions(nodes, sources, targets, counts) -> tuple[list[float], list[float]]:
    """Node centres: x by layer column, y stacked by expert within the column.

    Plotly (d3-sankey, node pad 0) draws a node flow / (largest column's flow) of the height tall, the
    larger of its in and out flow; stacking at exactly that scale, with a column's spare height shared
    out as gaps, is what keeps the nodes of one layer from overlapping.
    """
    flow_in, flow_out = {}, {}
    for s, t, c in zip(sources, targets, counts, strict=True):
        flow_out[s] = flow_out.get(s, 0.0) + c
        flow_in[t] = flow_in.get(t, 0.0) + c
    low = min((n[0] for n in nodes), default=0)
    depth = max(max((n[0] for n in nodes), default=0) - low, 1)
    columns = {}
    for node in nodes:
        columns.setdefault(node[0], []).append(node)
    size = {n: max(flow_in.get(n, 0.0), flow_out.get(n, 0.0)) for n in nodes}
    largest = max((sum(size[n] for n in column) for column in columns.values()), default=1.0) or 1.0
    centre = {}
    for column in columns.values():
        heights = [size[n] / largest for n in column]
        gap = max(1.0 - sum(heights), 0.0) / (len(column) + 1)
        top = gap
        for node, height in zip(column, heights, strict=True):
            centre[node] = top + height / 2
            top += height + gap
    x = [0.001 + 0.998 * (node[0] - low) / depth for node in nodes]
    y = [float(min(max(centre[node], 0.001), 0.999)) for node in nodes]
    return x, y


def _alpha(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def agreement_lines(agreement: pd.DataFrame, *, ablated_layer=None, title=None) -> go.Figure:
    """Routing agreement per layer between two runs (one line per measure, the random baseline dashed).

    Input: `analysis.routing_agreement(a, b)` (by="layer"). `ablated_layer` draws a vertical band
    at the layer that was intervened on (layout shape named "ablated").
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
        title=wrap(title) or "Routing agreement between two runs",
        xaxis_title="layer",
        yaxis_title="|S_a ∩ S_b| / k",
        yaxis_range=[0, 1.02],
    )
    integer_ticks(fig, "xaxis")
    if ablated_layer is not None:
        fig.add_vrect(
            x0=float(ablated_layer) - 0.3, x1=float(ablated_layer) + 0.3, fillcolor="#E45756", opacity=0.15,
            line_width=0, name="ablated", annotation_text=f"ablated layer {int(ablated_layer)}",
            annotation_position="top left",
        )  # fmt: skip
    return fig
