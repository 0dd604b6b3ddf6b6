"""The trace store on disk: what it holds, how a shard is written whole or not at all.

    STORE/
      store.json                  what was collected: model id, config hash, omnilab version,
                                  schema and store versions, capture spec, generate, manifest
      shards/
        shard=000000/             one batch of samples, committed by a single directory rename
          samples.parquet         one row per sample that ran (see SAMPLES)
          errors.parquet          one row per sample that failed, with its reason (see ERRORS)
          tokens.parquet routing.parquet router_stats.parquet router_logits.parquet
          codes.parquet attention.parquet spans.parquet timings.parquet
                                  the Trace's tables, each row keyed by `sample_id`
          activations/            only when sites were captured (`--capture resid.*`), per site:
            resid.3.safetensors   `values` [rows, width] of every sample in the shard, one block
            resid.3.parquet       its index: sample_id, component, phase, step, pos, row (the
                                  row of `values`), which joins to `tokens` (omnilab.store.activations)
        shard=000001/ ...
      _tmp/                       the shard being written; removed by the next collect
      .lock                       held by the one collect that writes the store

Every shard holds every table (an empty one when nothing was captured), so a view of a table is a
union over shards. Parquet is zstd-compressed; columns and dtypes are the Trace schema's
(`omnilab.trace.COLUMNS`) with `sample_id` in front (and the token's `modality` at the end of
routing and router_stats). A shard folder appears under `shards/` only
after all its files are written and synced (it is built in `_tmp/` and renamed into place), so a
run killed at any moment leaves whole shards and, at most, a stray temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .._version import __version__
from ..errors import TraceError
from ..trace import ARROW_TYPES, COLUMNS, SCHEMA_VERSION
from ..trace import TABLES as TRACE_TABLES

log = logging.getLogger(__name__)

STORE_VERSION = 1
FORMAT = "omnilab-store"
META_FILE = "store.json"
SHARDS = "shards"
TMP = "_tmp"
LOCK = ".lock"
SHARD_PATTERN = re.compile(r"^shard=(\d{6,})$")


# One row per sample that ran. `conversation` and `extra` are JSON as written in the manifest
# (media paths as given there); `meta` is the Trace's metadata as JSON.
SAMPLES = {
    "line": "int32",
    "prompt_tokens": "int32",
    "generated_tokens": "int32",
    "text": "object",
    "audio_items": "int16",
    "image_items": "int16",
    "video_items": "int16",
    "use_audio_in_video": "bool",
    "seconds": "float64",
    "conversation": "object",
    "extra": "object",
    "meta": "object",
}
# One row per sample that failed: the exception's type and message.
ERRORS = {
    "line": "int32",
    "error": "object",
    "reason": "object",
    "seconds": "float64",
    "conversation": "object",
    "extra": "object",
}
# routing and router_stats also carry each token's modality (copied from `tokens` when written):
# the commonest question, load by modality, is then a group-by over one table instead of a join
# of ~400 routing rows per token (5-8x faster over 10 M rows). `tokens` stays the source of truth.
WITH_MODALITY = ("routing", "router_stats")
STORE_COLUMNS: dict[str, dict[str, str]] = {
    "samples": SAMPLES,
    "errors": ERRORS,
    **{
        name: {**columns, "modality": "object"} if name in WITH_MODALITY else columns
        for name, columns in COLUMNS.items()
    },
}
TABLES = ("samples", "errors", *TRACE_TABLES)
ACTIVATIONS = "activations"
# The index of one site's activations in a shard: row `row` of its values is this token's.
ACTIVATION_INDEX = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("component", pa.string()),
        pa.field("phase", pa.string()),
        pa.field("step", pa.int32()),
        pa.field("pos", pa.int32()),
        pa.field("row", pa.int64()),
    ]
)


def schema(table: str) -> pa.Schema:
    """The Arrow schema of a store table: `sample_id`, then the table's columns."""
    fields = [pa.field("sample_id", pa.string(), nullable=False)]
    fields += [pa.field(name, ARROW_TYPES[dtype]) for name, dtype in STORE_COLUMNS[table].items()]
    return pa.schema(fields, metadata={b"omnilab.schema_version": str(SCHEMA_VERSION).encode()})


def empty(table: str) -> pa.Table:
    return schema(table).empty_table()


# -- metadata ------------------------------------------------------------------------------------
def new_meta(*, model_id: str, config_hash: str, capture, generate: int, manifest: str) -> dict:
    """The contents of store.json for a new store."""
    return {
        "format": FORMAT,
        "store_version": STORE_VERSION,
        "schema_version": SCHEMA_VERSION,
        "omnilab_version": __version__,
        "model_id": model_id,
        "config_hash": config_hash,
        "capture": list(capture),
        "generate": int(generate),
        "manifest": manifest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tables": list(TABLES),
    }


