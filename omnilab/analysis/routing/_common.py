"""What the routing analyses share: building their tables, the per-layer store chunking, small counts."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from ...trace import COMPONENTS, MODALITIES, PHASES
from .._source import labels, layer_chunks
from .data import ComponentRouting, RoutingData

CATEGORIES = {"component": list(COMPONENTS), "modality": list(MODALITIES), "phase": list(PHASES)}


def component_column(name: str, n: int) -> pd.Categorical:
    categories = list(COMPONENTS) if name in COMPONENTS else [*COMPONENTS, name]
    return labels(np.full(n, categories.index(name)), categories)


def tidy_table(pieces: list[dict], columns: list[str], categorical=("component",)) -> pd.DataFrame:
    """One DataFrame from per-component dicts of equal-length arrays (an empty one with `columns`)."""
    frames = [pd.DataFrame(p, columns=columns) for p in pieces if len(next(iter(p.values())))]
    if not frames:
        out = pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
        for c in categorical:
            if c in out:
                out[c] = pd.Categorical([], categories=CATEGORIES.get(c, []))
        return out
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


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
        chunks = layer_chunks(trace, component=component, layer=layer, overlap=overlap)
        if len(chunks) <= 1:
            return fn(trace, component=component, layer=layer, **options)
        parts = []
        for name, layers, after in chunks:
            part = fn(RoutingData.of(trace, component=name, layer=layers + after), **options)
            parts.append(part[part["layer"].isin(layers)] if after else part)
        return concat(parts)

    return wrapper


def concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames one after the other; a categorical column stays categorical (its categories united)."""
    out = pd.concat(frames, ignore_index=True)
    for column in frames[0].columns:
        if isinstance(frames[0][column].dtype, pd.CategoricalDtype) and out[column].dtype == object:
            categories = pd.unique(pd.concat([f[column].cat.categories.to_series() for f in frames]))
            out[column] = pd.Categorical(out[column], categories=categories)
    return out


def layer_column(part: ComponentRouting, layer_index: np.ndarray) -> np.ndarray:
    return part.layers[layer_index].astype(np.int16)


def safe_divide(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, np.asarray(a, dtype=np.float64) / np.where(b > 0, b, 1), np.nan)


def assignment_counts(part: ComponentRouting, group: np.ndarray | None = None, groups: int = 1) -> np.ndarray:
    """[L, groups, E] assignments of each layer by token group (`group` [N] codes < groups; None: one)
    and expert."""
    experts = part.num_experts
    base = 0 if group is None else group.astype(np.intp)[:, None] * experts
    counts = np.zeros((len(part.layers), groups, experts), dtype=np.int64)
    for li in range(len(part.layers)):
        codes = base + part.experts[li].astype(np.intp)
        codes = codes if part.complete else codes[part.experts[li] >= 0]
        counts[li] = np.bincount(codes.ravel(), minlength=groups * experts).reshape(groups, experts)
    return counts


def layer_counts(part: ComponentRouting) -> np.ndarray:
    """[L, E] assignments per expert (cached)."""
    return part.cached("layer_counts", lambda: assignment_counts(part)[:, 0])
