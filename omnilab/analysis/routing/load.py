"""Routing analyses of how experts are used: how evenly (load, balance), whether they serve one modality
or one token id (specialization), and how sure the router is of its choice (confidence)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...trace import MODALITIES, PHASES
from .._source import labels
from ._common import (
    assignment_counts,
    component_column,
    layer_column,
    layer_counts,
    per_layer,
    safe_divide,
    tidy_table,
)
from .data import ComponentRouting, RoutingData


def _valid(part: ComponentRouting, layer_index: int) -> np.ndarray | None:
    """[N, K] mask of present cells of one layer, or None when every cell is present."""
    return None if part.complete else part.experts[layer_index] >= 0


def _entropy(p: np.ndarray, axis=-1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        counts = layer_counts(part)
        layers, experts = counts.shape
        p_mean, _ = _mean_probability(part)
        li = np.repeat(np.arange(layers), experts)
        pieces.append(
            {
                "component": component_column(part.component, layers * experts),
                "layer": layer_column(part, li),
                "expert": np.tile(np.arange(experts, dtype=np.int16), layers),
                "count": counts.ravel(),
                "share": safe_divide(counts, counts.sum(axis=1, keepdims=True)).ravel(),
                "uniform": np.full(layers * experts, 1.0 / experts),
                "p_mean": p_mean.ravel(),
            }
        )
    return tidy_table(pieces, LOAD_COLUMNS)


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        counts = layer_counts(part).astype(np.float64)
        p_mean, source = _mean_probability(part)
        layers, experts = counts.shape
        share = safe_divide(counts, counts.sum(axis=1, keepdims=True))
        mean = counts.mean(axis=1)
        entropy = _entropy(np.nan_to_num(share))
        pieces.append(
            {
                "component": component_column(part.component, layers),
                "layer": layer_column(part, np.arange(layers)),
                "tokens": _tokens_per_layer(part),
                "top_k": np.full(layers, part.top_k, dtype=np.int64),
                "experts": np.full(layers, experts, dtype=np.int64),
                "active": (counts > 0).sum(axis=1),
                "cv": safe_divide(counts.std(axis=1), mean),
                "entropy": entropy,
                "entropy_norm": entropy / np.log(experts) if experts > 1 else np.full(layers, np.nan),
                "max_share": np.nanmax(share, axis=1) if layers else np.zeros(0),
                "balance_loss": experts * np.nansum(share * p_mean, axis=1),
                "p_source": np.full(layers, source, dtype=object),
            }
        )
    out = tidy_table(pieces, BALANCE_COLUMNS)
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
    modalities = len(MODALITIES)
    group = np.where(part.modality >= 0, part.modality, modalities)
    return part.cached(
        "modality_counts", lambda: assignment_counts(part, group, modalities + 1)[:, :modalities]
    )


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        counts = _modality_counts(part)
        layers, modalities, experts = counts.shape
        per_expert = counts.sum(axis=1, keepdims=True)
        per_modality = counts.sum(axis=2, keepdims=True)
        total = per_modality.sum(axis=1, keepdims=True)
        share = safe_divide(counts, per_expert)
        expected = safe_divide(per_modality, total)
        lift = safe_divide(share, expected)
        coverage = safe_divide(counts, per_modality)
        present = np.broadcast_to(per_modality > 0, counts.shape)
        li, mi, ei = np.nonzero(present)
        pieces.append(
            {
                "component": component_column(part.component, len(li)),
                "layer": layer_column(part, li),
                "expert": ei.astype(np.int16),
                "modality": labels(mi, MODALITIES),
                "count": counts[li, mi, ei],
                "share": share[li, mi, ei],
                "expected": np.broadcast_to(expected, counts.shape)[li, mi, ei],
                "lift": lift[li, mi, ei],
                "coverage": coverage[li, mi, ei],
            }
        )
    return tidy_table(pieces, SPECIALIZATION_COLUMNS, categorical=("component", "modality"))


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
        counts = _modality_counts(part).astype(np.float64)
        layers = counts.shape[0]
        total = counts.sum(axis=(1, 2))
        joint = safe_divide(counts, total[:, None, None])
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
                "component": component_column(part.component, layers),
                "layer": layer_column(part, np.arange(layers)),
                "modalities": (p_modality > 0).sum(axis=1),
                "mi": mi,
                "h_expert": h_expert,
                "h_modality": h_modality,
                "nmi": np.where(floor > 1e-12, mi / np.where(floor > 1e-12, floor, 1), np.nan),
            }
        )
    return tidy_table(pieces, NMI_COLUMNS)


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
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
                "component": component_column(part.component, len(li)),
                "layer": layer_column(part, li),
                "token_id": np.asarray(vocab)[vi].astype(np.int64),
                "text": pd.Categorical.from_codes(text_codes[vi], categories=text_values),
                "occurrences": occ,
                "expert": np.concatenate(rows["expert"]).astype(np.int16),
                "count": count,
                "specialization": count / occ,
                "baseline": np.full(len(li), depth / experts),
            }
        )
    return tidy_table(pieces, VOCABULARY_COLUMNS)


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
    for part in RoutingData.of(trace, component=component, layer=layer).components:
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
                "component": component_column(part.component, len(li)),
                "layer": layer_column(part, li),
                "modality": labels(np.where(mi < modalities, mi, -1), MODALITIES),
                "phase": labels(np.where(pi < phases, pi, -1), PHASES),
                "tokens": n[li, gi].astype(np.int64),
                "entropy": mean_entropy,
                "entropy_norm": mean_entropy / np.log(part.num_experts),
                "topk_mass": mass[li, gi] / n[li, gi],
            }
        )
    return tidy_table(pieces, CONFIDENCE_COLUMNS, categorical=("component", "modality", "phase"))
