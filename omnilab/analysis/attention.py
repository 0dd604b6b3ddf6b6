"""Attention analyses over the attention table (captured for chosen layers and heads).

Rows are (component, layer, head, query_pos, key_pos, weight, reduction, key_end): "row" rows hold
the whole causal rows of the chosen queries (a query's weights sum to 1), "top_k" rows each query's
strongest keys, "block" rows each query's mass on a run of one modality (key_pos..key_end-1).
Modalities come from the tokens table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..trace import MODALITIES
from ._source import as_list, equals, labels, table

__all__ = ["attention_map", "attention_modality_mass", "attention_over_time", "tower_attention_map"]

MAP_COLUMNS = [
    "component",
    "layer",
    "head",
    "query_pos",
    "key_pos",
    "weight",
    "query_modality",
    "key_modality",
    "query_text",
    "key_text",
]
MASS_COLUMNS = ["component", "layer", "head", "query_modality", "key_modality", "mass", "queries"]
TIME_COLUMNS = ["component", "layer", "head", "modality", "item", "frame", "seconds", "mass", "queries"]


def _select(trace, component, layer, head, reduction="row") -> pd.DataFrame:
    attention = table(trace, "attention")
    if len(attention) == 0:
        return attention
    keep = np.ones(len(attention), dtype=bool)
    if "reduction" in attention:
        keep &= np.isin(attention["reduction"].to_numpy(dtype=object), as_list(reduction))
    components = as_list(component)
    if components is not None:
        keep &= np.isin(attention["component"].to_numpy(dtype=object), components)
    if as_list(layer) is not None:
        keep &= attention["layer"].isin(as_list(layer)).to_numpy()
    if as_list(head) is not None:
        keep &= attention["head"].isin(as_list(head)).to_numpy()
    return attention if keep.all() else attention[keep]


class _TokenLookup:
    """pos → modality code, text, item, frame and seconds of one component's tokens."""

    def __init__(self, trace, component: str):
        tokens = table(trace, "tokens")
        rows = tokens[equals(tokens["component"], component)] if len(tokens) else tokens
        rows = rows.drop_duplicates("pos", keep="last") if len(rows) else rows
        size = int(rows["pos"].max()) + 1 if len(rows) else 0
        pos = rows["pos"].to_numpy().astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
        self.size = size
        self.modality = np.full(size, -1, dtype=np.int8)
        self.item = np.full(size, -1, dtype=np.int64)
        self.frame = np.full(size, -1, dtype=np.int64)
        self.seconds = np.full(size, np.nan)
        self.t = np.zeros(size, dtype=np.int64)
        self.text = np.full(size, "", dtype=object)
        if len(rows):
            self.modality[pos] = pd.Categorical(rows["modality"], categories=list(MODALITIES)).codes
            self.item[pos] = rows["item"].to_numpy()
            self.frame[pos] = rows["frame"].to_numpy()
            self.seconds[pos] = rows["seconds"].to_numpy(dtype=float)
            self.t[pos] = rows["t"].to_numpy()
            self.text[pos] = rows["text"].to_numpy(dtype=object)

    def modality_of(self, pos: np.ndarray) -> np.ndarray:
        inside = pos < self.size
        return np.where(inside, self.modality[np.where(inside, pos, 0)], -1)


def _groups(frame: pd.DataFrame):
    """(component, rows) per component of an attention selection."""
    if len(frame) == 0:
        return
    for name in pd.unique(frame["component"].to_numpy(dtype=object)):
        yield str(name), frame[equals(frame["component"], name)]


def attention_map(
    trace, *, component: str = "thinker", layer=None, head=None, average_heads: bool = False, reduction="row"
) -> pd.DataFrame:
    """The attention weights of the chosen layers and heads, with each side's modality and text.

    One row per recorded (layer, head, query_pos, key_pos) of the whole rows kept (reduction "row";
    "top_k" gives every query's strongest keys instead); with average_heads=True the weights are
    averaged over the selected heads (head = -1). Columns add query_modality, key_modality,
    query_text, key_text. This is the input of the attention heatmap. Source: attention maps as read
    in "What Does BERT Look At?" (Clark et al., 2019), grouped by modality as in multimodal attention
    studies (e.g. "An Image is Worth 1/2 Tokens After Layer 2", Chen et al., 2024).
    """
    rows = _select(trace, component, layer, head, reduction)
    if len(rows) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in MAP_COLUMNS})
    if average_heads:
        heads = rows["head"].nunique()
        rows = (
            rows.groupby(["component", "layer", "query_pos", "key_pos"], observed=True, sort=True)["weight"]
            .sum()
            .div(heads)
            .reset_index()
        )
        rows["head"] = np.int16(-1)
    lookup = _TokenLookup(trace, component)
    query = rows["query_pos"].to_numpy().astype(np.int64)
    key = rows["key_pos"].to_numpy().astype(np.int64)
    text_codes, text_values = pd.factorize(pd.Series(lookup.text, dtype=object))
    in_q, in_k = query < lookup.size, key < lookup.size
    return pd.DataFrame(
        {
            "component": pd.Categorical(rows["component"].astype(str)),
            "layer": rows["layer"].to_numpy(),
            "head": rows["head"].to_numpy(),
            "query_pos": query,
            "key_pos": key,
            "weight": rows["weight"].to_numpy(dtype=np.float32),
            "query_modality": labels(lookup.modality_of(query), MODALITIES),
            "key_modality": labels(lookup.modality_of(key), MODALITIES),
            "query_text": pd.Categorical.from_codes(
                np.where(in_q, text_codes[np.where(in_q, query, 0)], -1), categories=text_values
            ),
            "key_text": pd.Categorical.from_codes(
                np.where(in_k, text_codes[np.where(in_k, key, 0)], -1), categories=text_values
            ),
        }
    )


