"""Routing analyses: what the routers of the thinker's and talker's MoE layers chose, as tidy tables.

Every function is `fn(trace, *, component=None, layer=None, ...) -> DataFrame`; `trace` is a Trace, a
dict of tables, any object with `.routing`/`.tokens` attributes, a trace store (folder or connection),
or the result of `prepare(trace)` (reuse it to run many analyses on one big trace). `component` and
`layer` select (one value or a list); None means all. Label columns (component, modality, phase,
text) are pandas Categoricals.

Notation used in the docstrings: a layer routes N tokens, each to a set S of k experts out of E; an
*assignment* is one (token, expert in S) pair, so a layer makes N·k assignments.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from ..trace import COMPONENTS, MODALITIES, PHASES
from ._source import (
    ComponentRouting,
    RoutingData,
    labels,
    layer_chunks,
    prepare,
    routing_parts,
    store_of,
)

__all__ = [
    "ROUTING_ANALYSES",
    "coactivation",
    "expert_load",
    "layer_transitions",
    "load_balance",
    "modality_experts",
    "modality_nmi",
    "modality_specialization",
    "prepare",
    "repetition",
    "router_confidence",
    "routing_agreement",
    "routing_suite",
    "token_paths",
    "vocabulary_specialization",
]


# -- small helpers ---------------------------------------------------------------------------------------


def _component_column(name: str, n: int) -> pd.Categorical:
    categories = list(COMPONENTS) if name in COMPONENTS else [*COMPONENTS, name]
    return labels(np.full(n, categories.index(name)), categories)


def _table(pieces: list[dict], columns: list[str], categorical=("component",)) -> pd.DataFrame:
    """One DataFrame from per-component dicts of equal-length arrays (an empty one with `columns`)."""
    frames = [pd.DataFrame(p, columns=columns) for p in pieces if len(next(iter(p.values())))]
    if not frames:
        out = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        for c in categorical:
            if c in out:
                out[c] = pd.Categorical([], categories=_categories(c))
        return out
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True)


def per_layer(fn=None, *, overlap: int = 0):
    """Give `fn` (an analysis whose rows are per layer, in layer order) a trace store a few layers at a
    time (see `layer_chunks`), so that no more than those layers' routing is ever in memory; the chunks'
    results one after the other are the whole store's. `overlap` reads the next recorded layers too
    (for pairs of layers) and keeps only the rows of the chunk's own layers. token_paths is not
    chunked: its table has a row per token, layer and rank, as large as the routing it reads."""
    if fn is None:
        return functools.partial(per_layer, overlap=overlap)

    @functools.wraps(fn)
    def wrapper(trace, *, component=None, layer=None, **options):
        chunks = None
        if store_of(trace) is not None:
            chunks = layer_chunks(trace, component=component, layer=layer, overlap=overlap)
        if chunks is None or len(chunks) <= 1:
            return fn(trace, component=component, layer=layer, **options)
        parts = []
        for name, layers, after in chunks:
            part = fn(prepare(trace, component=name, layer=layers + after), **options)
            parts.append(part[part["layer"].isin(layers)] if after else part)
        return _concat(parts)

    return wrapper


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames one after the other; a categorical column stays categorical (its categories united)."""
    out = pd.concat(frames, ignore_index=True)
    for column in frames[0].columns:
        if isinstance(frames[0][column].dtype, pd.CategoricalDtype) and out[column].dtype == object:
            categories = pd.unique(pd.concat([f[column].cat.categories.to_series() for f in frames]))
            out[column] = pd.Categorical(out[column], categories=categories)
    return out


def _categories(column: str) -> list[str]:
    return {"component": list(COMPONENTS), "modality": list(MODALITIES), "phase": list(PHASES)}.get(
        column, []
    )


def _layer_column(part: ComponentRouting, layer_index: np.ndarray) -> np.ndarray:
    return part.layers[layer_index].astype(np.int16)


def _valid(part: ComponentRouting, layer_index: int) -> np.ndarray | None:
    """[N, K] mask of present cells of one layer, or None when every cell is present."""
    return None if part.complete else part.experts[layer_index] >= 0


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def _safe_divide(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, np.asarray(a, dtype=np.float64) / np.where(b > 0, b, 1), np.nan)


