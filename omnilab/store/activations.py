"""A store's activations: written per shard by `collect --capture resid.*`, read one site at a time.

    acts = omnilab.store.activations("runs/demo", "resid.3", where="modality = 'audio'")
    acts.rows                      # DataFrame: sample_id, component, phase, step, pos, the token's
                                   # columns (token_id, text, modality, item, t, h, w, seconds, frame),
                                   # shard, row — one per selected activation, in reading order
    acts.values()                  # torch.Tensor [len(rows), width]: the selection, read now
    for rows, values in acts.batches(16_384):   # the selection in batches (bounded memory)
        ...

`where` is any SQL condition over those columns (DuckDB; the store's views — samples, tokens, ... —
may appear in subqueries: `sample_id IN (SELECT sample_id FROM samples WHERE audio_items > 0)`). Only
the selection's keys are held in memory; values are read from each shard's safetensors file with
positioned reads of the selected rows, batch by batch (see omnilab.activations for the format), so
reading one site of a store far larger than memory holds one batch at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ..activations import read_rows, values_layout
from ..errors import TraceError
from . import layout

TOKEN_COLUMNS = ("token_id", "text", "modality", "item", "t", "h", "w", "seconds", "frame")


# -- writing (collect) ---------------------------------------------------------------------------
def sample_activations(sample_id: str, trace) -> dict:
    """site key -> (index table without `row`, values [rows, width]) of one traced sample."""
    out = {}
    for key, acts in trace.activations.items():
        rows = acts.rows
        n = len(rows)
        index = pa.table(
            {
                "sample_id": pa.repeat(pa.scalar(sample_id, pa.string()), n),
                "component": pa.array(rows["component"].to_numpy(object), pa.string()),
                "phase": pa.array(rows["phase"].to_numpy(object), pa.string()),
                "step": pa.array(rows["step"].to_numpy(np.int32)),
                "pos": pa.array(rows["pos"].to_numpy(np.int32)),
            }
        )
        out[key] = (index, acts.values)
    return out


def shard_activations(results) -> dict:
    """The activations of a shard's samples, site by site: (index with `row`, values concatenated)."""
    keys = dict.fromkeys(k for r in results for k in r.activations)
    out = {}
    for key in keys:
        parts = [r.activations[key] for r in results if key in r.activations]
        index = pa.concat_tables([p[0] for p in parts])
        index = index.append_column("row", pa.array(np.arange(index.num_rows, dtype=np.int64)))
        out[key] = (index, torch.cat([p[1] for p in parts]))
    return out


def check_sites(runner, capture) -> None:
    """Site patterns in `capture` name real sites of the runner's model (where it is loaded here)."""
    from ..instrument.record import resolve_requests
    from ..instrument.tracer import split_capture

    _, patterns = split_capture(capture)
    lab = getattr(runner, "lab", None)
    if patterns and lab is not None:
        resolve_requests(lab.model, patterns)


# -- reading -------------------------------------------------------------------------------------
def sites(store) -> list[str]:
    """The site keys that have activations in the store."""
    root = Path(store)
    keys = set()
    for shard in layout.shard_dirs(root):
        folder = shard / layout.ACTIVATIONS
        if folder.is_dir():
            keys.update(
                p.name[: -len(".safetensors")].replace("@", ":") for p in folder.glob("*.safetensors")
            )
    return sorted(keys)


@dataclass(frozen=True)
class StoreActivations:
    """One site's selected activations in a store: `rows` now, values when asked (see the module)."""

    site: str
    rows: pd.DataFrame
    files: dict  # shard -> the values file
    width: int
    dtype: torch.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, rows: int = 16_384) -> Iterator[tuple[pd.DataFrame, torch.Tensor]]:
        """(rows, values [n, width]) of at most `rows` rows at a time, in the order of `self.rows`."""
        layouts = {}
        shards = self.rows["shard"].to_numpy()
        index = self.rows["row"].to_numpy()
        for start in range(0, len(self.rows), rows):
            stop = min(start + rows, len(self.rows))
            parts = []
            for shard in pd.unique(shards[start:stop]):
                mask = shards[start:stop] == shard
                path = self.files[int(shard)]
                if shard not in layouts:
                    layouts[shard] = values_layout(path)
                parts.append(read_rows(path, index[start:stop][mask], layouts[shard]))
            yield self.rows.iloc[start:stop], torch.cat(parts) if len(parts) > 1 else parts[0]

    def values(self) -> torch.Tensor:
        """The whole selection as one tensor [len(rows), width] (memory: the selection's size)."""
        out = torch.empty((len(self.rows), self.width), dtype=self.dtype)
        offset = 0
        for _, values in self.batches():
            out[offset : offset + len(values)] = values
            offset += len(values)
        return out


def activations(store, site: str, where: str | None = None) -> StoreActivations:
    """Site `site`'s activations in `store` for the tokens `where` selects (all when None); lazily.

    site: a site key as captured ("resid.3", "audio_tower", "resid.0:input"; `sites(store)` lists
    them). where: an SQL condition over sample_id, component, phase, step, pos and the tokens
    table's columns. Rows come back in the order they lie on disk (shard, then row).
    """
    from .sql import _literal, open_store

    root = Path(store)
    files = layout.activation_files(root, site)
    if not files:
        have = sites(root)
        raise TraceError(
            f"store '{root}' has no activations of site {site!r}; it has "
            f"{', '.join(have) if have else 'none (collect with --capture resid.* or another site)'}"
        )
    con = open_store(root)
    listing = ", ".join(_literal(str(index)) for index, _ in files)
    con.execute(
        f"CREATE TEMP VIEW activation_index AS SELECT * FROM read_parquet([{listing}], "
        "hive_partitioning = true, hive_types = {'shard': 'INTEGER'})"
    )
    token_columns = ", ".join(f"t.{c}" for c in TOKEN_COLUMNS if c != "modality")
    sql = (
        "SELECT * FROM (SELECT a.sample_id, a.component, a.phase, a.step, a.pos, "
        f"{token_columns}, coalesce(t.modality, 'speech') AS modality, a.shard, a.row "
        "FROM activation_index a LEFT JOIN tokens t "
        "ON a.sample_id = t.sample_id AND a.component = t.component AND a.pos = t.pos)"
        + (f" WHERE {where}" if where else "")
        + " ORDER BY shard, row"
    )
    try:
        rows = con.execute(sql).df()
    except Exception as exc:
        raise TraceError(f"the selection {where!r} failed over site {site!r} of '{root}': {exc}") from None
    finally:
        con.close()
    by_shard = {int(p.parent.parent.name.split("=")[1]): values for _, values in files for p in [values]}
    first = values_layout(files[0][1])
    return StoreActivations(site, rows, by_shard, first.width, first.torch_dtype)


def size_bytes(store, site: str) -> int:
    """Bytes of site `site`'s values over the store's shards."""
    return sum(os.path.getsize(values) for _, values in layout.activation_files(Path(store), site))
