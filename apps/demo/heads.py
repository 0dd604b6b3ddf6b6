"""The demo's "Heads" view: per attention head, the mass the last turn's last prompt position puts on
its audio and image tokens (`omnilab.analysis.head_scores`), as a table and a layer × head heatmap,
and the text of a head ablation ('1: 0, 3' = layer 1, heads 0 and 3). Plain functions, no Gradio.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from omnilab import analysis
from omnilab.errors import InterventionError, TraceError

from .session import Session, show

MODALITIES = ("audio", "image")
COLUMNS = ["layer", "head", "audio", "image", "audio_rank"]


def heads_table(session: Session) -> pd.DataFrame:
    """One row per recorded (layer, head) of the thinker: its attention mass (0..1) from the last turn's
    last prompt position onto the audio and the image tokens, and its rank by audio mass (1 = most).

    Empty before any turn; a turn recorded without attention gets a TraceError saying how to record it.
    """
    if session.last is None or session.last.reply.trace is None:
        return pd.DataFrame(columns=COLUMNS)
    trace = session.last.reply.trace
    if trace.attention.empty:
        raise TraceError(
            "the last turn recorded no attention; tick 'record attention' and send the message again"
        )
    scores = {m: analysis.head_scores(trace, m, queries="last") for m in MODALITIES}
    table = scores["audio"][["layer", "head"]].copy()
    for modality in MODALITIES:
        table[modality] = scores[modality]["mass"].to_numpy()
    table["audio_rank"] = scores["audio"]["rank"].to_numpy()
    return table.astype({"layer": int, "head": int, "audio_rank": int})


def top_head_spec(table: pd.DataFrame, modality: str = "audio") -> str:
    """The ablation text of the head with the most `modality` mass ('' when the table is empty)."""
    if table.empty:
        return ""
    top = table.loc[table[modality].idxmax()]
    return f"{int(top['layer'])}: {int(top['head'])}"


def heads_figure(table: pd.DataFrame) -> go.Figure:
    """Two layer × head heatmaps side by side: audio mass and image mass, on one 0..1 colour scale."""
    figure = make_subplots(rows=1, cols=2, subplot_titles=[f"{m} mass" for m in MODALITIES])
    if table.empty:
        figure.update_layout(title="send a message (with attention recorded) to see its heads")
        return figure
    layers = sorted(table["layer"].unique())
    for col, modality in enumerate(MODALITIES, start=1):
        grid = table.pivot(index="layer", columns="head", values=modality).reindex(layers)
        figure.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"head {h}" for h in grid.columns],
                y=[f"layer {la}" for la in layers],
                zmin=0.0,
                zmax=1.0,
                colorscale="Viridis",
                showscale=col == 2,
                texttemplate="%{z:.2f}",
                hovertemplate=f"%{{y}}, %{{x}}: {modality} mass %{{z:.3f}}<extra></extra>",
            ),  # fmt: skip
            row=1,
            col=col,
        )
    figure.update_layout(
        title="attention mass of the last prompt position, per head (thinker)", height=320 + 30 * len(layers)
    )
    return figure


def heads_view(session: Session) -> tuple[pd.DataFrame, go.Figure, str]:
    """(the heads table, its figure, the ablation text of the top audio head) for the last turn."""
    table = heads_table(session)
    return table, heads_figure(table), top_head_spec(table)


def parse_heads(spec) -> dict[int, list[int]]:
    """'1: 0, 3; 2: 1' -> {1: [0, 3], 2: [1]}. The shape of the text only: which layers and heads
    exist is checked against the model by `omnilab.instrument.units.head_ablation`."""
    if not isinstance(spec, str) or not spec.strip():
        raise InterventionError("say which heads to ablate as 'layer: head, head; ...' (e.g. '1: 0, 3')")
    if len(spec) > 2_000:
        raise InterventionError("the head ablation is longer than 2,000 characters; ablate fewer heads")
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        layer_text, sep, heads_text = part.partition(":")
        if not sep:
            raise InterventionError(f"{show(part)} is not 'layer: heads'; write e.g. '1: 0, 3'")
        try:
            layer = int(layer_text)
            heads = [int(h) for h in heads_text.replace(" ", ",").split(",") if h.strip()]
        except ValueError:
            raise InterventionError(f"{show(part)}: layers and heads are whole numbers") from None
        if layer < 0 or any(h < 0 for h in heads):
            raise InterventionError(f"{show(part)}: layers and heads count from 0")
        if not heads:
            raise InterventionError(f"{show(part)} names no heads; write e.g. '1: 0, 3'")
        out.setdefault(layer, [])
        out[layer] += [h for h in heads if h not in out[layer]]
    if not out:
        raise InterventionError("the head ablation names no layers; write e.g. '1: 0, 3'")
    return out