def attention_modality_mass(trace, *, component=None, layer=None, head=None) -> pd.DataFrame:
    """How much attention each modality pays to each modality: one row per (component, layer, head,
    query modality, key modality).

    For a query q, mass(q → m) = Σ of its weights on keys of modality m; `mass` is its mean over the
    queries of the query modality that have recorded weights (queries; over all key modalities the
    masses of one query modality sum to 1). Key modalities that no recorded key has are left out. It
    reads the "block" rows when the trace has them (every query's mass per modality run), else the
    whole rows of the recorded queries. Source: modality-level attention allocation as in
    "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., 2024) and the audio/visual attention
    analyses of omni-modal models.
    """
    rows = _select(trace, component, layer, head, "block")  # a block's modality is its first key's
    if len(rows) == 0:
        rows = _select(trace, component, layer, head)
    pieces = []
    modalities = len(MODALITIES) + 1  # the last code: unknown
    for name, part in _groups(rows):
        lookup = _TokenLookup(trace, name)
        query = part["query_pos"].to_numpy().astype(np.int64)
        key_mod = lookup.modality_of(part["key_pos"].to_numpy().astype(np.int64))
        key_mod = np.where(key_mod >= 0, key_mod, modalities - 1)
        layer_head, lh_values = pd.factorize(
            pd.MultiIndex.from_arrays([part["layer"].to_numpy(), part["head"].to_numpy()])
        )
        query_code, query_values = pd.factorize(query)
        nq = len(query_values)
        cell = (layer_head.astype(np.int64) * nq + query_code) * modalities + key_mod
        sums = np.bincount(
            cell, part["weight"].to_numpy(dtype=np.float64), minlength=len(lh_values) * nq * modalities
        )
        sums = sums.reshape(len(lh_values), nq, modalities)
        present = (
            np.bincount(layer_head.astype(np.int64) * nq + query_code, minlength=len(lh_values) * nq) > 0
        )
        present = present.reshape(len(lh_values), nq)
        key_present = np.bincount(key_mod, minlength=modalities) > 0
        q_mod = lookup.modality_of(np.asarray(query_values, dtype=np.int64))
        q_mod = np.where(q_mod >= 0, q_mod, modalities - 1)
        for qm in np.unique(q_mod):
            chosen = q_mod == qm
            queries = present[:, chosen].sum(axis=1)
            mass = sums[:, chosen, :].sum(axis=1) / np.maximum(queries, 1)[:, None]
            li, ki = np.nonzero((queries[:, None] > 0) & key_present[None, :])
            pieces.append(
                pd.DataFrame(
                    {
                        "component": name,
                        "layer": np.asarray([lh_values[i][0] for i in li], dtype=np.int16),
                        "head": np.asarray([lh_values[i][1] for i in li], dtype=np.int16),
                        "query_modality": labels(
                            np.full(len(li), qm if qm < modalities - 1 else -1), MODALITIES
                        ),
                        "key_modality": labels(np.where(ki < modalities - 1, ki, -1), MODALITIES),
                        "mass": mass[li, ki],
                        "queries": queries[li].astype(np.int64),
                    }
                )
            )
    if not pieces:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in MASS_COLUMNS})
    out = pd.concat(pieces, ignore_index=True)
    out["component"] = pd.Categorical(out["component"].astype(str))
    return out.sort_values(["component", "layer", "head", "query_modality", "key_modality"]).reset_index(
        drop=True
    )