def _layer_counts(part: ComponentRouting) -> np.ndarray:
    """[L, E] assignments per expert (cached)."""

    def compute():
        counts = np.zeros((len(part.layers), part.num_experts), dtype=np.int64)
        for li in range(len(part.layers)):
            experts = part.experts[li]
            valid = _valid(part, li)
            chosen = experts if valid is None else experts[valid]
            counts[li] = np.bincount(chosen.ravel().astype(np.intp), minlength=part.num_experts)
        return counts

    return part.cached("layer_counts", compute)


def _tokens_per_layer(part: ComponentRouting) -> np.ndarray:
    """[L] tokens with at least one routed expert in each layer."""
    if part.complete:
        return np.full(len(part.layers), part.num_tokens, dtype=np.int64)
    return (part.experts[:, :, 0] >= 0).sum(axis=1).astype(np.int64)


# -- 1. expert load ----------------------------------------------------------------------------------------

LOAD_COLUMNS = ["component", "layer", "expert", "count", "share", "uniform", "p_mean"]
BALANCE_COLUMNS = [
    "component",
    "layer",
    "tokens",
    "top_k",
    "experts",
    "active",
    "cv",
    "entropy",
    "entropy_norm",
    "max_share",
    "balance_loss",
    "p_source",
]


def _mean_probability(part: ComponentRouting) -> tuple[np.ndarray, str]:
    """[L, E] P_e, the mean router probability of each expert over the layer's tokens, and its source."""

    def compute():
        if part.logits is not None:
            return _probability_from_logits(part), "router_logits"
        layers, experts, k = len(part.layers), part.num_experts, part.top_k
        p_mean = np.zeros((layers, experts))
        source = "top-k weights"
        for li in range(layers):
            weights = part.weights[li].astype(np.float32)
            valid = _valid(part, li)
            if valid is not None:
                weights = np.where(valid, weights, 0)
            total = weights.sum(axis=1, keepdims=True)
            prob = weights / np.where(total > 0, total, 1)
            rest = np.zeros(part.num_tokens, dtype=np.float32)  # each unchosen expert's probability
            if part.topk_mass is not None and np.isfinite(part.topk_mass[li]).any():
                source = "top-k probabilities + uniform rest"
                mass = np.where(np.isfinite(part.topk_mass[li]), part.topk_mass[li], 1.0)
                prob = prob * mass[:, None]
                if experts > k:
                    rest = (1.0 - mass) / (experts - k)
            chosen = part.experts[li] if valid is None else part.experts[li][valid]
            lift = prob - rest[:, None]
            lift = lift if valid is None else lift[valid]
            routed = np.ones(part.num_tokens, dtype=bool) if valid is None else valid[:, 0]
            tokens = max(int(routed.sum()), 1)
            extra = np.bincount(chosen.ravel().astype(np.intp), lift.ravel(), minlength=experts)
            p_mean[li] = (rest[routed].sum() + extra) / tokens
        return p_mean, source

    return part.cached("mean_probability", compute)


def _probability_from_logits(part: ComponentRouting) -> np.ndarray:
    logits = part.logits
    layer = logits["layer"].to_numpy()
    pos = logits["pos"].to_numpy()
    expert = logits["expert"].to_numpy().astype(np.intp)
    value = logits["logit"].to_numpy().astype(np.float32)
    out = np.zeros((len(part.layers), part.num_experts))
    for li, number in enumerate(part.layers):
        rows = layer == number
        if not rows.any():
            continue
        token = np.unique(pos[rows], return_inverse=True)[1]
        dense = np.full((token.max() + 1, part.num_experts), -np.inf, dtype=np.float32)
        dense[token, expert[rows]] = value[rows]
        dense -= dense.max(axis=1, keepdims=True)
        prob = np.exp(dense)
        prob /= prob.sum(axis=1, keepdims=True)
        out[li] = prob.mean(axis=0)
    return out


