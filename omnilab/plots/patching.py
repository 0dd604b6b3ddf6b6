"""The figure of an activation-patching sweep."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import TEMPLATE

__all__ = ["patching_heatmap"]


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
        title=title or "Activation patching: the clean run's activation put into the corrupted run",
        xaxis_title="position group",
        yaxis_title="site",
    )
    return fig
