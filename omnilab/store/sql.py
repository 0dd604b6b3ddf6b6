"""A trace store in DuckDB: one view per table, SQL, and analyses that never load the whole store.

    con = omnilab.open_store("runs/demo")
    con.sql("SELECT modality, count(*) FROM tokens GROUP BY ALL").df()
    omnilab.store.query("runs/demo", "SELECT * FROM errors")
    omnilab.store.expert_load_sql("runs/demo", component="thinker")

Every view is a union of its table over the store's committed shards, with the shard number as the
column `shard`. Views are a snapshot of the shards present when the store is opened.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from numbers import Integral
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import TraceError
from ..trace import ARROW_TYPES, COLUMNS, SCHEMA_VERSION, Trace
from ..trace import TABLES as TRACE_TABLES
from . import layout

# Statement types `query` runs: it reads, it never writes.
_READ_ONLY = {"SELECT", "EXPLAIN"}
_DUCK_TYPES = {
    pa.string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT",
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float16(): "FLOAT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
}


def open_store(store: str | os.PathLike) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection (in memory) with one view per store table over the store's Parquet shards.

    Tables: samples, errors, tokens, routing, router_stats, router_logits, codes, attention, spans,
    timings (columns: `sample_id`, the table's columns, `shard`). A store of another schema version,
    or a shard that lacks a table's file, raises a TraceError naming the file.
    """
    if isinstance(store, duckdb.DuckDBPyConnection):
        return store
    root = Path(store)
    layout.read_meta(root)
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")  # the library does not print
    for table in layout.TABLES:
        con.execute(_view_sql(table, layout.shard_files(root, table)))
    return con


def query(store, sql: str) -> pd.DataFrame:
    """The result of one read-only SQL statement (SELECT, WITH … SELECT, DESCRIBE, EXPLAIN) over a store.

    Bad SQL, or a damaged shard met while reading, raises a TraceError carrying DuckDB's message.
    """
    con = open_store(store)
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None
    if len(statements) != 1:
        raise TraceError(f"omnilab query runs one SQL statement at a time; got {len(statements)}")
    kind = statements[0].type.name
    if kind not in _READ_ONLY:
        raise TraceError(
            f"omnilab query opens the store read-only, so it runs SELECT statements only (got {kind}); "
            "use omnilab.open_store(...) in Python to compute or export elsewhere"
        )
    try:
        return con.execute(sql).df()
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None


def read_table(
    store, table: str, *, sample_id: str | None = None, shard: int | None = None, columns=None
) -> pd.DataFrame:
    """Table `table` of a store as a DataFrame (all samples, or one): `sample_id` and the Trace's columns.

    `columns` picks others (the store's extra `modality` of routing, `shard`); `shard` reads one
    shard's files only.
    """
    if table not in layout.TABLES:
        raise TraceError(f"unknown store table {table!r}; the tables are {', '.join(layout.TABLES)}")
    con = open_store(store)
    default = COLUMNS[table] if table in COLUMNS else layout.STORE_COLUMNS[table]
    names = ["sample_id", *default] if columns is None else list(columns)
    select = ", ".join(_quote(c) for c in names)
    sql = f"SELECT {select} FROM {table}"
    where, params = [], []
    if shard is not None:
        where.append("shard = ?")
        params.append(int(shard))
    if sample_id is not None:
        where.append("sample_id = ?")
        params.append(str(sample_id))
    if where:
        sql += " WHERE " + " AND ".join(where)
    try:
        return con.execute(sql, params).df()
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None


def load_trace(store, sample_id: str) -> Trace:
    """The Trace of one sample, read back from the store (its tables and metadata; no audio)."""
    con = open_store(store)
    samples = read_table(con, "samples", sample_id=sample_id, columns=["shard", "meta"])
    if len(samples) == 0:
        failed = read_table(con, "errors", sample_id=sample_id, columns=["error", "reason"])
        if len(failed):
            raise TraceError(f"sample {sample_id!r} failed when it was collected: {failed['reason'].iloc[0]}")
        raise TraceError(f"no sample {sample_id!r} in the store")
    if len(samples) > 1:
        raise TraceError(f"sample {sample_id!r} is in the store {len(samples)} times; the store is damaged")
    tables = {
        name: read_table(con, name, sample_id=sample_id).drop(columns="sample_id") for name in TRACE_TABLES
    }
    meta = json.loads(samples["meta"].iloc[0] or "{}")
    return Trace.build(meta=meta, **tables)