@per_layer
def expert_load(trace, *, component=None, layer=None) -> pd.DataFrame:
    """Load of every expert: one row per (component, layer, expert).

    count: assignments to the expert (tokens whose top-k set S contains it); share f_e = count / (N·k),
    the expert's fraction of the layer's assignments (Σ_e f_e = 1); uniform = 1/E, the share under perfect
    balance; p_mean P_e: the expert's mean router probability over the layer's tokens (its source is
    load_balance's p_source). Source: Switch Transformer (Fedus et al., 2021, §2.2), whose f_e and P_e
    define the load-balancing loss.
    """
    pieces = []
    for part in routing_parts(trace, component, layer):
        counts = _layer_counts(part)
        layers, experts = counts.shape
        p_mean, _ = _mean_probability(part)
        li = np.repeat(np.arange(layers), experts)
        pieces.append(
            {
                "component": _component_column(part.component, layers * experts),
                "layer": _layer_column(part, li),
                "expert": np.tile(np.arange(experts, dtype=np.int16), layers),
                "count": counts.ravel(),
                "share": _safe_divide(counts, counts.sum(axis=1, keepdims=True)).ravel(),
                "uniform": np.full(layers * experts, 1.0 / experts),
                "p_mean": p_mean.ravel(),
            }
        )
    return _table(pieces, LOAD_COLUMNS)


@per_layer
def load_balance(trace, *, component=None, layer=None) -> pd.DataFrame:
    """How evenly each layer spreads its tokens: one row per (component, layer).

    tokens N; top_k k; experts E; active: experts with any assignment; cv: coefficient of variation
    (std / mean) of the E experts' counts, 0 when perfectly balanced; entropy: H(f) = -Σ f_e ln f_e in
    nats, and entropy_norm = H(f) / ln E (1 when balanced); max_share: the largest f_e; balance_loss:
    the Switch Transformer auxiliary loss E · Σ_e f_e · P_e (Fedus et al., 2021, eq. 4; 1 at perfect
    balance). P_e is exact when router_logits were captured (p_source "router_logits"). Otherwise it is
    estimated ("top-k probabilities + uniform rest"): a chosen expert's softmax probability is
    weight · topk_mass / Σ weight (exact), and the mass the top-k leaves, 1 - topk_mass, is spread evenly
    over the E - k unchosen experts (their individual probabilities were not recorded). Without
    router_stats the renormalized top-k weights stand in for the probabilities ("top-k weights").
    """
    pieces = []
    for part in routing_parts(trace, component, layer):
        counts = _layer_counts(part).astype(np.float64)
        p_mean, source = _mean_probability(part)
        layers, experts = counts.shape
        share = _safe_divide(counts, counts.sum(axis=1, keepdims=True))
        mean = counts.mean(axis=1)
        entropy = _entropy(np.nan_to_num(share))
        pieces.append(
            {
                "component": _component_column(part.component, layers),
                "layer": _layer_column(part, np.arange(layers)),
                "tokens": _tokens_per_layer(part),
                "top_k": np.full(layers, part.top_k, dtype=np.int64),
                "experts": np.full(layers, experts, dtype=np.int64),
                "active": (counts > 0).sum(axis=1),
                "cv": _safe_divide(counts.std(axis=1), mean),
                "entropy": entropy,
                "entropy_norm": entropy / np.log(experts) if experts > 1 else np.full(layers, np.nan),
                "max_share": np.nanmax(share, axis=1) if layers else np.zeros(0),
                "balance_loss": experts * np.nansum(share * p_mean, axis=1),
                "p_source": np.full(layers, source, dtype=object),
            }
        )
    out = _table(pieces, BALANCE_COLUMNS)
    out["p_source"] = out["p_source"].astype("category") if len(out) else out["p_source"]
    return out


# -- 2. modality specialization -------------------------------------------------------------------------

SPECIALIZATION_COLUMNS = [
    "component",
    "layer",
    "expert",
    "modality",
    "count",
    "share",
    "expected",
    "lift",
    "coverage",
]
NMI_COLUMNS = ["component", "layer", "modalities", "mi", "h_expert", "h_modality", "nmi"]
MODALITY_EXPERT_COLUMNS = ["component", "layer", "expert", "modality", "count", "share", "expected", "lift"]


def _modality_counts(part: ComponentRouting) -> np.ndarray:
    """[L, M, E] assignments by modality (MODALITIES order) and expert; tokens of unknown modality left out."""

    def compute():
        modalities, experts = len(MODALITIES), part.num_experts
        known = part.modality >= 0
        code = np.where(known, part.modality, modalities).astype(np.intp)[:, None] * experts
        counts = np.zeros((len(part.layers), modalities + 1, experts), dtype=np.int64)
        for li in range(len(part.layers)):
            codes = code + part.experts[li]
            valid = _valid(part, li)
            codes = codes if valid is None else codes[valid]
            counts[li] = np.bincount(codes.ravel(), minlength=(modalities + 1) * experts).reshape(-1, experts)
        return counts[:, :modalities]

    return part.cached("modality_counts", compute)


