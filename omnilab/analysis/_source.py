"""Where analyses read their inputs: one trace's tables, or a trace store's rows.

An analysis of one trace accepts an omnilab `Trace`, a plain `dict` of DataFrames keyed by table name
(`{"routing": ..., "tokens": ..., "meta": {...}}`), or any object with those attributes. Routing
analyses also take a trace store (its folder, or the connection `open_store` gives), of which
`routing_tables` has DuckDB read only the rows asked for (`omnilab.store.read_source`) and
`layer_chunks` plans reading a large one a few layers at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import TraceError
from ..trace import COMPONENTS, empty

ROUTING_TABLES = ("routing", "tokens", "router_stats", "router_logits")  # what a routing analysis reads


def store_of(source):
    """`source` if it is a trace store (a folder with a store.json, or the DuckDB connection
    `open_store` gives), else None. A path that is not a store is refused: it holds no tables."""
    if isinstance(source, (str, os.PathLike)):
        if (Path(source) / "store.json").is_file():
            return source
        raise TraceError(
            f"'{source}' is not a trace store (it has no store.json); an analysis takes a Trace, a dict "
            "of tables, or a store made by `omnilab collect` (a saved trace loads with omnilab.Trace.load)"
        )
    return source if "duckdb" in type(source).__module__ else None


def routing_tables(source, *, component=None, layer=None, phase=None) -> dict:
    """The routing tables (ROUTING_TABLES) and meta of `source` as DataFrames and a dict: of a store only
    the rows asked for, read by DuckDB; of a trace, dict or object its whole tables."""
    store = store_of(source)
    if store is not None:
        from ..store.sql import read_source

        return read_source(store, tables=ROUTING_TABLES, component=component, layer=layer, phase=phase)
    return {**{name: table(source, name) for name in ROUTING_TABLES}, "meta": meta(source)}


# Routing rows a per-layer analysis reads from a store at once (~14 bytes each while read, ~4 as dense
# arrays): a store larger than this is analysed a few consecutive layers at a time.
STORE_CHUNK_ROWS = 20_000_000


def layer_chunks(
    source, *, component=None, layer=None, overlap: int = 0
) -> list[tuple[str, list[int], list[int]]]:
    """(component, layers, next layers) to read together from a store: consecutive recorded layers of
    one component with at most STORE_CHUNK_ROWS routing rows (one layer at least), in component and
    layer order, and the `overlap` recorded layers after them (for analyses of layer pairs). [] when
    `source` is not a store."""
    store = store_of(source)
    if store is None:
        return []
    from ..store.sql import routing_layers

    counts = routing_layers(store, component=component, layer=layer)
    chunks = []
    order = sorted(set(counts["component"]), key=lambda c: (COMPONENTS.index(c) if c in COMPONENTS else 9, c))
    for name in order:
        rows = counts[counts["component"] == name]
        layers, sizes = rows["layer"].astype(int).tolist(), rows["rows"].astype(int).tolist()
        start = 0
        while start < len(layers):
            end, total = start + 1, sizes[start]
            while end < len(layers) and total + sizes[end] <= STORE_CHUNK_ROWS:
                total += sizes[end]
                end += 1
            chunks.append((name, layers[start:end], layers[end : end + overlap]))
            start = end
    return chunks


def _refuse_store(source, name: str) -> None:
    if store_of(source) is not None:
        raise TraceError(
            f"this analysis reads one trace's '{name}', and a trace store holds many; pass one sample's "
            "trace (omnilab.store.load_trace(store, sample_id)). Routing analyses take the store itself."
        )


def table(source, name: str) -> pd.DataFrame:
    """Table `name` of `source` (a Trace, a dict of tables, or an object with table attributes)."""
    _refuse_store(source, name)
    if isinstance(source, Mapping):
        frame = source.get(name)
    else:
        frame = getattr(source, name, None)
    if frame is None:
        return empty(name)
    if isinstance(frame, pd.DataFrame):
        return frame
    raise TraceError(
        f"table '{name}' is a {type(frame).__name__}, not a DataFrame; pass a pandas DataFrame (a pyarrow "
        "Table's .to_pandas(), a DuckDB relation's .df()), or the trace store itself"
    )


def meta(source) -> dict:
    """The source's metadata dict (empty when it has none)."""
    _refuse_store(source, "meta")
    value = source.get("meta") if isinstance(source, Mapping) else getattr(source, "meta", None)
    return dict(value) if isinstance(value, Mapping) else {}


def labels(codes: np.ndarray, categories) -> pd.Categorical:
    """A categorical column from integer codes (-1 gives a missing value)."""
    return pd.Categorical.from_codes(np.asarray(codes, dtype=np.int64), categories=list(categories))


def equals(values: pd.Series, value) -> np.ndarray:
    """values == value as a bool array (numpy's comparison for object columns: pandas' is slower)."""
    if values.dtype == object:
        return values.to_numpy() == value
    return (values == value).to_numpy(dtype=bool)


def as_list(value) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)