def read_meta(root: Path) -> dict:
    """store.json of the store at `root`, checked; a TraceError names what is wrong and where."""
    path = root / META_FILE
    if not root.is_dir():
        raise TraceError(f"no trace store at '{root}': not a directory; write one with `omnilab collect`")
    if not path.is_file():
        raise TraceError(f"'{root}' is not an omnilab trace store: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TraceError(f"'{path}' is damaged: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TraceError(f'\'{path}\' is not omnilab trace store metadata (no "format": "{FORMAT}")')
    for key, expected in (("schema_version", SCHEMA_VERSION), ("store_version", STORE_VERSION)):
        if meta.get(key) != expected:
            raise TraceError(
                f"trace store '{root}' has {key.replace('_', ' ')} {meta.get(key)} ('{path}'); this omnilab "
                f"{__version__} reads version {expected}; collect it again or use the omnilab version that wrote it"
            )
    return meta


def write_meta(root: Path, meta: dict) -> None:
    _atomic_text(root / META_FILE, json.dumps(meta, indent=2))


# -- shards --------------------------------------------------------------------------------------
def shard_dirs(root: Path) -> list[Path]:
    """The committed shard folders of the store, in order."""
    folder = root / SHARDS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and SHARD_PATTERN.match(p.name))


def shard_files(root: Path, table: str) -> list[Path]:
    """The Parquet file of `table` in every committed shard; a shard without it is named as damaged."""
    files = []
    for shard in shard_dirs(root):
        path = shard / f"{table}.parquet"
        if not path.is_file():
            raise TraceError(
                f"shard '{shard}' is damaged: {path.name} is missing; delete the folder '{shard}' and run "
                "`omnilab collect` again to redo its samples"
            )
        files.append(path)
    return files


def sample_ids(path: Path) -> list[str]:
    """The sample ids in one shard table file (read from its `sample_id` column only)."""
    try:
        return pq.read_table(path, columns=["sample_id"]).column("sample_id").to_pylist()
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        shard = path.parent
        raise TraceError(
            f"'{path}' is damaged or not Parquet ({exc}); delete the folder '{shard}' and run "
            "`omnilab collect` again to redo its samples"
        ) from None


def done_ids(root: Path) -> dict[str, str]:
    """Every sample id already in the store (ran or failed) → the shard that holds it."""
    done: dict[str, str] = {}
    for table in ("samples", "errors"):
        for path in shard_files(root, table):
            for sample_id in sample_ids(path):
                done[sample_id] = path.parent.name
    return done


def clear_tmp(root: Path) -> None:
    """Remove what a killed run left half-written."""
    tmp = root / TMP
    if tmp.exists():
        shutil.rmtree(tmp)


def write_shard(root: Path, tables: dict[str, pa.Table], activations: dict | None = None) -> Path:
    """Write one shard (every store table; missing ones empty; `activations`: site key -> (index
    table, values [rows, width])) and commit it by renaming its folder.

    Only the one collect that holds the store's lock calls this, so the next number is free.
    """
    shards = root / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    existing = [int(SHARD_PATTERN.match(p.name).group(1)) for p in shard_dirs(root)]
    name = f"shard={(max(existing) + 1 if existing else 0):06d}"
    tmp = root / TMP / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for table in TABLES:
        data = tables.get(table)
        data = empty(table) if data is None else data.cast(schema(table))
        with open(tmp / f"{table}.parquet", "wb") as f:
            pq.write_table(data, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
    if activations:
        _write_activations(tmp / ACTIVATIONS, activations)
    _fsync_dir(tmp)
    final = shards / name
    os.rename(tmp, final)
    _fsync_dir(shards)
    return final


def _write_activations(folder: Path, activations: dict) -> None:
    from ..activations import file_name, write_site

    folder.mkdir()
    for key, (index, values) in activations.items():
        path = folder / file_name(key)
        write_site(path, values, meta={"site": key})
        with open(path.with_suffix(".parquet"), "wb") as f:
            pq.write_table(index.cast(ACTIVATION_INDEX), f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def activation_files(root: Path, key: str) -> list[tuple[Path, Path]]:
    """(index, values) files of site `key` in every committed shard that has them."""
    from ..activations import file_name

    out = []
    for shard in shard_dirs(root):
        values = shard / ACTIVATIONS / file_name(key)
        if values.is_file():
            out.append((values.with_suffix(".parquet"), values))
    return out


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's write lock (released by the OS if the process dies)."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): one writer is the user's promise
        yield
        return
    handle = open(root / LOCK, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TraceError(
                f"trace store '{root}' is being written by another `omnilab collect` (it holds {root / LOCK}); "
                "wait for it to finish or write to another --out"
            ) from None
        yield
    finally:
        handle.close()


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
