"""Figures of the logit lens and of linear probes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._style import TEMPLATE, as_text, integer_ticks, modality_color, wrap

__all__ = ["logit_lens_heatmap", "probe_lines", "talker_lens_heatmap"]

RANK_MAX = float(np.log10(1 + 151_936))  # Qwen's vocabulary: the worst rank a target can have
RANK_TICKS = {"tickvals": [0, 1, 2, 3, 4, 5], "ticktext": ["0", "9", "99", "999", "9999", "99999"]}


def printable(piece: str, size: int = 10) -> str:
    """A token piece that any font draws: spaces shown as ·, newlines and tabs as \\n and \\t,
    characters outside Latin, Greek, Cyrillic and general punctuation written as U+XXXX (they draw as
    missing-glyph boxes), cut to `size` characters."""
    out = []
    for ch in str(piece):
        if ch == " ":
            out.append("·")
        elif ch in "\n\r":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch.isprintable() and (ord(ch) < 0x0530 or 0x2000 <= ord(ch) < 0x2070):
            out.append(ch)
        else:
            out.append(f"U+{ord(ch):04X}")
    text = "".join(out)
    return text if len(text) <= size else text[: size - 1] + "…"


def logit_lens_heatmap(lens: pd.DataFrame, *, tokens=None, title=None) -> go.Figure:
    """Layers × positions of `analysis.logit_lens`: each cell the top token's probability, its piece
    written in the cell; with a target, the cell's colour is the target's rank (log scale, 0 = top)
    instead. Hover shows the layer, pos, modality, top token and (with a target) its rank and prob.
    The colour range is fixed (rank 0 to the vocabulary's size; probability 0-1), so lenses of two
    models drawn side by side share one scale.

    `tokens` ({pos: piece}, or a sequence indexed by pos: the prompt's own tokens) labels the x axis
    with the input token at each position ("piece·pos") instead of the bare pos. Pieces are drawn
    through `printable`, so none renders as a missing-glyph box. Layer ticks are whole numbers.
    """
    top = lens[lens["rank"] == 0]
    layers = np.unique(top["layer"].to_numpy())
    positions = np.unique(top["pos"].to_numpy())
    li = np.searchsorted(layers, top["layer"].to_numpy())
    pi = np.searchsorted(positions, top["pos"].to_numpy())
    has_target = "target_rank" in top.columns

    def grid(values, fill=np.nan, dtype=float):
        out = np.full((len(layers), len(positions)), fill, dtype=dtype)
        out[li, pi] = values
        return out

    prob = grid(top["prob"].to_numpy(dtype=float))
    piece = grid(np.array([printable(p, 8) for p in as_text(top["token"])], dtype=object), "", object)
    modality = grid(as_text(top["modality"]), "", object)
    if has_target:
        z = np.log10(1 + grid(top["target_rank"].to_numpy(dtype=float)))
        target = grid(top["target_rank"].to_numpy(dtype=float))
        colorbar, scale = {"title": "target rank", **RANK_TICKS}, "Viridis_r"
        bounds = {"zmin": 0.0, "zmax": RANK_MAX}  # one fixed scale: two models' lenses compare
    else:
        z, target, colorbar, scale = prob, np.full_like(prob, np.nan), {"title": "top prob"}, "Viridis"
        bounds = {"zmin": 0.0, "zmax": 1.0}
    custom = np.stack([modality, piece, prob, target], axis=-1)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=positions,
            y=layers,
            text=piece,
            texttemplate="%{text}" if len(positions) <= 48 else None,
            customdata=custom,
            colorscale=scale,
            colorbar=colorbar,
            **bounds,
            hovertemplate="layer %{y}, pos %{x} (%{customdata[0]})<br>top: %{customdata[1]} "
            "(p %{customdata[2]:.3g})"
            + ("<br>target rank %{customdata[3]}" if has_target else "")
            + "<extra></extra>",
            name="lens",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Logit lens: each layer read through the final norm and lm_head",
        xaxis_title="input token · pos" if tokens is not None else "pos",
        yaxis_title="layer",
    )
    integer_ticks(fig, "yaxis")
    if tokens is not None:
        lookup = tokens if isinstance(tokens, dict) else dict(enumerate(tokens))
        fig.update_xaxes(
            tickmode="array",
            tickvals=[int(p) for p in positions],
            ticktext=[f"{printable(lookup.get(int(p), ''), 8)}·{int(p)}" for p in positions],
            tickangle=-60,
        )
    return fig


def talker_lens_heatmap(lens: pd.DataFrame, *, title=None) -> go.Figure:
    """Talker layers × frames of `analysis.talker_lens`: each cell the top codebook-0 code's
    probability, the code written in the cell; hover adds the talker's own code at that frame."""
    top = lens[lens["rank"] == 0]
    layers = np.unique(top["layer"].to_numpy())
    frames = np.unique(top["frame"].to_numpy())
    li = np.searchsorted(layers, top["layer"].to_numpy())
    fi = np.searchsorted(frames, top["frame"].to_numpy())
    prob = np.full((len(layers), len(frames)), np.nan)
    prob[li, fi] = top["prob"].to_numpy(dtype=float)
    code = np.full((len(layers), len(frames)), "", dtype=object)
    code[li, fi] = top["code"].astype(str).to_numpy()
    own = np.full((len(layers), len(frames)), "", dtype=object)
    own[li, fi] = top["talker_code"].astype(str).to_numpy()
    fig = go.Figure(
        go.Heatmap(
            z=prob,
            x=frames,
            y=layers,
            text=code,
            texttemplate="%{text}" if len(frames) <= 32 else None,
            customdata=np.stack([code, own], axis=-1),
            colorscale="Viridis",
            colorbar={"title": "top prob"},
            hovertemplate="talker layer %{y}, frame %{x}<br>top code %{customdata[0]} (p %{z:.3g})"
            "<br>the talker's code %{customdata[1]}<extra></extra>",
            name="talker lens",
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title)
        or "Talker lens: each layer read through the final norm and codec_head (codebook 0)",
        xaxis_title="frame",
        yaxis_title="talker layer",
    )
    integer_ticks(fig, "yaxis")
    return fig


def probe_lines(scores: pd.DataFrame, *, control: pd.DataFrame | None = None, title=None) -> go.Figure:
    """Held-out score per layer of `analysis.linear_probe` (one line per `label` column value when
    present), with each probe's baseline dashed; `control` (the same probe fit on shuffled labels, its
    null: what a probe this wide finds in noise) is drawn grey and dotted, named "shuffled labels"."""
    fig = go.Figure()
    groups = scores.groupby("label", sort=False) if "label" in scores.columns else [("probe", scores)]
    for i, (name, rows) in enumerate(groups):
        color = modality_color(name) if str(name) in ("text", "audio", "image", "video") else None
        color = color or ["#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756"][i % 5]
        rows = rows.sort_values("layer")
        fig.add_trace(
            go.Scatter(x=rows["layer"], y=rows["test_score"], mode="lines+markers", name=str(name),
                       line={"color": color})
        )  # fmt: skip
        fig.add_trace(
            go.Scatter(x=rows["layer"], y=rows["baseline"], mode="lines", name=f"{name} baseline",
                       line={"color": color, "dash": "dash"}, showlegend=False)
        )  # fmt: skip
    if control is not None:
        rows = control.sort_values("layer")
        fig.add_trace(
            go.Scatter(x=rows["layer"], y=rows["test_score"], mode="lines+markers", name="shuffled labels",
                       line={"color": "#9D9D9D", "dash": "dot"}, marker={"symbol": "x"})
        )  # fmt: skip
    metric = scores["metric"].iloc[0] if len(scores) else "score"
    fig.update_layout(
        template=TEMPLATE,
        title=wrap(title) or "Linear probe, held-out score per layer (dashed: the label alone)",
        xaxis_title="layer",
        yaxis_title=metric,
    )
    integer_ticks(fig, "xaxis")
    return fig
