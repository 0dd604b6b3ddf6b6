"""Routing analyses of routes: which experts go together (co-activation within a token, repetition across
consecutive tokens, transitions between layers), each token's path, and how alike two runs route."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...trace import MODALITIES
from .._source import labels
from ._common import component_column, layer_column, layer_counts, per_layer, safe_divide, tidy_table
from .data import RoutingData

# -- 3. co-activation ------------------------------------------------------------------------------------

COACTIVATION_COLUMNS = ["component", "layer", "expert", "other", "count", "p", "baseline", "lift"]


@per_layer
def coactivation(trace, *, component=None, layer=None) -> pd.DataFrame:
    """How often expert j is chosen together with expert i: one row per (component, layer, i, j ≠ i).

    count = N(i ∈ S and j ∈ S), tokens routed to both; p = P(j ∈ S | i ∈ S) = count / N(i ∈ S);
    baseline = (k-1) / (E-1), p under uniform random routing; lift = p / baseline. Rows cover every
    expert i with any assignment and every other expert j. Source: OLMoE (Muennighoff et al., 2024,
    §5, "co-activation" N_{E_i,E_j} / N_{E_i}).
    """
    pieces = []
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        experts, k = part.num_experts, part.top_k
        layers = len(part.layers)
        pair_counts = np.zeros((layers, experts, experts), dtype=np.int64)
        pairs_per_token = k * (k - 1) // 2
        for li in range(layers):
            # ranks as contiguous rows: the pair codes a*E + b are written straight into one buffer
            chosen = np.ascontiguousarray(part.experts[li].T).astype(np.intp)
            high = chosen * experts
            n = chosen.shape[1]
            codes = np.empty(pairs_per_token * n, dtype=np.intp)
            j = 0
            for a in range(k):
                for b in range(a + 1, k):
                    np.add(high[a], chosen[b], out=codes[j * n : (j + 1) * n])
                    j += 1
            if not part.complete:
                valid = chosen >= 0
                ok = np.concatenate([valid[a] & valid[b] for a in range(k) for b in range(a + 1, k)])
                codes = codes[ok]
            if len(codes):
                pairs = np.bincount(codes, minlength=experts * experts).reshape(experts, experts)
                pair_counts[li] = pairs + pairs.T
        alone = layer_counts(part)
        li, ei, oi = np.nonzero((alone[:, :, None] > 0) & ~np.eye(experts, dtype=bool)[None])
        count = pair_counts[li, ei, oi]
        p = count / alone[li, ei]
        baseline = (k - 1) / (experts - 1) if experts > 1 else np.nan
        pieces.append(
            {
                "component": component_column(part.component, len(li)),
                "layer": layer_column(part, li),
                "expert": ei.astype(np.int16),
                "other": oi.astype(np.int16),
                "count": count,
                "p": p,
                "baseline": np.full(len(li), baseline),
                "lift": p / baseline if baseline else np.full(len(li), np.nan),
            }
        )
    return tidy_table(pieces, COACTIVATION_COLUMNS)


# -- 4. consecutive-token repetition --------------------------------------------------------------------

REPETITION_COLUMNS = [
    "component",
    "layer",
    "modality",
    "pairs",
    "top1_repeat",
    "topk_overlap",
    "baseline_top1",
    "baseline_topk",
]


def overlap_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|S_a ∩ S_b| row by row, for [N, K] expert arrays (entries -1 are absent and match nothing).

    k² elementwise comparisons of contiguous rank rows: faster than building bitsets for k ≤ 16.
    """
    a_ranks = np.ascontiguousarray(a.T)
    b_ranks = np.ascontiguousarray(b.T)
    shared = np.zeros(a.shape[0], dtype=np.int64)
    for x in a_ranks:
        hit = np.zeros(a.shape[0], dtype=bool)
        for y in b_ranks:
            hit |= x == y
        shared += hit & (x >= 0)
    return shared