@per_layer
def modality_specialization(trace, *, component=None, layer=None) -> pd.DataFrame:
    """Which modalities each expert serves, against what chance would give.

    One row per (component, layer, expert, modality present in the layer). count: assignments of tokens
    of that modality to the expert; share = count / the expert's assignments (the expert's modality mix);
    expected = the modality's share of all the layer's assignments (an expert that ignores modality
    has share = expected); lift = share / expected; coverage = count / the modality's assignments (the
    fraction of the modality's routing the expert takes). Source: the per-modality expert loading of
    MoE-LLaVA (Lin et al., 2024, §4.4) and Uni-MoE (Li et al., 2024).
    """
    pieces = []
    for part in routing_parts(trace, component, layer):
        counts = _modality_counts(part)
        layers, modalities, experts = counts.shape
        per_expert = counts.sum(axis=1, keepdims=True)
        per_modality = counts.sum(axis=2, keepdims=True)
        total = per_modality.sum(axis=1, keepdims=True)
        share = _safe_divide(counts, per_expert)
        expected = _safe_divide(per_modality, total)
        lift = _safe_divide(share, expected)
        coverage = _safe_divide(counts, per_modality)
        present = np.broadcast_to(per_modality > 0, counts.shape)
        li, mi, ei = np.nonzero(present)
        pieces.append(
            {
                "component": _component_column(part.component, len(li)),
                "layer": _layer_column(part, li),
                "expert": ei.astype(np.int16),
                "modality": labels(mi, MODALITIES),
                "count": counts[li, mi, ei],
                "share": share[li, mi, ei],
                "expected": np.broadcast_to(expected, counts.shape)[li, mi, ei],
                "lift": lift[li, mi, ei],
                "coverage": coverage[li, mi, ei],
            }
        )
    return _table(pieces, SPECIALIZATION_COLUMNS, categorical=("component", "modality"))


@per_layer
def modality_nmi(trace, *, component=None, layer=None) -> pd.DataFrame:
    """How much a layer's expert choice tells about the token's modality: one row per (component, layer).

    Over the layer's assignments, with the joint distribution p(expert, modality): mi = I(E; M) in
    nats, h_expert = H(E), h_modality = H(M), and nmi = I(E; M) / min(H(E), H(M)), which is 1 when every
    expert serves one modality only and 0 when routing ignores modality (NaN with one modality). The
    min-normalization is used because H(E) ≫ H(M) (128 experts, ≤ 5 modalities) would cap the
    arithmetic-mean NMI far below 1. Source: the modality-routing analyses of MoE-LLaVA (Lin et al.,
    2024) and Uni-MoE (Li et al., 2024), summarized as normalized mutual information.
    """
    pieces = []
    for part in routing_parts(trace, component, layer):
        counts = _modality_counts(part).astype(np.float64)
        layers = counts.shape[0]
        total = counts.sum(axis=(1, 2))
        joint = _safe_divide(counts, total[:, None, None])
        joint = np.nan_to_num(joint)
        p_modality = joint.sum(axis=2)
        p_expert = joint.sum(axis=1)
        h_modality = _entropy(p_modality)
        h_expert = _entropy(p_expert)
        mi = h_modality + h_expert - _entropy(joint.reshape(layers, -1))
        mi = np.maximum(mi, 0.0)
        floor = np.minimum(h_modality, h_expert)
        pieces.append(
            {
                "component": _component_column(part.component, layers),
                "layer": _layer_column(part, np.arange(layers)),
                "modalities": (p_modality > 0).sum(axis=1),
                "mi": mi,
                "h_expert": h_expert,
                "h_modality": h_modality,
                "nmi": np.where(floor > 1e-12, mi / np.where(floor > 1e-12, floor, 1), np.nan),
            }
        )
    return _table(pieces, NMI_COLUMNS)


