"""Linear probes: how much of a label a layer's activations hold, read by a linear model.

For each layer, a linear model is fitted on a training split of the tokens and scored on the held-out
split (Alain & Bengio, 2016, "Understanding intermediate layers using linear classifier probes"):
scikit-learn's LogisticRegression for a categorical label (modality, token identity, a manifest's
label column) scored by accuracy, Ridge for a number (seconds on the TM-RoPE time axis) scored by R²,
each after standardising the features. Every layer sees the same split, so layers compare fairly;
`groups` (e.g. sample ids) keeps all tokens of one group on one side, so that a probe cannot pass by
recognising a sample. The baseline is what the label alone gives: the majority class's accuracy on
the held-out split, or R² 0 (predicting the training mean).

    linear_probe(features, labels)  → layer, task, metric, train_score, test_score, baseline,
                                      n_train, n_test, n_classes
    store_probe(store, "modality", sites="resid.*", where="component = 'thinker'")
                                    → the same, one row per site, `site` added: features read from a
                                      store's activations (omnilab.store.activations), labels from
                                      their rows or a manifest label column, groups by sample
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..errors import TraceError

__all__ = ["TASKS", "linear_probe", "store_probe"]

TASKS = ("auto", "classify", "regress")


def linear_probe(
    features,
    labels,
    *,
    task: str = "auto",
    groups=None,
    test_size: float = 0.25,
    seed: int = 0,
    regularization: float = 1.0,
) -> pd.DataFrame:
    """Held-out score of a linear probe per layer.

    features: {layer: array [tokens, width]}, an array [layers, tokens, width], or one array [tokens,
    width] (layer 0); tokens in the same order as `labels` [tokens]. task: "classify" (accuracy),
    "regress" (R²) or "auto" (regress a float label with more than 20 values, else classify).
    regularization: the inverse strength C of LogisticRegression, or 1/alpha of Ridge.
    """
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    layers = _layers(features)
    labels = np.asarray(labels)
    n = len(labels)
    for layer, array in layers.items():
        if array.ndim != 2 or array.shape[0] != n:
            raise TraceError(
                f"layer {layer}'s features have shape {tuple(array.shape)}; the probe needs [{n}, width] "
                f"({n} labels, one per token)"
            )
    task = _task(task, labels)
    train, test = _split(labels, task, groups, test_size, seed)
    n_classes = len(np.unique(labels[train])) if task == "classify" else 0
    if task == "classify" and n_classes < 2:
        raise TraceError("the training split holds one class only; a probe needs two or more labels")
    rows = []
    for layer, array in layers.items():
        x = np.asarray(array, dtype=np.float32)
        model = (
            LogisticRegression(C=regularization, max_iter=2000)
            if task == "classify"
            else Ridge(alpha=1.0 / regularization)
        )
        probe = make_pipeline(StandardScaler(), model).fit(x[train], labels[train])
        rows.append(
            {
                "layer": layer,
                "task": task,
                "metric": "accuracy" if task == "classify" else "r2",
                "train_score": float(probe.score(x[train], labels[train])),
                "test_score": float(probe.score(x[test], labels[test])),
                "baseline": _baseline(labels[train], labels[test], task),
                "n_train": len(train),
                "n_test": len(test),
                "n_classes": n_classes,
            }
        )
    return pd.DataFrame(rows)


def store_probe(
    store,
    label: str,
    *,
    sites: str = "resid.*",
    where: str | None = None,
    task: str = "auto",
    by_sample: bool = True,
    test_size: float = 0.25,
    seed: int = 0,
    regularization: float = 1.0,
) -> pd.DataFrame:
    """`linear_probe` per site over a store's activations (the store's `sites` matching a glob).

    label: a column of the activations' rows (modality, seconds, token_id, item, frame, ...) or a
    label column of the manifest (a key of each sample's `extra`, e.g. "kind"); rows without a label
    (a NaN `seconds` on a text token) are left out. where: SQL over the rows (see
    omnilab.store.activations). by_sample: all tokens of one sample on one side of the split.
    Returns linear_probe's columns with `site`; `layer` is the site's layer number.
    """
    import fnmatch

    from ..store.activations import activations
    from ..store.activations import sites as stored_sites

    keys = [k for k in stored_sites(store) if fnmatch.fnmatchcase(k, sites)]
    if not keys:
        raise TraceError(
            f"store '{store}' has no activations matching {sites!r}; it has {stored_sites(store)}"
        )
    features, first, labels = {}, None, None
    for key in keys:
        acts = activations(store, key, where)
        rows = acts.rows
        if first is None:
            first = rows
            labels = _store_labels(store, rows, label)
            keep = ~pd.isna(labels).to_numpy()
        elif not rows[["sample_id", "component", "pos"]].equals(first[["sample_id", "component", "pos"]]):
            raise TraceError(f"site {key!r} holds other tokens than {keys[0]!r}; probe them apart (sites=)")
        values = acts.values()
        features[key] = values[np.flatnonzero(keep)] if not keep.all() else values
    layers = {i: features[k] for i, k in enumerate(keys)}
    groups = first["sample_id"].to_numpy()[keep] if by_sample else None
    result = linear_probe(
        layers,
        np.asarray(labels[keep].tolist()),
        task=task,
        groups=groups,
        test_size=test_size,
        seed=seed,
        regularization=regularization,
    )
    result.insert(0, "site", [keys[i] for i in result["layer"]])
    result["layer"] = [_layer_of(keys[i]) for i in result["layer"]]
    return result


def _store_labels(store, rows: pd.DataFrame, label: str) -> pd.Series:
    if label in rows.columns:
        return rows[label].reset_index(drop=True)
    from ..store.sql import query

    samples = query(store, "SELECT sample_id, extra FROM samples")
    values = {
        s: json.loads(e or "{}").get(label)
        for s, e in zip(samples["sample_id"], samples["extra"], strict=True)
    }
    if not any(v is not None for v in values.values()):
        raise TraceError(
            f"label {label!r} is neither a column of the activations' rows ({', '.join(rows.columns)}) nor a "
            "label column of the store's manifest; choose one of those"
        )
    return rows["sample_id"].map(values).reset_index(drop=True)


def _layer_of(key: str) -> int:
    tail = key.split(":")[0].rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _layers(features) -> dict[int, np.ndarray]:
    if isinstance(features, Mapping):
        if not features:
            raise TraceError("features is empty; pass {layer: array [tokens, width]}")
        return {int(k): _array(v) for k, v in features.items()}
    array = _array(features)
    if array.ndim == 3:
        return {i: array[i] for i in range(array.shape[0])}
    return {0: array}


def _array(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, possibly bfloat16
        value = value.detach().float().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise TraceError(f"features must be numeric arrays; got {type(value).__name__} ({error})") from None


def _task(task: str, labels: np.ndarray) -> str:
    if task not in TASKS:
        raise TraceError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if task != "auto":
        if task == "regress" and not np.issubdtype(labels.dtype, np.number):
            raise TraceError(f"task 'regress' needs numeric labels; got {labels.dtype}")
        return task
    numeric = np.issubdtype(labels.dtype, np.floating)
    return "regress" if numeric and len(np.unique(labels)) > 20 else "classify"


def _split(labels, task, groups, test_size, seed) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit, StratifiedShuffleSplit

    if not 0 < test_size < 1:
        raise TraceError(f"test_size must be a fraction in (0, 1); got {test_size!r}")
    index = np.arange(len(labels))
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != len(labels):
            raise TraceError(f"groups has {len(groups)} entries for {len(labels)} labels; pass one per token")
        if len(np.unique(groups)) < 2:
            raise TraceError("groups holds one group only; a held-out split needs two or more")
        splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
        return next(splitter.split(index, labels, groups))
    _, counts = np.unique(labels, return_counts=True)
    if task == "classify" and counts.min() >= 2:
        splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    else:
        splitter = ShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    return next(splitter.split(index, labels))


def _baseline(train: np.ndarray, test: np.ndarray, task: str) -> float:
    if task == "regress":
        return 0.0
    values, counts = np.unique(train, return_counts=True)
    return float(np.mean(test == values[np.argmax(counts)]))
