"""FeatureExplorer: one SAE feature at a time: its top inputs across modalities, its factor AUCs, and
its activation over a chosen input's tokens.

    explorer = FeatureExplorer(sae, store, feature=12, factors=world_factors(store),
                               lab=lab, conversation=conversation)
    explorer.feature.value = 40          # everything follows

`examples` shows the inputs whose tokens activate the feature most (each input's largest
activation): the picture as a thumbnail, the audio and video playable, and the prompt's tokens
shaded by the feature's activation (a media block as one chip with its largest value).
`top_examples_html` builds that panel on its own (the app can show it). The figures are plotly.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis.sae import factor_aucs, feature_rows, token_activations
from ..plots._style import MODALITY_COLORS
from ._figures import Explorer, refresh


def _media_html(item: dict, base: Path) -> str:
    kind = item.get("type")
    source = item.get(kind)
    if not isinstance(source, str):
        return ""
    path = Path(source) if Path(source).is_absolute() else base / source
    if not path.is_file():
        return f"<i>{html.escape(kind)} missing: {html.escape(str(path))}</i>"
    if kind == "image":
        from PIL import Image

        image = Image.open(path).convert("RGB")
        image.thumbnail((72, 72))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        return f'<img src="data:image/png;base64,{data}" style="height:72px;border:1px solid #ccc"/>'
    data = base64.b64encode(path.read_bytes()).decode()
    if kind == "audio":
        return f'<audio controls style="height:28px" src="data:audio/wav;base64,{data}"></audio>'
    if kind == "video":
        return f'<video controls style="height:72px" src="data:video/mp4;base64,{data}"></video>'
    return ""


def _tokens_html(rows: pd.DataFrame, peak: float) -> str:
    """The sample's tokens in order, shaded by activation; consecutive media tokens as one chip."""
    parts = []
    rows = rows.sort_values("pos")
    blocks = (rows["modality"] != rows["modality"].shift()).cumsum()
    for _, block in rows.groupby(blocks, sort=False):
        modality = block["modality"].iloc[0]
        if modality == "text":
            for text, value in zip(block["text"], block["activation"], strict=True):
                parts.append(_chip(html.escape(str(text)), value, peak))
        else:
            value = float(block["activation"].max())
            parts.append(_chip(f"[{modality} ×{len(block)}: {value:.2g}]", value, peak, modality))
    return "".join(parts)


def _chip(text: str, value: float, peak: float, modality: str | None = None) -> str:
    alpha = 0.0 if peak <= 0 else max(0.0, min(1.0, float(value) / peak))
    border = f"border:1px solid {MODALITY_COLORS.get(modality, '#999')};" if modality else ""
    return (
        f'<span title="{float(value):.3g}" style="background:rgba(220,40,40,{alpha:.2f});{border}'
        f'white-space:pre;padding:0 1px">{text}</span>'
    )


def top_examples_html(store, rows: pd.DataFrame, *, top: int = 6) -> str:
    """HTML cards of the `top` inputs with the largest activation in `rows` (analysis.sae.feature_rows)."""
    from ..store import query
    from ..store.layout import read_meta

    best = rows.groupby("sample_id")["activation"].max().sort_values(ascending=False)
    best = best[best > 0].head(top)
    if best.empty:
        return "<i>the feature is not active on any selected token</i>"
    peak = float(best.iloc[0])
    ids = ", ".join("'" + s.replace("'", "''") + "'" for s in best.index)
    samples = query(store, f"SELECT sample_id, conversation, extra FROM samples WHERE sample_id IN ({ids})")
    samples = samples.set_index("sample_id")
    manifest = read_meta(Path(store)).get("manifest", "")
    base = Path(manifest).parent if manifest else Path(store)
    cards = []
    for sample_id, value in best.items():
        own = rows[rows["sample_id"] == sample_id]
        at = own.loc[own["activation"].idxmax()]
        extra = samples.loc[sample_id, "extra"] if sample_id in samples.index else None
        extra = json.loads(extra) if isinstance(extra, str) and extra else {}
        conversation = samples.loc[sample_id, "conversation"] if sample_id in samples.index else "[]"
        conversation = json.loads(conversation) if isinstance(conversation, str) else conversation
        media = "".join(
            _media_html(item, base)
            for message in conversation or []
            for item in (message.get("content") if isinstance(message.get("content"), list) else [])
        )
        answer = f" · answer <b>{html.escape(str(extra['answer']))}</b>" if "answer" in extra else ""
        cards.append(
            f'<div style="margin:4px 0;padding:4px;border-bottom:1px solid #eee">'
            f"<b>{html.escape(str(sample_id))}</b> · max {value:.3g} at pos {int(at['pos'])} "
            f"({html.escape(str(at['modality']))}){answer}<br>{media}"
            f'<div style="font-family:monospace;font-size:12px">{_tokens_html(own, peak)}</div></div>'
        )
    return "".join(cards)


