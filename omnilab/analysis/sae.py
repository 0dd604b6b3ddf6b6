"""Score an SAE's features against factors whose truth is known (the organism's world), per modality.

    factors = omnilab.sae.world_factors(store)        # sample_id, task, factor, value
    scores = analysis.sae_factor_scores(sae, store, factors)
    shared = analysis.cross_modal_features(sae, store, factors)
    rows = feature_rows(sae, store, feature)           # one feature at every stored token
    tokens = token_activations(lab, sae, conversation, feature)  # runs the thinker once (takes a lab)

Definitions. A feature's score for one input in one modality is its largest activation over that
input's tokens of that modality (max-pooling; a colour lives on the image tokens that show it, not
on the background's). For a factor value (colour red) of a task (image) and a modality (the image
tokens), the positives are the task's inputs with that value and the negatives its other inputs; a
feature's AUC is the probability that a random positive outscores a random negative (ties count
half; Hanley & McNeil, 1982). The best feature is chosen on one half of the inputs (`select="half"`: the positives
and the negatives each split at random in two, seeded) and scored on the other half: with hundreds
of features and a few dozen inputs, the best in-sample AUC of even random directions is near 1, so
an in-sample maximum (`select="all"`) says little. Its threshold is the one that maximises TPR - FPR
on the selection half (Youden's J); precision and recall are read on the scoring half there.
Baselines beside every score: the same for `d_sae` random unit directions through the same centre
(source "random") and for the site's raw neurons (source "neuron"), each taken with both signs
(an SAE feature fires one way; a direction or a neuron may carry the factor either way).

`own` marks the modality that carries the factor in the input: the picture's tokens for image
colour and shape, the audio for a spoken word and for the beep's second, the video for a motion's
direction and the colour on screen at the beep, the text for a copied word. Text tokens of a media
task are where the organism reads its answer out; a feature there may code the answer, not the input.

A cross-modal feature (Templeton et al., 2024, report multimodal features in Claude 3 Sonnet): one
feature with AUC >= `threshold` for the same value (red) in two or more modalities (the picture of
red, the spoken word red, the video's red at the beep).
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

DEFAULT_WHERE = "component = 'thinker'"
OWN = {
    ("image", "colour"): "image",
    ("image", "shape"): "image",
    ("speech", "digit"): "audio",
    ("speech", "colour"): "audio",
    ("motion", "direction"): "video",
    ("beep", "second"): "audio",
    ("beep", "colour"): "video",
    ("text", "word"): "text",
}
SOURCES = ("sae", "random", "neuron")


@torch.no_grad()
def pooled_features(encode, store, site: str, *, where: str | None = DEFAULT_WHERE, batch_rows: int = 16_384):
    """(keys, values): each (sample_id, modality)'s largest value of `encode(x)` over its tokens.

    keys: DataFrame sample_id, modality, tokens; values: float32 [len(keys), features]. `encode` maps
    activations [n, d_in] (float32) to [n, features]. The store is read batch by batch.
    """
    from ..store import activations

    acts = activations(store, site, where=where)
    groups = pd.MultiIndex.from_arrays([acts.rows["sample_id"], acts.rows["modality"]])
    codes, uniques = pd.factorize(groups)
    codes = torch.as_tensor(codes, dtype=torch.long)
    out = None
    offset = 0
    for _, values in acts.batches(batch_rows):
        encoded = encode(values.float())
        if out is None:
            out = torch.full((len(uniques), encoded.shape[1]), float("-inf"))
        index = codes[offset : offset + len(values)][:, None].expand_as(encoded)
        out.scatter_reduce_(0, index, encoded.float().cpu(), reduce="amax")
        offset += len(values)
    keys = pd.DataFrame(
        {
            "sample_id": uniques.get_level_values(0),
            "modality": uniques.get_level_values(1),
            "tokens": np.bincount(codes.numpy(), minlength=len(uniques)),
        }
    )
    return keys, out


def _encoders(sae, seed: int) -> dict:
    """source -> encode function: the SAE's features, random directions and neurons (both signs)."""
    d_in, d_sae = sae.d_in, sae.d_sae
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(d_in, d_sae, generator=generator)
    directions = directions / directions.norm(dim=0, keepdim=True)
    centre = sae.b_dec.detach().float().cpu()
    device = sae.W_enc.device

    def features(x):
        return sae.encode(x.to(device)).cpu()

    def random(x):
        projected = (x - centre) @ directions
        return torch.cat([projected, -projected], dim=1)

    def neuron(x):
        return torch.cat([x, -x], dim=1)

    return {"sae": features, "random": random, "neuron": neuron}