def expert_load_sql(
    store,
    *,
    component=None,
    layer=None,
    phase=None,
    sample_ids=None,
    by=("component", "layer", "modality"),
) -> pd.DataFrame:
    """Expert load, computed in DuckDB over the store (or the samples `sample_ids`): how often each expert is chosen.

    Rows: the `by` columns (any of component, layer, modality, phase), expert, count (routing
    slots — token × rank — that chose the expert), share (count / all slots of the group), and
    weight (the mean router weight the expert got when chosen). Only experts chosen at least once
    appear. A token's modality is the one `tokens` gives it (stored beside each routing row).
    With by=("component", "layer") count and share are `omnilab.analysis.expert_load`'s; with the
    default, share is `modality_specialization`'s coverage (the expert's part of the modality's slots).
    component, layer, phase and sample_ids each take one value or a list.
    """
    allowed = ("component", "layer", "modality", "phase")
    by = (by,) if isinstance(by, str) else tuple(by)
    if not set(by) <= set(allowed):
        raise TraceError(f"expert_load_sql groups by {', '.join(allowed)}; got {list(by)}")
    con = open_store(store)
    where, params = _where(_filters(component=component, layer=layer, phase=phase, sample_id=sample_ids))
    groups = ", ".join(by)
    sql = f"""
        WITH load AS (
            SELECT {groups + "," if groups else ""} expert, count(*) AS count, avg(weight) AS weight
            FROM routing{where}
            GROUP BY ALL
        )
        SELECT {groups + "," if groups else ""} expert, count,
               count / sum(count) OVER ({"PARTITION BY " + groups if groups else ""}) AS share, weight
        FROM load
        ORDER BY {groups + "," if groups else ""} expert
    """
    try:
        frame = con.execute(sql, params).df()
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None
    return frame.astype({"expert": "int16", "count": "int64", "share": "float64", "weight": "float64"})


# The tables a routing analysis reads, and the columns read as dictionaries (pandas categoricals):
# a store repeats a few strings (ids, component, phase, modality, token texts) over millions of rows.
SOURCE_TABLES = ("routing", "tokens", "router_stats")
_CATEGORICAL = {"sample_id", "component", "phase", "modality", "text", "tower", "stage"}


def read_source(
    store,
    *,
    sample_ids=None,
    tables=SOURCE_TABLES,
    component=None,
    layer=None,
    phase=None,
    batch_rows: int = 1 << 20,
) -> dict:
    """Tables of a store as the analyses take them: a dict of DataFrames, each with `sample_id` (which
    keeps samples apart), and `meta` (the first sample's). Every analysis also takes the store itself
    (`analysis.expert_load("runs/store")`), which reads through this.

    DuckDB selects the rows (`sample_ids`, `component`, `layer`, `phase`: one value or a list each,
    applied to the tables that have that column) and streams them in Arrow batches of `batch_rows`;
    strings arrive as categoricals and weights as float16, so 10 M routing rows take ~15 bytes each
    in memory, never a Python string per row.
    """
    con = open_store(store)
    filters = _filters(sample_id=sample_ids, component=component, layer=layer, phase=phase)
    source = {}
    for table in tables:
        if table not in TRACE_TABLES:
            raise TraceError(f"unknown trace table {table!r}; the tables are {', '.join(TRACE_TABLES)}")
        columns = {"sample_id": "object", **COLUMNS[table]}
        where, params = _where({c: v for c, v in filters.items() if c in columns})
        sql = f"SELECT {', '.join(_quote(c) for c in columns)} FROM {table}{where}"
        source[table] = _stream_frame(con, sql, params, columns, batch_rows, store)
    where, params = _where({c: v for c, v in filters.items() if c == "sample_id"})
    try:  # fetchall, not fetchone: that would leave the result open on a connection the caller may share
        first = con.execute(f"SELECT meta FROM samples{where} LIMIT 1", params).fetchall()
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None
    source["meta"] = json.loads(first[0][0]) if first and first[0][0] else {}
    return source


def routing_layers(store, *, component=None, layer=None) -> pd.DataFrame:
    """Routing rows per (component, layer) of a store, counted in DuckDB: component, layer, rows."""
    con = open_store(store)
    where, params = _where(_filters(component=component, layer=layer))
    sql = f"SELECT component, layer, count(*) AS rows FROM routing{where} GROUP BY ALL ORDER BY component, layer"
    try:
        return con.execute(sql, params).df()
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None