@per_layer
def repetition(trace, *, component=None, layer=None, by: str | None = None) -> pd.DataFrame:
    """Does a token go to the experts of the token before it? One row per (component, layer[, modality]).

    Over pairs of consecutive tokens (pos and pos + 1 of one sequence): pairs; top1_repeat: fraction
    whose first-choice expert is the same; topk_overlap: mean |S_t ∩ S_t+1| / k. Random routing gives
    baseline_top1 = 1/E and baseline_topk = k/E. With by="modality" the rows are per modality, over the
    pairs whose two tokens share it (pairs across a modality boundary are left out; modality is NaN in
    the default per-layer rows). Source: Mixtral of Experts (Jiang et al., 2024, §5, "Routing analysis":
    the repetition of first-choice and first-or-second-choice experts on consecutive tokens).
    """
    if by not in (None, "modality"):
        raise ValueError(f"by={by!r} is not a grouping of repetition; use None or 'modality'")
    pieces = []
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        consecutive = part.consecutive()
        if by == "modality":
            group = np.where(part.modality[:-1] == part.modality[1:], part.modality[:-1], -1).astype(np.int64)
            group = np.where(consecutive & (group >= 0), group, -1)
            groups = len(MODALITIES)
        else:
            group = np.where(consecutive, 0, -1)
            groups = 1
        keep = group >= 0
        group = group[keep]
        first = part.experts[:, :, 0]
        layers = len(part.layers)
        pairs = np.zeros((layers, groups))
        top1 = np.zeros((layers, groups))
        overlap = np.zeros((layers, groups))
        for li in range(layers):
            same = (first[li, :-1] == first[li, 1:]) & (first[li, :-1] >= 0)
            shared = overlap_of(part.experts[li, :-1], part.experts[li, 1:])
            present = (first[li, :-1] >= 0) & (first[li, 1:] >= 0)
            present = present[keep]
            pairs[li] = np.bincount(group[present], minlength=groups)
            top1[li] = np.bincount(group[present], same[keep][present], minlength=groups)
            overlap[li] = np.bincount(group[present], shared[keep][present], minlength=groups)
        li, gi = np.nonzero(pairs > 0) if by else np.nonzero(np.ones_like(pairs, dtype=bool))
        n = pairs[li, gi]
        pieces.append(
            {
                "component": component_column(part.component, len(li)),
                "layer": layer_column(part, li),
                "modality": labels(gi if by else np.full(len(li), -1), MODALITIES),
                "pairs": n.astype(np.int64),
                "top1_repeat": safe_divide(top1[li, gi], n),
                "topk_overlap": safe_divide(overlap[li, gi], n * part.top_k),
                "baseline_top1": np.full(len(li), 1.0 / part.num_experts),
                "baseline_topk": np.full(len(li), part.top_k / part.num_experts),
            }
        )
    return tidy_table(pieces, REPETITION_COLUMNS, categorical=("component", "modality"))


# -- 5. cross-layer paths --------------------------------------------------------------------------------

TRANSITION_COLUMNS = ["component", "layer", "next_layer", "expert", "next_expert", "count", "share"]
PATH_COLUMNS = ["component", "pos", "modality", "text", "layer", "rank", "expert", "weight"]


@per_layer(overlap=1)
def layer_transitions(trace, *, component=None, layer=None, ranks: int = 1) -> pd.DataFrame:
    """Where tokens go next: one row per (component, layer ℓ, expert at ℓ, expert at ℓ+1) that occurs.

    count: tokens routed to `expert` at layer ℓ and to `next_expert` at ℓ+1, counting the first `ranks`
    choices on each side (ranks=1: the first-choice path; ranks=k: all k² pairs of a token); share =
    count / all transitions out of (ℓ, expert). Only pairs of recorded layers ℓ, ℓ+1 appear. Source: the
    cross-layer expert-path analyses of MoE interpretability work (e.g. OLMoE, Muennighoff et al., 2024,
    §5; "expert paths" in Lo et al., 2024, "A Closer Look into Mixture-of-Experts in LLMs").
    """
    pieces = []
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        experts = part.num_experts
        depth = min(max(int(ranks), 1), part.top_k)
        for li in range(len(part.layers) - 1):
            if part.layers[li + 1] != part.layers[li] + 1:
                continue
            here = part.experts[li, :, :depth].astype(np.intp)
            there = part.experts[li + 1, :, :depth].astype(np.intp)
            codes = []
            for a in range(depth):
                for b in range(depth):
                    ok = (here[:, a] >= 0) & (there[:, b] >= 0)
                    code = here[:, a] * experts + there[:, b]
                    codes.append(code if part.complete else code[ok])
            counts = np.bincount(np.concatenate(codes), minlength=experts * experts).reshape(experts, experts)
            ei, ni = np.nonzero(counts)
            count = counts[ei, ni]
            out_of = counts.sum(axis=1)[ei]
            pieces.append(
                {
                    "component": component_column(part.component, len(ei)),
                    "layer": np.full(len(ei), part.layers[li], dtype=np.int16),
                    "next_layer": np.full(len(ei), part.layers[li + 1], dtype=np.int16),
                    "expert": ei.astype(np.int16),
                    "next_expert": ni.astype(np.int16),
                    "count": count,
                    "share": count / out_of,
                }
            )
    return tidy_table(pieces, TRANSITION_COLUMNS)


