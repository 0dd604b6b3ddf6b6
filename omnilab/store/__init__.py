"""The trace store: collect traces over a dataset into Parquet shards, query them with DuckDB.

    omnilab.store.collect("data/manifest.jsonl", "runs/demo", model="tiny")
    con = omnilab.open_store("runs/demo")          # a DuckDB connection, a view per table
    omnilab.store.query("runs/demo", "SELECT count(*) FROM routing")
    omnilab.store.expert_load_sql("runs/demo")     # computed in DuckDB, not in memory
    omnilab.store.activations("runs/demo", "resid.3", where="modality = 'audio'")  # read lazily

The layout on disk is described in `omnilab.store.layout`; manifests in `omnilab.store.manifest`.
"""

from __future__ import annotations

from .activations import activations
from .collect import collect
from .layout import TABLES
from .manifest import Sample, read_manifest
from .sample import run_sample
from .sql import expert_load_sql, load_trace, open_store, query, read_source, read_table, verify_store

__all__ = [
    "TABLES",
    "activations",
    "Sample",
    "collect",
    "expert_load_sql",
    "load_trace",
    "open_store",
    "query",
    "read_manifest",
    "read_source",
    "read_table",
    "run_sample",
    "verify_store",
]