def modality_experts(
    trace, *, component=None, layer=None, min_share: float = 0.8, min_lift: float = 1.5, min_count: int = 8
) -> pd.DataFrame:
    """The modality-specific experts: one row per (component, layer, expert) that serves one modality.

    An expert is specific to modality m when at least `min_share` of its assignments are m tokens
    (share), that is at least `min_lift` times m's share of the layer (lift = share / expected, so a
    modality that dominates the input cannot make every expert "specific"), over at least `min_count`
    assignments. Columns as in modality_specialization. Source: modality-specific experts in MoE-LLaVA
    (Lin et al., 2024) and Uni-MoE (Li et al., 2024).
    """
    table = (
        trace
        if isinstance(trace, pd.DataFrame)
        else modality_specialization(trace, component=component, layer=layer)
    )
    per_expert = table.groupby(["component", "layer", "expert"], observed=True)["count"].transform("sum")
    keep = (table["share"] >= min_share) & (table["lift"] >= min_lift) & (per_expert >= min_count)
    out = table.loc[keep, MODALITY_EXPERT_COLUMNS]
    return out.sort_values(
        ["component", "layer", "modality", "share"], ascending=[True, True, True, False]
    ).reset_index(drop=True)


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
    for part in routing_parts(trace, component, layer):
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
        alone = _layer_counts(part)
        li, ei, oi = np.nonzero((alone[:, :, None] > 0) & ~np.eye(experts, dtype=bool)[None])
        count = pair_counts[li, ei, oi]
        p = count / alone[li, ei]
        baseline = (k - 1) / (experts - 1) if experts > 1 else np.nan
        pieces.append(
            {
                "component": _component_column(part.component, len(li)),
                "layer": _layer_column(part, li),
                "expert": ei.astype(np.int16),
                "other": oi.astype(np.int16),
                "count": count,
                "p": p,
                "baseline": np.full(len(li), baseline),
                "lift": p / baseline if baseline else np.full(len(li), np.nan),
            }
        )
    return _table(pieces, COACTIVATION_COLUMNS)


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


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
    for part in routing_parts(trace, component, layer):
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
            shared = _overlap(part.experts[li, :-1], part.experts[li, 1:])
            present = (first[li, :-1] >= 0) & (first[li, 1:] >= 0)
            present = present[keep]
            pairs[li] = np.bincount(group[present], minlength=groups)
            top1[li] = np.bincount(group[present], same[keep][present], minlength=groups)
            overlap[li] = np.bincount(group[present], shared[keep][present], minlength=groups)
        li, gi = np.nonzero(pairs > 0) if by else np.nonzero(np.ones_like(pairs, dtype=bool))
        n = pairs[li, gi]
        pieces.append(
            {
                "component": _component_column(part.component, len(li)),
                "layer": _layer_column(part, li),
                "modality": labels(gi if by else np.full(len(li), -1), MODALITIES),
                "pairs": n.astype(np.int64),
                "top1_repeat": _safe_divide(top1[li, gi], n),
                "topk_overlap": _safe_divide(overlap[li, gi], n * part.top_k),
                "baseline_top1": np.full(len(li), 1.0 / part.num_experts),
                "baseline_topk": np.full(len(li), part.top_k / part.num_experts),
            }
        )
    return _table(pieces, REPETITION_COLUMNS, categorical=("component", "modality"))


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
    for part in routing_parts(trace, component, layer):
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
                    "component": _component_column(part.component, len(ei)),
                    "layer": np.full(len(ei), part.layers[li], dtype=np.int16),
                    "next_layer": np.full(len(ei), part.layers[li + 1], dtype=np.int16),
                    "expert": ei.astype(np.int16),
                    "next_expert": ni.astype(np.int16),
                    "count": count,
                    "share": count / out_of,
                }
            )
    return _table(pieces, TRANSITION_COLUMNS)


def token_paths(trace, *, component=None, layer=None, pos=None, ranks: int | None = 1) -> pd.DataFrame:
    """Each token's route through the layers: one row per (component, token, layer, rank < ranks).

    pos selects tokens (one pos or a list; None: all); ranks=1 gives the first-choice pathway, None all
    k choices. Columns: pos, modality, text, layer, rank, expert, weight. Source: per-token expert
    pathways as drawn in Mixtral (Jiang et al., 2024, §5, Fig. 8) and OLMoE (Muennighoff et al., 2024).
    """
    wanted = None if pos is None else np.atleast_1d(np.asarray(pos))
    pieces = []
    for part in routing_parts(trace, component, layer):
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
            "component": _component_column(part.component, len(token)),
            "pos": part.pos[token],
            "modality": labels(part.modality[token], MODALITIES),
            "text": pd.Categorical.from_codes(text_codes[token], categories=text_values),
            "layer": _layer_column(part, li),
            "rank": rank,
            "expert": experts,
            "weight": weights.astype(np.float32),
        }
        if not present.all():
            piece = {c: v[present] for c, v in piece.items()}
        pieces.append(piece)
    return _table(pieces, PATH_COLUMNS, categorical=("component", "modality"))