def token_paths(trace, *, component=None, layer=None, pos=None, ranks: int | None = 1) -> pd.DataFrame:
    """Each token's route through the layers: one row per (component, token, layer, rank < ranks).

    pos selects tokens (one pos or a list; None: all); ranks=1 gives the first-choice pathway, None all
    k choices. Columns: pos, modality, text, layer, rank, expert, weight. Source: per-token expert
    pathways as drawn in Mixtral (Jiang et al., 2024, §5, Fig. 8) and OLMoE (Muennighoff et al., 2024).
    """
    wanted = None if pos is None else np.atleast_1d(np.asarray(pos))
    pieces = []
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        depth = part.top_k if ranks is None else min(max(int(ranks), 1), part.top_k)
        tokens = np.arange(part.num_tokens) if wanted is None else np.flatnonzero(np.isin(part.pos, wanted))
        experts = part.experts[:, tokens, :depth]
        weights = part.weights[:, tokens, :depth]
        layers, n = experts.shape[:2]
        # rows ordered by token, then layer, then rank
        experts = experts.transpose(1, 0, 2).reshape(-1)
        weights = weights.transpose(1, 0, 2).reshape(-1)
        token = np.repeat(tokens, layers * depth)
        li = np.tile(np.repeat(np.arange(layers), depth), n)
        rank = np.tile(np.arange(depth, dtype=np.int8), n * layers)
        present = experts >= 0
        text_codes, text_values = part.text_codes()
        piece = {
            "component": component_column(part.component, len(token)),
            "pos": part.pos[token],
            "modality": labels(part.modality[token], MODALITIES),
            "text": pd.Categorical.from_codes(text_codes[token], categories=text_values),
            "layer": layer_column(part, li),
            "rank": rank,
            "expert": experts,
            "weight": weights.astype(np.float32),
        }
        if not present.all():
            piece = {c: v[present] for c, v in piece.items()}
        pieces.append(piece)
    return tidy_table(pieces, PATH_COLUMNS, categorical=("component", "modality"))


# -- 8. agreement between two traces ---------------------------------------------------------------------

AGREEMENT_COLUMNS = ["component", "layer", "tokens", "agreement", "top1_agreement", "exact", "baseline"]
AGREEMENT_TOKEN_COLUMNS = ["component", "layer", "pos", "modality", "overlap", "agreement", "top1_same"]


def routing_agreement(a, b, *, component=None, layer=None, by: str = "layer") -> pd.DataFrame:
    """How much two runs route alike (original vs intervened, two checkpoints, two prompts).

    Tokens are matched by (component, layer, pos) and must be present in both. agreement = mean over
    tokens of |S_a ∩ S_b| / k (k of trace a); top1_agreement: fraction with the same first choice;
    exact: fraction with identical sets; baseline = k/E, the agreement of independent random routings.
    by="layer" gives one row per (component, layer); by="token" one row per (component, layer, pos) with
    overlap = |S_a ∩ S_b|. Source: routing consistency across inputs/checkpoints as in OpenMoE (Xue et
    al., 2024, §4, "Context-independent specialization", "early routing learning").
    """
    if by not in ("layer", "token"):
        raise ValueError(f"by={by!r} is not a grouping of routing_agreement; use 'layer' or 'token'")
    parts_b = {p.component: p for p in RoutingData.of(b, component=component, layer=layer).components}
    pieces = []
    for pa in RoutingData.of(a, component=component, layer=layer).components:
        pb = parts_b.get(pa.component)
        if pb is None:
            continue
        layers, la, lb = np.intersect1d(pa.layers, pb.layers, return_indices=True)
        tokens, ta, tb = np.intersect1d(pa.pos, pb.pos, return_indices=True)
        if len(layers) == 0 or len(tokens) == 0:
            continue
        experts = max(pa.num_experts, pb.num_experts)
        ea = pa.experts[la][:, ta]
        eb = pb.experts[lb][:, tb]
        overlap = np.stack([overlap_of(ea[i], eb[i]) for i in range(len(layers))])
        present = (ea[:, :, 0] >= 0) & (eb[:, :, 0] >= 0)
        top1 = (ea[:, :, 0] == eb[:, :, 0]) & present
        k = pa.top_k
        if by == "token":
            li, ti = np.nonzero(present)
            pieces.append(
                {
                    "component": component_column(pa.component, len(li)),
                    "layer": layers[li].astype(np.int16),
                    "pos": tokens[ti].astype(np.int32),
                    "modality": labels(pa.modality[ta][ti], MODALITIES),
                    "overlap": overlap[li, ti],
                    "agreement": overlap[li, ti] / k,
                    "top1_same": top1[li, ti],
                }
            )
            continue
        n = present.sum(axis=1)
        exact = ((overlap == k) & (overlap == (eb >= 0).sum(axis=2)) & present).sum(axis=1)
        pieces.append(
            {
                "component": component_column(pa.component, len(layers)),
                "layer": layers.astype(np.int16),
                "tokens": n.astype(np.int64),
                "agreement": safe_divide(np.where(present, overlap, 0).sum(axis=1), n * k),
                "top1_agreement": safe_divide(top1.sum(axis=1), n),
                "exact": safe_divide(exact, n),
                "baseline": np.full(len(layers), k / experts),
            }
        )
    columns = AGREEMENT_TOKEN_COLUMNS if by == "token" else AGREEMENT_COLUMNS
    return tidy_table(pieces, columns, categorical=("component", "modality"))