def factor_figure(aucs: pd.DataFrame, feature: int) -> go.Figure:
    """Bars of the feature's AUC for each factor value, one colour per modality (0.5: chance)."""
    figure = go.Figure()
    for modality, group in aucs.groupby("modality", sort=True):
        labels = group["task"] + "/" + group["factor"] + "=" + group["value"]
        figure.add_bar(
            x=labels, y=group["auc"], name=modality, marker_color=MODALITY_COLORS.get(modality, "#999")
        )
    figure.add_hline(y=0.5, line_dash="dot", line_color="#888")
    figure.update_layout(
        title=f"feature {feature}: AUC for each factor value, per modality",
        yaxis={"range": [0, 1], "title": "AUC"},
        barmode="group",
        template="plotly_white",
        height=320,
    )
    return figure


def token_figure(tokens: pd.DataFrame, feature: int) -> go.Figure:
    """Bars of the feature's activation at each prompt position, coloured by modality."""
    figure = go.Figure()
    for modality, group in tokens.groupby("modality", sort=True):
        figure.add_bar(
            x=group["pos"],
            y=group["activation"],
            name=modality,
            hovertext=group["text"].astype(str),
            marker_color=MODALITY_COLORS.get(modality, "#999"),
        )
    figure.update_layout(
        title=f"feature {feature} over the chosen input's tokens",
        xaxis={"title": "pos"},
        yaxis={"title": "activation"},
        template="plotly_white",
        height=280,
    )
    return figure


class FeatureExplorer(Explorer):
    """An SAE feature's top inputs, factor AUCs and activation over one input (see the module).

    `feature` (an IntText) picks the feature; `examples` (HTML), `aucs` and `tokens` (FigureWidgets)
    follow. `factors` (omnilab.sae.world_factors) enables the AUCs; `lab` and `conversation` (with
    `forward`, lab.forward's keywords) the token view.
    """

    def __init__(
        self,
        sae,
        store,
        *,
        feature: int = 0,
        factors: pd.DataFrame | None = None,
        lab=None,
        conversation=None,
        forward: dict | None = None,
        top: int = 6,
    ):
        self.sae, self.store, self.factors, self.top = sae, store, factors, top
        self.lab, self.conversation, self.forward = lab, conversation, dict(forward or {})
        self.feature = widgets.BoundedIntText(value=feature, min=0, max=sae.d_sae - 1, description="feature")
        self.examples = widgets.HTML()
        self.aucs = go.FigureWidget()
        self.tokens = go.FigureWidget()
        self.rows = None
        children = [self.feature, self.examples]
        if factors is not None:
            children.append(self.aucs)
        if lab is not None and conversation is not None:
            children.append(self.tokens)
        self.widget = widgets.VBox(children)
        self.feature.observe(lambda change: self.show(change["new"]), names="value")
        self.show(feature)

    def show(self, feature: int) -> None:
        """Fill every view for `feature`."""
        self.rows = feature_rows(self.sae, self.store, feature)
        self.examples.value = top_examples_html(self.store, self.rows, top=self.top)
        if self.factors is not None:
            pooled = (
                self.rows.groupby(["sample_id", "modality"], sort=False)["activation"].max().reset_index()
            )
            aucs = factor_aucs(
                pooled[["sample_id", "modality"]], pooled["activation"].to_numpy(np.float64), self.factors
            )
            self.factor_table = aucs
            refresh(self.aucs, factor_figure(aucs, feature))
        if self.lab is not None and self.conversation is not None:
            self.token_table = token_activations(
                self.lab, self.sae, self.conversation, feature, **self.forward
            )
            refresh(self.tokens, token_figure(self.token_table, feature))