# -- 6. vocabulary specialization ------------------------------------------------------------------------

VOCABULARY_COLUMNS = [
    "component",
    "layer",
    "token_id",
    "text",
    "occurrences",
    "expert",
    "count",
    "specialization",
    "baseline",
]


@per_layer
def vocabulary_specialization(
    trace, *, component=None, layer=None, ranks: int | None = None, min_occurrences: int = 1
) -> pd.DataFrame:
    """How concentrated each token id's routing is: one row per (component, layer, token id).

    For token id x and expert e, specialization(x, e) = N(x routed to e) / N(x), where "routed to"
    means e is among the token's first `ranks` choices (None: all k). The row reports the expert with the
    highest value (expert, its count, specialization) and N(x) (occurrences); baseline = ranks / E is
    the value under uniform random routing, and 1 means every occurrence of x goes to that expert. Token
    ids with fewer than `min_occurrences` occurrences are left out (one occurrence gives 1 trivially).
    Source: OLMoE (Muennighoff et al., 2024, §5, "vocabulary specialization").
    """
    pieces = []
    for part in routing_parts(trace, component, layer):
        experts = part.num_experts
        depth = part.top_k if ranks is None else min(max(int(ranks), 1), part.top_k)
        vocab_code, vocab = pd.factorize(part.token_id)
        size = len(vocab)
        first_text = np.full(size, "", dtype=object)
        first_text[vocab_code[::-1]] = part.text[::-1]
        rows = {k: [] for k in ("li", "vi", "occ", "expert", "count")}
        base = vocab_code.astype(np.intp)[:, None] * experts
        for li in range(len(part.layers)):
            chosen = part.experts[li, :, :depth]
            routed = chosen[:, 0] >= 0
            occurrences = np.bincount(vocab_code[routed], minlength=size)
            codes = base + chosen
            valid = chosen >= 0
            counts = np.bincount(
                codes[valid] if not part.complete else codes.ravel(), minlength=size * experts
            )
            counts = counts.reshape(size, experts)
            best = counts.argmax(axis=1)
            vi = np.flatnonzero(occurrences >= max(min_occurrences, 1))
            rows["li"].append(np.full(len(vi), li))
            rows["vi"].append(vi)
            rows["occ"].append(occurrences[vi])
            rows["expert"].append(best[vi])
            rows["count"].append(counts[vi, best[vi]])
        if not rows["li"]:
            continue
        li, vi = np.concatenate(rows["li"]), np.concatenate(rows["vi"])
        occ, count = np.concatenate(rows["occ"]), np.concatenate(rows["count"])
        text_codes, text_values = pd.factorize(pd.Series(first_text, dtype=object))
        pieces.append(
            {
                "component": _component_column(part.component, len(li)),
                "layer": _layer_column(part, li),
                "token_id": np.asarray(vocab)[vi].astype(np.int64),
                "text": pd.Categorical.from_codes(text_codes[vi], categories=text_values),
                "occurrences": occ,
                "expert": np.concatenate(rows["expert"]).astype(np.int16),
                "count": count,
                "specialization": count / occ,
                "baseline": np.full(len(li), depth / experts),
            }
        )
    return _table(pieces, VOCABULARY_COLUMNS)


# -- 7. router confidence --------------------------------------------------------------------------------

CONFIDENCE_COLUMNS = [
    "component",
    "layer",
    "modality",
    "phase",
    "tokens",
    "entropy",
    "entropy_norm",
    "topk_mass",
]