def _subsets(keys: pd.DataFrame, factors: pd.DataFrame):
    """(task, factor, value, modality, row indices into keys, labels) of every scorable subset."""
    tasks = factors.drop_duplicates("sample_id").set_index("sample_id")["task"]
    keyed = keys.assign(task=keys["sample_id"].map(tasks)).dropna(subset=["task"])
    for (task, factor), group in factors.groupby(["task", "factor"], sort=True):
        for modality, rows in keyed[keyed["task"] == task].groupby("modality", sort=True):
            for value in sorted(group["value"].unique()):
                positive = set(group.loc[group["value"] == value, "sample_id"])
                labels = rows["sample_id"].isin(positive).to_numpy()
                if labels.all() or not labels.any():
                    continue
                yield task, factor, value, modality, rows.index.to_numpy(), labels


def _aucs(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUC of every column of `scores` [n, F] for boolean `labels` [n] (ties count half)."""
    ranks = rankdata(scores, axis=0)
    positives = labels.sum()
    negatives = len(labels) - positives
    return (ranks[labels].sum(0) - positives * (positives + 1) / 2) / (positives * negatives)


def _threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(threshold, precision, recall) at the threshold `score >= t` that maximises TPR - FPR."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each distinct score
    j = tp[last] / y.sum() - fp[last] / (~y).sum()
    best = last[int(np.argmax(j))]
    return float(s[best]), float(tp[best] / (best + 1)), float(tp[best] / y.sum())


def _halves(labels: np.ndarray, seed: int) -> np.ndarray:
    """A boolean mask of the selection half: every other positive and every other negative, shuffled."""
    rng = np.random.default_rng(seed)
    first = np.zeros(len(labels), dtype=bool)
    for value in (True, False):
        index = np.flatnonzero(labels == value)
        rng.shuffle(index)
        first[index[::2]] = True
    return first


def _pooled_all(sae, store, site, where, baselines: bool, seed: int):
    encoders = _encoders(sae, seed)
    if not baselines:
        encoders = {"sae": encoders["sae"]}

    def encode(x):
        return torch.cat([fn(x) for fn in encoders.values()], dim=1)

    keys, values = pooled_features(encode, store, site, where=where)
    widths = {"sae": sae.d_sae, "random": 2 * sae.d_sae, "neuron": 2 * sae.d_in}
    parts, start = {}, 0
    for source in encoders:
        parts[source] = values[:, start : start + widths[source]].numpy()
        start += widths[source]
    return keys, parts


def _feature_index(source: str, column: int, sae) -> tuple[int, int]:
    """(feature, sign) of a pooled column: random directions and neurons come as (+, -) halves."""
    if source == "sae":
        return column, 1
    half = sae.d_sae if source == "random" else sae.d_in
    return column % half, 1 if column < half else -1


def sae_factor_scores(
    sae,
    store,
    factors: pd.DataFrame,
    *,
    site: str | None = None,
    where: str | None = DEFAULT_WHERE,
    baselines: bool = True,
    select: str = "half",
    seed: int = 0,
) -> pd.DataFrame:
    """The best single feature for every factor value, per task and modality, with its baselines.

    factors: sample_id, task, factor, value (omnilab.sae.world_factors). select: "half" (chosen on
    one half, scored on the other; values with fewer than 2 positives are left out) or "all"
    (in-sample). Returns one row per (source, task, factor, value, modality): feature (its index in
    the source; sign -1 for a direction or neuron read negatively), auc (scored), auc_select (on the
    selection half), threshold, precision, recall (at the threshold, scored), n_pos, n_neg (scored),
    positive_mean (the feature's mean pooled value over all positives), own.
    """
    if select not in ("half", "all"):
        raise ValueError(f"select={select!r}: use 'half' (held-out scoring) or 'all' (in-sample)")
    site = site or sae.site
    keys, parts = _pooled_all(sae, store, site, where, baselines, seed)
    rows = []
    for task, factor, value, modality, index, labels in _subsets(keys, factors):
        if select == "half":
            if labels.sum() < 2 or (~labels).sum() < 2:
                continue
            first = _halves(labels, zlib.crc32(f"{seed}/{task}/{factor}/{value}".encode()))
        else:
            first = np.ones(len(labels), dtype=bool)
        scored = ~first if select == "half" else first
        for source, values in parts.items():
            scores = values[index]
            chosen = _aucs(scores[first], labels[first])
            column = int(np.argmax(chosen))
            feature, sign = _feature_index(source, column, sae)
            threshold, _, _ = _threshold(scores[first, column], labels[first])
            test, truth = scores[scored, column], labels[scored]
            predicted = test >= threshold
            hits = int((predicted & truth).sum())
            rows.append(
                {
                    "source": source,
                    "task": task,
                    "factor": factor,
                    "value": value,
                    "modality": modality,
                    "feature": feature,
                    "sign": sign,
                    "auc": float(_aucs(test[:, None], truth)[0]),
                    "auc_select": float(chosen[column]),
                    "threshold": threshold,
                    "precision": hits / int(predicted.sum()) if predicted.any() else float("nan"),
                    "recall": hits / int(truth.sum()),
                    "n_pos": int(truth.sum()),
                    "n_neg": int((~truth).sum()),
                    "positive_mean": float(scores[labels, column].mean()),
                    "own": OWN.get((task, factor)) == modality,
                }
            )
    return pd.DataFrame(rows)


def cross_modal_features(
    sae,
    store,
    factors: pd.DataFrame,
    *,
    threshold: float = 0.9,
    site: str | None = None,
    where: str | None = DEFAULT_WHERE,
    baselines: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Features with AUC >= `threshold` for the same value in two or more modalities.

    One row per (source, value, feature): modalities (sorted, comma-joined), n_modalities, and
    `where`: each (task/factor/modality) in which it reaches the threshold, with its AUC.
    """
    site = site or sae.site
    keys, parts = _pooled_all(sae, store, site, where, baselines, seed)
    hits: dict = {}
    for task, factor, value, modality, index, labels in _subsets(keys, factors):
        for source, values in parts.items():
            aucs = _aucs(values[index], labels)
            for column in np.flatnonzero(aucs >= threshold):
                feature, sign = _feature_index(source, int(column), sae)
                entry = hits.setdefault((source, value, feature, sign), {})
                entry[f"{task}/{factor}/{modality}"] = (modality, float(aucs[column]))
    rows = []
    for (source, value, feature, sign), places in hits.items():
        modalities = sorted({m for m, _ in places.values()})
        if len(modalities) < 2:
            continue
        rows.append(
            {
                "source": source,
                "value": value,
                "feature": feature,
                "sign": sign,
                "modalities": ", ".join(modalities),
                "n_modalities": len(modalities),
                "where": "; ".join(f"{k} {auc:.2f}" for k, (_, auc) in sorted(places.items())),
            }  # fmt: skip
        )
    columns = ["source", "value", "feature", "sign", "modalities", "n_modalities", "where"]
    return pd.DataFrame(rows, columns=columns)


def factor_aucs(keys: pd.DataFrame, scores: np.ndarray, factors: pd.DataFrame) -> pd.DataFrame:
    """In-sample AUC of one score per (sample_id, modality) row of `keys` for every factor value.

    scores: [len(keys)] (one feature's pooled values, see `pooled_features`). Returns task, factor,
    value, modality, own, auc, n_pos, n_neg.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(len(keys), 1)
    rows = []
    for task, factor, value, modality, index, labels in _subsets(keys.reset_index(drop=True), factors):
        rows.append(
            {
                "task": task,
                "factor": factor,
                "value": value,
                "modality": modality,
                "own": OWN.get((task, factor)) == modality,
                "auc": float(_aucs(scores[index], labels)[0]),
                "n_pos": int(labels.sum()),
                "n_neg": int((~labels).sum()),
            }
        )
    return pd.DataFrame(rows)


@torch.no_grad()
def feature_rows(sae, store, feature: int, *, site: str | None = None, where: str | None = DEFAULT_WHERE):
    """One SAE feature's activation at every selected row of `site` in `store`: the store's rows
    (sample_id, pos, modality, text, ...) with an `activation` column, read batch by batch."""
    from ..store import activations

    acts = activations(store, site or sae.site, where=where)
    parts = []
    for rows, values in acts.batches():
        encoded = sae.encode(values.float().to(sae.W_enc.device))[:, feature].cpu().numpy()
        parts.append(rows.assign(activation=encoded))
    return pd.concat(parts, ignore_index=True)


@torch.no_grad()
def token_activations(
    lab, sae, conversation, feature: int, *, site: str | None = None, **forward
) -> pd.DataFrame:
    """One SAE feature's activation over every prompt token of `conversation` (runs the thinker once).

    Returns the site's rows (pos, modality, text, seconds, ...) with an `activation` column.
    """
    site = site or sae.site
    with lab.trace(sites=site) as tracer:
        lab.forward(conversation, **forward)
    acts = tracer.trace.activations[site]
    values = sae.encode(acts.values.float().to(sae.W_enc.device))[:, feature].cpu().numpy()
    return acts.rows.assign(activation=values)
