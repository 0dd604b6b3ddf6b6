"""Figures of the organism's findings: accuracy against a time shift, routing NMI by layer across
models or training recipes, and an ablation against random sets of the same size.

Each takes a small table the caller measured (omnilab.organism.findings computes the numbers) and
draws it with its null: chance accuracy, the control model, the spread of random draws.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import TEMPLATE, as_text, integer_ticks, wrap

__all__ = ["ablation_intervals", "accuracy_vs_shift", "nmi_by_layer"]

SERIES = ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2"]
CONTROL = "#9D9D9D"


def _need(frame: pd.DataFrame, columns: set[str], what: str, source: str) -> None:
    missing = columns - set(frame.columns)
    if missing:
        raise ValueError(
            f"{what} takes {source}; missing columns {sorted(missing)} (has {list(frame.columns)})"
        )


def _series(frame: pd.DataFrame, column: str) -> list:
    return list(dict.fromkeys(as_text(frame[column]))) if column in frame else [""]


def accuracy_vs_shift(
    results: pd.DataFrame, *, chance: float | None = None, control: str | None = None, title=None
) -> go.Figure:
    """Accuracy against a time shift of the audio (seconds), one line per `model` (when the column is
    there); `control` names the model drawn as the grey dashed control; `chance` a dotted line.

    Input: columns shift (seconds), accuracy (0-1), optional model.
    """
    _need(results, {"shift", "accuracy"}, "accuracy_vs_shift", "a table of shift, accuracy[, model]")
    fig = go.Figure()
    names = as_text(results["model"]) if "model" in results else np.full(len(results), "", dtype=object)
    for i, name in enumerate(_series(results, "model")):
        rows = results[names == name].sort_values("shift")
        is_control = control is not None and name == control
        fig.add_trace(
            go.Scatter(
                x=rows["shift"], y=rows["accuracy"], mode="lines+markers", name=name or "accuracy",
                line={"color": CONTROL if is_control else SERIES[i % len(SERIES)],
                      "dash": "dash" if is_control else "solid"},
                hovertemplate="shift %{x:+.2f} s<br>accuracy %{y:.0%}<extra>" + name + "</extra>",
            )
        )  # fmt: skip
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="#666", annotation_text=f"chance {chance:.0%}",
                      name="chance")  # fmt: skip
    fig.add_vline(x=0, line_color="#BBB", line_width=1, name="unshifted")
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Accuracy against a shift of the audio's TM-RoPE time",
        xaxis_title="audio moved by (seconds)",
        yaxis={"title": "accuracy", "range": [0, 1.05], "tickformat": ".0%"},
    )
    return fig


def nmi_by_layer(nmi: pd.DataFrame, *, control: str | list[str] | None = None, title=None) -> go.Figure:
    """NMI of top-1 expert and modality per layer, one line per `model` (a model or a training recipe);
    the `control` models (random weights, the training's start) drawn grey and dashed.

    Input: columns layer, nmi, model (e.g. `organism.findings.top1_nmi` per model, concatenated).
    """
    _need(nmi, {"layer", "nmi", "model"}, "nmi_by_layer", "a table of layer, nmi, model")
    controls = set(np.atleast_1d(control).tolist()) if control is not None else set()
    names = as_text(nmi["model"])
    fig = go.Figure()
    colour = 0
    for name in _series(nmi, "model"):
        rows = nmi[names == name].sort_values("layer")
        is_control = name in controls
        fig.add_trace(
            go.Scatter(
                x=rows["layer"], y=rows["nmi"], mode="lines+markers", name=name,
                line={"color": CONTROL if is_control else SERIES[colour % len(SERIES)],
                      "dash": "dash" if is_control else "solid"},
                hovertemplate="layer %{x}<br>NMI %{y:.3f}<extra>" + name + "</extra>",
            )
        )  # fmt: skip
        colour += not is_control
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Routing follows modality: NMI(top-1 expert; modality) per layer",
        xaxis_title="layer",
        yaxis={"title": "NMI", "rangemode": "tozero"},
    )
    integer_ticks(fig, "xaxis")
    return fig


def ablation_intervals(
    draws: pd.DataFrame, *, baseline: float | None = None, chance: float | None = None, title=None
) -> go.Figure:
    """Accuracy after ablating sets of experts: each set's draws as points, and per set the mean with a
    bar over the range of its draws (the interval the named set must fall outside to mean anything).

    Input: columns set (a label: "named", "random", ...) and accuracy, one row per draw (a named set is
    one draw). `baseline`: the accuracy with nothing ablated (solid line); `chance` (dotted line).
    Traces: one "points" trace per set, then one "range" trace per set.
    """
    _need(draws, {"set", "accuracy"}, "ablation_intervals", "a table of set, accuracy (one row per draw)")
    names = as_text(draws["set"])
    order = _series(draws, "set")
    fig = go.Figure()
    rng = np.random.default_rng(0)  # a fixed jitter, so the figure is the same each run
    for i, name in enumerate(order):
        values = draws["accuracy"].to_numpy(dtype=float)[names == name]
        fig.add_trace(
            go.Scatter(
                x=i + rng.uniform(-0.12, 0.12, len(values)) if len(values) > 1 else [i], y=values,
                mode="markers", name=f"{name} points", showlegend=False,
                marker={"size": 7, "color": SERIES[i % len(SERIES)], "opacity": 0.6},
                hovertemplate="%{y:.1%}<extra>" + name + "</extra>",
            )
        )  # fmt: skip
    for i, name in enumerate(order):
        values = draws["accuracy"].to_numpy(dtype=float)[names == name]
        mean = float(values.mean())
        fig.add_trace(
            go.Scatter(
                x=[i + 0.25], y=[mean], mode="markers", name=f"{name} range",
                marker={"size": 12, "symbol": "diamond", "color": SERIES[i % len(SERIES)]},
                error_y={"type": "data", "symmetric": False, "array": [float(values.max()) - mean],
                         "arrayminus": [mean - float(values.min())], "thickness": 2, "width": 8},
                showlegend=False,
                hovertemplate=f"{name}: mean {mean:.1%} over {len(values)} draw(s)<br>"
                f"range {values.min():.1%}–{values.max():.1%}<extra></extra>",
            )
        )  # fmt: skip
    if baseline is not None:
        fig.add_hline(y=baseline, line_color="#333", annotation_text=f"nothing ablated {baseline:.0%}",
                      name="baseline")  # fmt: skip
    if chance is not None:
        fig.add_hline(y=chance, line_dash="dot", line_color="#666", annotation_text=f"chance {chance:.0%}",
                      annotation_position="bottom right", name="chance")  # fmt: skip
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Accuracy with experts ablated: the named set against random sets",
        xaxis={"tickvals": list(range(len(order))), "ticktext": order, "title": "experts ablated"},
        yaxis={"title": "accuracy", "range": [0, 1.05], "tickformat": ".0%"},
    )
    return fig