def _stream_frame(con, sql: str, params: list, columns: dict, batch_rows: int, store) -> pd.DataFrame:
    """The rows of `sql` as a DataFrame in `columns`' dtypes (strings as categoricals), batch by batch."""
    schema = pa.schema(
        pa.field(c, pa.dictionary(pa.int32(), pa.string()) if c in _CATEGORICAL else ARROW_TYPES[d])
        for c, d in columns.items()
    )
    try:
        reader = con.sql(sql, params=params).to_arrow_reader(batch_rows)
        batches = [batch.cast(schema) for batch in reader]
    except duckdb.Error as exc:
        raise TraceError(_message(exc, store)) from None
    table = pa.Table.from_batches(batches, schema=schema)
    del batches
    return table.to_pandas(split_blocks=True, self_destruct=True)


def _filters(**values) -> dict[str, list]:
    """Row filters by column, each a list (layer numbers as ints, the rest as strings); None is no filter."""
    filters = {c: _listed(v) for c, v in values.items() if v is not None}
    if "layer" in filters:
        if not all(isinstance(v, Integral) and not isinstance(v, bool) for v in filters["layer"]):
            raise TraceError(f"layer must be a layer number or a list of them; got {values['layer']!r}")
        filters["layer"] = [int(v) for v in filters["layer"]]
    return {c: v if c == "layer" else [str(x) for x in v] for c, v in filters.items()}


def _where(filters: dict[str, list]) -> tuple[str, list]:
    """A WHERE clause (with its leading space; "" for no filters) and its parameters."""
    if not filters:
        return "", []
    return " WHERE " + " AND ".join(f"list_contains(?, {_quote(c)})" for c in filters), list(filters.values())


def _listed(value) -> list:
    """One value or many (a list, tuple, set, array) as a list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def verify_store(store: str | os.PathLike) -> dict:
    """Read every shard file's footer and every sample id; a damaged or foreign file raises, named.

    Returns counts: shards, samples, errors, and rows per table.
    """
    root = Path(store)
    layout.read_meta(root)
    rows = {}
    for table in layout.TABLES:
        rows[table] = 0
        for path in layout.shard_files(root, table):
            try:
                metadata = pq.read_metadata(path)
                version = (pq.read_schema(path).metadata or {}).get(b"omnilab.schema_version")
            except (pa.ArrowInvalid, OSError) as exc:
                raise TraceError(
                    f"'{path}' is damaged or not Parquet ({exc}); delete the folder '{path.parent}' and run "
                    "`omnilab collect` again to redo its samples"
                ) from None
            if version is not None and version.decode() != str(SCHEMA_VERSION):
                raise TraceError(
                    f"'{path}' has schema version {version.decode()}; this omnilab reads {SCHEMA_VERSION}"
                )
            rows[table] += metadata.num_rows
    seen: dict[str, str] = {}
    for table in ("samples", "errors"):
        for path in layout.shard_files(root, table):
            for sample_id in layout.sample_ids(path):
                if sample_id in seen:
                    raise TraceError(f"sample {sample_id!r} is in '{seen[sample_id]}' and in '{path}'")
                seen[sample_id] = str(path)
    return {
        "shards": len(layout.shard_dirs(root)),
        "samples": rows["samples"],
        "errors": rows["errors"],
        "rows": rows,
    }


def _view_sql(table: str, files: list[Path]) -> str:
    if not files:
        schema = layout.schema(table)
        columns = ", ".join(f"NULL::{_DUCK_TYPES[f.type]} AS {_quote(f.name)}" for f in schema)
        return f"CREATE VIEW {table} AS SELECT {columns}, NULL::INTEGER AS shard WHERE false"
    listing = ", ".join(_literal(str(p)) for p in files)
    return (
        f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{listing}], hive_partitioning = true, "
        "hive_types = {'shard': 'INTEGER'})"
    )


def _message(exc: duckdb.Error, store) -> str:
    text = str(exc).strip()
    match = re.search(r"'([^']*shard=\d+[^']*\.parquet)'", text)
    if match:
        shard = Path(match.group(1)).parent
        return (
            f"{text}\nthe shard '{shard}' is damaged; delete that folder and run `omnilab collect` again "
            "to redo its samples"
        )
    if isinstance(store, (str, os.PathLike)):
        return f"{text}\n(the store's tables: {', '.join(layout.TABLES)})"
    return text


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