@per_layer
def router_confidence(trace, *, component=None, layer=None) -> pd.DataFrame:
    """How sure the router is: one row per (component, layer, modality, phase) with tokens.

    entropy: mean over tokens of the entropy (nats) of the full router softmax; entropy_norm = entropy /
    ln E (1: uniform, 0: one expert takes everything); topk_mass: mean softmax probability of the k chosen
    experts (the mass the top-k keeps). Read from the router_stats table (empty when it was not
    captured). Source: router entropy as a confidence measure in "Towards MoE Deployment: Mitigating
    Inefficiencies in Mixture-of-Expert (MoE) Inference" (Huang et al., 2023) and top-k mass as in
    DeepSeekMoE / Qwen-MoE routing analyses.
    """
    pieces = []
    modalities, phases = len(MODALITIES), len(PHASES)
    for part in routing_parts(trace, component, layer):
        if part.entropy is None:
            continue
        mod = np.where(part.modality >= 0, part.modality, modalities).astype(np.intp)
        pha = np.where(part.phase >= 0, part.phase, phases).astype(np.intp)
        group = mod * (phases + 1) + pha
        size = (modalities + 1) * (phases + 1)
        layers = len(part.layers)
        n = np.zeros((layers, size))
        entropy = np.zeros((layers, size))
        mass = np.zeros((layers, size))
        for li in range(layers):
            ok = np.isfinite(part.entropy[li])
            n[li] = np.bincount(group[ok], minlength=size)
            entropy[li] = np.bincount(group[ok], part.entropy[li][ok], minlength=size)
            has_mass = np.isfinite(part.topk_mass[li])
            mass[li] = np.bincount(group[has_mass], part.topk_mass[li][has_mass], minlength=size)
        li, gi = np.nonzero(n > 0)
        mi, pi = gi // (phases + 1), gi % (phases + 1)
        mean_entropy = entropy[li, gi] / n[li, gi]
        pieces.append(
            {
                "component": _component_column(part.component, len(li)),
                "layer": _layer_column(part, li),
                "modality": labels(np.where(mi < modalities, mi, -1), MODALITIES),
                "phase": labels(np.where(pi < phases, pi, -1), PHASES),
                "tokens": n[li, gi].astype(np.int64),
                "entropy": mean_entropy,
                "entropy_norm": mean_entropy / np.log(part.num_experts),
                "topk_mass": mass[li, gi] / n[li, gi],
            }
        )
    return _table(pieces, CONFIDENCE_COLUMNS, categorical=("component", "modality", "phase"))


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
    parts_b = {p.component: p for p in routing_parts(b, component, layer)}
    pieces = []
    for pa in routing_parts(a, component, layer):
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
        overlap = np.stack([_overlap(ea[i], eb[i]) for i in range(len(layers))])
        present = (ea[:, :, 0] >= 0) & (eb[:, :, 0] >= 0)
        top1 = (ea[:, :, 0] == eb[:, :, 0]) & present
        k = pa.top_k
        if by == "token":
            li, ti = np.nonzero(present)
            pieces.append(
                {
                    "component": _component_column(pa.component, len(li)),
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
                "component": _component_column(pa.component, len(layers)),
                "layer": layers.astype(np.int16),
                "tokens": n.astype(np.int64),
                "agreement": _safe_divide(np.where(present, overlap, 0).sum(axis=1), n * k),
                "top1_agreement": _safe_divide(top1.sum(axis=1), n),
                "exact": _safe_divide(exact, n),
                "baseline": np.full(len(layers), k / experts),
            }
        )
    columns = AGREEMENT_TOKEN_COLUMNS if by == "token" else AGREEMENT_COLUMNS
    return _table(pieces, columns, categorical=("component", "modality"))


# -- the suite -------------------------------------------------------------------------------------------

ROUTING_ANALYSES = {
    "expert_load": expert_load,
    "load_balance": load_balance,
    "modality_specialization": modality_specialization,
    "modality_nmi": modality_nmi,
    "modality_experts": modality_experts,
    "coactivation": coactivation,
    "repetition": repetition,
    "layer_transitions": layer_transitions,
    "token_paths": token_paths,
    "vocabulary_specialization": vocabulary_specialization,
    "router_confidence": router_confidence,
}


def routing_suite(trace, *, component=None, layer=None) -> dict[str, pd.DataFrame]:
    """Every routing analysis of one trace (or store query result), keyed by the function's name.

    The routing is prepared once (see `prepare`) and shared by all analyses; a trace store larger than
    `STORE_CHUNK_ROWS` routing rows is read by each analysis a few layers at a time instead.
    """
    if store_of(trace) is not None and len(layer_chunks(trace, component=component, layer=layer)) > 1:
        # A store too large to prepare at once: each analysis reads it a few layers at a time.
        return {name: fn(trace, component=component, layer=layer) for name, fn in ROUTING_ANALYSES.items()}
    data = trace if isinstance(trace, RoutingData) else prepare(trace, component=component, layer=layer)
    return {name: fn(data) for name, fn in ROUTING_ANALYSES.items()}