def attention_over_time(
    trace,
    *,
    component: str = "thinker",
    layer=None,
    head=None,
    modality=("audio", "video"),
    query_modality=None,
) -> pd.DataFrame:
    """Where in time attention goes within audio and video: one row per (layer, head, key modality,
    item, frame).

    mass: the total weight the selected queries (all, or those of `query_modality`) put on the keys of
    that frame (an 80 ms talker/audio frame or a video temporal grid step), divided by the number of
    those queries (queries), i.e. the mean attention a query pays to that moment; seconds: the frame's
    time (the smallest `seconds` of its tokens, else t / position_id_per_seconds). Source: temporal
    attention profiles over audio/video tokens, as in the TM-RoPE analyses of Qwen2.5-Omni (Xu et al.,
    2025) and video-LLM attention studies.
    """
    rows = _select(trace, component, layer, head)
    if len(rows) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in TIME_COLUMNS})
    lookup = _TokenLookup(trace, component)
    query = rows["query_pos"].to_numpy().astype(np.int64)
    key = rows["key_pos"].to_numpy().astype(np.int64)
    wanted = [MODALITIES.index(m) for m in as_list(modality)]
    if query_modality is not None:
        q_wanted = [MODALITIES.index(m) for m in as_list(query_modality)]
        keep_q = np.isin(lookup.modality_of(query), q_wanted)
    else:
        keep_q = np.ones(len(query), dtype=bool)
    frame = rows.assign(_query=query)[keep_q]
    queries = frame.groupby(["layer", "head"], observed=True)["_query"].nunique().rename("queries")
    key_mod = lookup.modality_of(key[keep_q])
    on_media = np.isin(key_mod, wanted)
    media = frame[on_media]
    key_media = key[keep_q][on_media]
    if len(media) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in TIME_COLUMNS})
    from .positions import _position_id_per_seconds

    pps = _position_id_per_seconds(trace)
    seconds = lookup.seconds[key_media]
    seconds = np.where(np.isfinite(seconds), seconds, lookup.t[key_media] / pps)
    table_ = pd.DataFrame(
        {
            "layer": media["layer"].to_numpy(),
            "head": media["head"].to_numpy(),
            "modality": key_mod[on_media],
            "item": lookup.item[key_media],
            "frame": lookup.frame[key_media],
            "seconds": seconds,
            "weight": media["weight"].to_numpy(dtype=np.float64),
        }
    )
    out = (
        table_.groupby(["layer", "head", "modality", "item", "frame"], sort=True)
        .agg(seconds=("seconds", "min"), mass=("weight", "sum"))
        .reset_index()
        .merge(queries.reset_index(), on=["layer", "head"], how="left")
    )
    out["mass"] = out["mass"] / out["queries"]
    out["modality"] = labels(out["modality"].to_numpy(), MODALITIES)
    out.insert(0, "component", pd.Categorical([component] * len(out)))
    return out[TIME_COLUMNS]


TOWER_COLUMNS = ["tower", "layer", "call", "head", "query", "key", "weight", "query_seconds", "key_seconds"]


def tower_attention_map(
    trace, *, tower: str = "audio_tower", layer=None, call: int = 0, head=None
) -> pd.DataFrame:
    """Attention inside the audio or vision tower: one row per (head, query, key) of one tower forward.

    `call` picks the tower forward (the vision tower runs once for images and once for videos; the
    audio tower once per prompt); `head=None` averages the recorded heads (head = -1). The towers
    attend within windows, so keys outside a query's window are absent (weight 0). For the audio tower
    query_seconds/key_seconds place each frame in time (the tower's frames are the prompt's audio
    tokens, position_id_per_seconds of them a second); NaN for the vision tower, whose sequence is
    patches. Source: the recording attention function of `lab.trace(capture=("attention",),
    attention_layers={"audio_tower": [...]})`.
    """
    rows = table(trace, "tower_attention")
    keep = equals(rows["tower"], tower) & (rows["call"].to_numpy() == call)
    if layer is not None:
        keep &= rows["layer"].isin(as_list(layer)).to_numpy()
    if head is not None:
        keep &= rows["head"].isin(as_list(head)).to_numpy()
    rows = rows[keep]
    if len(rows) == 0:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in TOWER_COLUMNS})
    if head is None:
        heads = rows["head"].nunique()
        rows = (
            rows.groupby(["tower", "layer", "call", "query", "key"], sort=True)["weight"]
            .sum()
            .div(heads)
            .reset_index()
        )
        rows["head"] = np.int16(-1)
    pps = float(getattr(trace, "meta", {}).get("position_id_per_seconds", np.nan))
    scale = 1.0 / pps if tower == "audio_tower" and pps > 0 else np.nan
    out = rows[["tower", "layer", "call", "head", "query", "key", "weight"]].reset_index(drop=True)
    out["query_seconds"] = out["query"].to_numpy() * scale
    out["key_seconds"] = out["key"].to_numpy() * scale
    return out
