"""Head scores: per attention head, the mass a set of queries puts on one modality's tokens.

The "listening heads" measure of audio-language interpretability ("Are Audio-Language Models
Listening?", 2025: heads ranked by the attention they pay to the audio tokens; the same measure for
images): for each head, the attention probability from each query of the set onto the keys of
`modality`, summed over those keys and averaged over the queries.

Pure: it reads a Trace recorded with `capture=("attention",)` and block masses kept (the default
AttentionSettings: every query's mass per modality block), of the layers in `attention_layers`.

    with lab.trace(capture=("attention",), attention_layers={"thinker": [0, 1, 2, 3]}) as tr:
        lab.forward(conversation)
    head_scores(tr.trace, "audio", queries="text")  → component, layer, head, modality, mass, queries
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import TraceError

__all__ = ["head_scores"]


def head_scores(
    trace, modality: str = "audio", *, queries="last", component: str = "thinker"
) -> pd.DataFrame:
    """Per (component, layer, head): the mean over `queries` of the attention mass on `modality`.

    queries: "last" (the last prompt position), "all" (every recorded query), a modality name
    (queries at that modality's tokens, e.g. "text"), or a list of positions. Returns component,
    layer, head, modality, mass (0..1), queries (how many were averaged), rank (1 = the most mass),
    sorted by layer and head.
    """
    attention = trace.attention if hasattr(trace, "attention") else trace["attention"]
    tokens = trace.tokens if hasattr(trace, "tokens") else trace["tokens"]
    if "reduction" not in attention or not (attention["reduction"] == "block").any():
        raise TraceError(
            "head_scores reads every query's mass per modality block; record it with "
            "lab.trace(capture=('attention',), attention_layers=...) and blocks on (the default)"
        )
    blocks = attention[(attention["reduction"] == "block") & (attention["component"] == component)]
    if blocks.empty:
        raise TraceError(f"the trace holds no {component} attention; add it to attention_layers")
    toks = tokens[tokens["component"] == component]
    modality_at = pd.Series(toks["modality"].to_numpy(), index=toks["pos"].to_numpy())
    prompt = toks[toks["phase"] == "prefill"]["pos"] if "phase" in toks else toks["pos"]
    chosen = _queries(queries, blocks["query_pos"].unique(), toks, int(prompt.max()))
    blocks = blocks[blocks["query_pos"].isin(chosen)]
    if blocks.empty:
        raise TraceError(f"no recorded query matches queries={queries!r}")
    on = modality_at.reindex(blocks["key_pos"].to_numpy()).to_numpy() == modality
    mass = blocks.assign(mass=np.where(on, blocks["weight"].astype(np.float64), 0.0))
    per_query = mass.groupby(["layer", "head", "query_pos"], as_index=False)["mass"].sum()
    out = per_query.groupby(["layer", "head"], as_index=False).agg(
        mass=("mass", "mean"), queries=("mass", "size")
    )
    out.insert(0, "component", component)
    out.insert(3, "modality", modality)
    out["rank"] = out["mass"].rank(ascending=False, method="first").astype(int)
    return out.sort_values(["layer", "head"]).reset_index(drop=True)


def _queries(queries, recorded: np.ndarray, tokens: pd.DataFrame, last: int) -> np.ndarray:
    if isinstance(queries, str) and queries == "last":
        return np.array([last])
    if isinstance(queries, str) and queries == "all":
        return recorded
    if isinstance(queries, str):
        return tokens[tokens["modality"] == queries]["pos"].to_numpy()
    return np.asarray(list(queries), dtype=np.int64)
