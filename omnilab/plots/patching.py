"""The figure of an activation-patching sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._style import TEMPLATE, centred_colorscale, wrap

__all__ = ["patching_heatmap", "patching_layers"]


def patching_heatmap(sweep: pd.DataFrame, *, value: str = "recovered", title=None) -> go.Figure:
    """Sites × position groups of `analysis.patching_sweep`: each cell the patch's `value`
    ("recovered": 1 = the clean metric restored, 0 = unchanged; or "metric"). Hover shows the site,
    group, modality, positions and the metric."""
    sites = list(dict.fromkeys(sweep.sort_values(["layer", "kind"], kind="stable")["site"]))
    groups = list(
        sweep["group"].cat.categories if hasattr(sweep["group"], "cat") else dict.fromkeys(sweep["group"])
    )
    si = np.array([sites.index(s) for s in sweep["site"]])
    gi = np.array([groups.index(g) for g in sweep["group"]])
    z = np.full((len(sites), len(groups)), np.nan)
    z[si, gi] = sweep[value].to_numpy(dtype=float)
    custom = np.empty((len(sites), len(groups), 3), dtype=object)
    custom[si, gi] = np.stack(
        [sweep["modality"].astype(str), sweep["positions"].astype(str), sweep["metric"].map("{:.4g}".format)],
        axis=-1,
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[str(g) for g in groups],
            y=sites,
            customdata=custom,
            colorscale="RdBu_r",
            zmid=0 if value == "recovered" else None,
            colorbar={"title": value},
            hovertemplate="%{y} at %{x} (%{customdata[0]}, %{customdata[1]} positions)<br>"
            + value
            + " %{z:.3g}, metric %{customdata[2]}<extra></extra>",
            name="patching",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Activation patching: the clean run's activation put into the corrupted run",
        xaxis_title="position group",
        yaxis_title="site",
    )
    return fig


def patching_layers(sweep: pd.DataFrame, *, value: str = "recovered", labels=None, title=None) -> go.Figure:
    """Position × layer, as in ROME's causal tracing (Meng et al., 2022, Fig. 1): one panel per site kind
    (resid, attn, mlp), layers down, position groups across, each cell the patch's `value` on one
    diverging scale whose white is 0 (the patch changed nothing; 1 = the clean metric restored).

    Input: `analysis.patching_sweep(...)` (positions="each" gives ROME's per-token picture). `labels`
    ({pos: text} or a list by group) writes token text under the groups. Traces are named by kind,
    all on `coloraxis` (cmin = -cmax).
    """
    kinds = list(dict.fromkeys(sweep["kind"].astype(str)))
    groups = list(
        sweep["group"].cat.categories if hasattr(sweep["group"], "cat") else dict.fromkeys(sweep["group"])
    )
    layers = np.array(sorted(pd.unique(sweep["layer"]).tolist()))
    values = sweep[value].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    bound = float(max(np.abs(finite).max() if finite.size else 0.0, 1e-6))
    ticks = [str(g) for g in groups]
    if labels is not None:
        lookup = dict(labels) if isinstance(labels, dict) else dict(zip(groups, labels, strict=False))
        starts = (
            sweep.drop_duplicates("group").set_index("group")["pos_start"] if "pos_start" in sweep else {}
        )
        ticks = [f"{lookup.get(int(starts[g]) if g in starts else g, lookup.get(g, g))}" for g in groups]
    fig = make_subplots(
        rows=1, cols=len(kinds), shared_yaxes=True, subplot_titles=kinds, horizontal_spacing=0.03
    )
    for col, kind in enumerate(kinds, start=1):
        rows = sweep[sweep["kind"].astype(str) == kind]
        z = np.full((len(layers), len(groups)), np.nan)
        z[np.searchsorted(layers, rows["layer"].to_numpy()), [groups.index(g) for g in rows["group"]]] = rows[
            value
        ].to_numpy(dtype=float)
        fig.add_trace(
            go.Heatmap(
                z=z, x=list(range(len(groups))), y=layers, coloraxis="coloraxis", name=kind,
                customdata=np.broadcast_to(np.array(ticks, dtype=object)[None, :], z.shape),
                hovertemplate=f"{kind} · layer " + "%{y} · %{customdata}<br>" + value + " %{z:.3g}<extra></extra>",
            ),
            row=1, col=col,
        )  # fmt: skip
        fig.update_xaxes(tickvals=list(range(len(groups))), ticktext=ticks, tickangle=-60, row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(tickformat="d", dtick=1, tick0=0, autorange="reversed")
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or f"Causal tracing: {value} when the clean activation is patched in (white: no effect)",
        coloraxis={"colorscale": centred_colorscale(-bound, 0, bound), "cmin": -bound, "cmax": bound,
                   "colorbar": {"title": value}},
        height=max(300, 160 + 40 * len(layers)),
    )  # fmt: skip
    return fig
