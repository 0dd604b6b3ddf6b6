"""The Trace: what one run of Qwen3-Omni did inside, as tidy tables.

Tables (read as pandas DataFrames or Arrow tables; the same columns in Parquet, readable without omnilab):

tokens        one row per token of each component's sequence
    component  str    "thinker" | "talker"
    phase      str    "prefill" | "decode"
    step       int32  decode step (0 for prefill tokens)
    pos        int32  index in the component's sequence (the key of every other table)
    token_id   int64  thinker: vocabulary id; talker: codec id of codebook 0 (-1 where the input is an embedding)
    text       str    the token's text piece (thinker), "" elsewhere
    modality   str    "text" | "audio" | "image" | "video" | "speech"
    item       int32  index of the media item of that modality (-1 for text)
    t, h, w    int64  the TM-RoPE position ids the model used (temporal, height, width)
    seconds    float  t / position_id_per_seconds for audio/image/video tokens, NaN for text
    frame      int32  audio: token index (13 per second); video: temporal grid index; speech: talker frame; -1 else
routing       one row per (token, layer, rank): component, layer, pos, phase, rank, expert, weight,
              modality (the token's, from `tokens`; filled from it when a table lacks it, so traces
              saved before the column existed load unchanged) (expert int16, weight float16 —
              ≤ 3 bytes per (token, layer, k) as stored)
router_stats  one row per (token, layer): component, layer, pos, phase, entropy (nats, of the full
              router softmax), topk_mass (softmax probability of the chosen k experts)
router_logits optional (capture "logits"): component, layer, pos, expert, logit (float16)
codes         one row per (frame, codebook): frame, codebook (0 talker, 1-15 code predictor), code
attention     optional, the chosen layers/heads: component, layer, head, query_pos, key_pos, weight
              (float16), reduction, key_end. reduction "row": the weight of key key_pos in the whole
              causal row of a chosen query; "top_k": one of the query's k strongest keys; "block": the
              query's attention mass on keys key_pos..key_end-1 (one modality run). Tables without
              reduction/key_end (older traces) are whole rows: "row" and key_pos + 1.
tower_attention optional: audio/vision tower attention maps of the chosen layers (capture "attention"
              with attention_layers={"audio_tower": [...], "vision_tower": [...]}): tower, layer,
              call (n-th tower forward in the run), window (the tower attends within windows),
              head, query, key (indices in that call's tower sequence: audio frames after the
              convolutions, vision patches before merging), weight
spans         contiguous runs of one modality in the thinker's sequence: component, modality, item, start, end (end exclusive)
timings       one row per stage: stage, seconds, calls (thinker_prefill, thinker_decode, talker_prefill,
              talker_decode, code_predictor, code2wav)

activations   optional (`lab.trace(sites=...)`): site key -> Activations, a tensor [rows, width] and its
              rows (component, phase, step, pos + the token's modality, item, seconds, frame,
              token_id, text); saved as one safetensors file per site under `activations/` (see
              omnilab.activations for the format and why), loaded lazily

`meta` holds model_id, config_hash, omnilab_version, schema_version, capture, random_weights,
num_experts/top_k per component, position_id_per_seconds, sample_rate and the reply text; a spoken
turn with use_audio_in_video adds talker_use_audio_in_video (False: the talker's positions do not
interleave) and `notes` saying so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TraceError

SCHEMA_VERSION = 1
TABLES = (
    "tokens",
    "routing",
    "router_stats",
    "router_logits",
    "codes",
    "attention",
    "tower_attention",
    "spans",
    "timings",
)
COMPONENTS = ("thinker", "talker")
PHASES = ("prefill", "decode")
MODALITIES = ("text", "audio", "image", "video", "speech")

# Column order and dtypes of every table (pandas dtypes); an empty table still has its columns.
COLUMNS: dict[str, dict[str, str]] = {
    "tokens": {
        "component": "object",
        "phase": "object",
        "step": "int32",
        "pos": "int32",
        "token_id": "int64",
        "text": "object",
        "modality": "object",
        "item": "int32",
        "t": "int64",
        "h": "int64",
        "w": "int64",
        "seconds": "float64",
        "frame": "int32",
    },
    "routing": {
        "component": "object",
        "layer": "int16",
        "pos": "int32",
        "phase": "object",
        "rank": "int8",
        "expert": "int16",
        "weight": "float16",
        "modality": "object",
    },
    "router_stats": {
        "component": "object",
        "layer": "int16",
        "pos": "int32",
        "phase": "object",
        "entropy": "float32",
        "topk_mass": "float32",
    },
    "router_logits": {
        "component": "object",
        "layer": "int16",
        "pos": "int32",
        "expert": "int16",
        "logit": "float16",
    },
    "codes": {"frame": "int32", "codebook": "int8", "code": "int32"},
    "attention": {
        "component": "object",
        "layer": "int16",
        "head": "int16",
        "query_pos": "int32",
        "key_pos": "int32",
        "weight": "float16",
        "reduction": "object",
        "key_end": "int32",
    },
    "tower_attention": {
        "tower": "object",
        "layer": "int16",
        "call": "int16",
        "window": "int32",
        "head": "int16",
        "query": "int32",
        "key": "int32",
        "weight": "float32",
    },
    "spans": {"component": "object", "modality": "object", "item": "int32", "start": "int32", "end": "int32"},
    "timings": {"stage": "object", "seconds": "float64", "calls": "int32"},
}


ARROW_TYPES = {
    "object": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float16": pa.float16(),
    "float32": pa.float32(),
    "float64": pa.float64(),
}
# The DataFrame view of a trace widens float16 (routing weights, router logits) to float32: pandas
# cannot display float16 without "overflow encountered in cast"; columns, Arrow and Parquet keep float16.
VIEW_DTYPES = {"float16": "float32"}
# A table as column arrays: one 1-D NumPy array per documented column, all of one length.
Columns = dict[str, np.ndarray]


def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of a trace table (its columns in order, strings as `string`)."""
    return pa.schema([pa.field(c, ARROW_TYPES[d]) for c, d in COLUMNS[table].items()])


def empty(table: str) -> pd.DataFrame:
    """An empty table with the right columns and dtypes."""
    return _frame({c: np.empty(0, dtype=d) for c, d in COLUMNS[table].items()})


def conform(table: str, frame: pd.DataFrame | None) -> pd.DataFrame:
    """`frame` with exactly the documented columns, in order, with their dtypes."""
    if frame is None or len(frame) == 0:
        return empty(table)
    return _frame(_conformed_columns(table, frame))


def _conformed_columns(table: str, frame: pd.DataFrame) -> Columns:
    """The documented columns of `frame` as fresh arrays in their dtypes."""
    if not isinstance(frame, pd.DataFrame):
        raise TraceError(
            f"table '{table}' must be a DataFrame or a dict of column arrays; got {type(frame).__name__}"
        )
    missing = [c for c in COLUMNS[table] if c not in frame.columns]
    if missing:
        raise TraceError(f"table '{table}' lacks columns {missing}")
    columns = {}
    for column, dtype in COLUMNS[table].items():
        values = frame[column]
        if dtype == "object":
            # Strings stay as they are (a C-level check); anything else (categories, numbers) becomes str.
            if len(values) and (
                values.dtype != object or pd.api.types.infer_dtype(values, skipna=False) != "string"
            ):
                values = values.astype(str)
            columns[column] = values.to_numpy(dtype=object).copy()
        else:
            columns[column] = values.to_numpy().astype(dtype, copy=True)
    return columns


def conform_columns(table: str, columns: Columns) -> Columns:
    """`columns` checked against the schema (names, one length) and cast to its dtypes, without copies
    where they already match. Strings must already be strings (the tracer's tables are)."""
    missing = [c for c in COLUMNS[table] if c not in columns]
    if missing:
        raise TraceError(f"table '{table}' lacks columns {missing}")
    out = {c: np.asarray(columns[c]).astype(d, copy=False) for c, d in COLUMNS[table].items()}
    lengths = {len(v) for v in out.values()}
    if len(lengths) > 1 or any(v.ndim != 1 for v in out.values()):
        shapes = {c: v.shape for c, v in out.items()}
        raise TraceError(f"table '{table}' has columns of different lengths or not 1-D: {shapes}")
    return out


def to_arrow(values: np.ndarray, type: pa.DataType) -> pa.Array:
    """One column to Arrow, NaN and None as null (as pandas means them)."""
    return pa.array(values, type, from_pandas=True)


def _frame(columns: Columns) -> pd.DataFrame:
    # Explicit object Series: pandas 3 would otherwise infer (and convert to) its str dtype.
    return pd.DataFrame(
        {c: pd.Series(v, dtype=object, copy=False) if v.dtype == object else v for c, v in columns.items()},
        copy=False,
    )


def token_modality(tokens: Columns, component: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The modality of the token at each (component, pos) in `tokens` (None where it has no row)."""
    out = np.full(len(pos), None, dtype=object)
    for name in pd.unique(tokens["component"]):
        mask = tokens["component"] == name
        known = tokens["pos"][mask]
        table = np.full(int(known.max()) + 2, None, dtype=object)  # the last slot: positions past the end
        table[known] = tokens["modality"][mask]
        rows = component == name
        out[rows] = table[np.clip(pos[rows], 0, len(table) - 1)]
    return out


def _with_modality(routing, tokens: Columns) -> Columns:
    """A routing table lacking `modality` (DataFrame or columns), conformed, its modality from `tokens`."""
    if isinstance(routing, pd.DataFrame):
        columns = _conformed_columns("routing", routing.assign(modality=""))
    else:
        columns = conform_columns("routing", {**routing, "modality": np.empty(len(routing["pos"]), object)})
    columns["modality"] = token_modality(tokens, columns["component"], columns["pos"])
    return columns


def _whole_rows(attention) -> Columns:
    """An attention table from before reductions (whole rows), conformed: reduction "row", key_end
    the key's next position."""
    if isinstance(attention, pd.DataFrame):
        attention = {c: attention[c].to_numpy() for c in attention.columns}
    key = np.asarray(attention["key_pos"])
    return conform_columns(
        "attention", {**attention, "reduction": np.full(len(key), "row", dtype=object), "key_end": key + 1}
    )


@dataclass(frozen=True, eq=False)
class Trace:
    """What one run did inside: tables (see the module docstring), the reply's audio, and metadata.

    `tables` maps each table name to its column arrays in the schema's dtypes (DataFrames or column
    dicts given to the constructor, `Trace.build` or `dataclasses.replace` are conformed; a missing
    table is empty). Read a table as a DataFrame (`trace.routing`, `trace.table("routing")`: built on
    first access, then kept; float16 columns widened to float32, see VIEW_DTYPES) or as Arrow (`trace.arrow("routing")`, with no pandas at all: the
    store and `save` write traces this way).
    """

    tables: dict = field(default_factory=dict)
    audio: np.ndarray | None = None
    sample_rate: int = 24_000
    meta: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)  # site key -> Activations (omnilab.activations)
    _frames: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.tables) - set(TABLES)
        if unknown:
            raise TraceError(f"unknown trace tables {sorted(unknown)}; the tables are {', '.join(TABLES)}")
        conformed = {}
        for name in TABLES:
            table = self.tables.get(name)
            if table is None or (isinstance(table, pd.DataFrame) and len(table) == 0):
                conformed[name] = {c: np.empty(0, dtype=d) for c, d in COLUMNS[name].items()}
            elif name == "attention" and "reduction" not in table:
                conformed[name] = _whole_rows(table)
            elif name == "routing" and "modality" not in table:
                conformed[name] = None  # its modality comes from the tokens, conformed below
            elif isinstance(table, dict):
                conformed[name] = conform_columns(name, table)
            else:
                conformed[name] = _conformed_columns(name, table)
        if conformed["routing"] is None:
            conformed["routing"] = _with_modality(self.tables["routing"], conformed["tokens"])
        object.__setattr__(self, "tables", conformed)

    @classmethod
    def build(
        cls, *, audio=None, sample_rate: int = 24_000, meta: dict | None = None, activations=None, **tables
    ) -> Trace:
        """A Trace of `tables` (DataFrames or dicts of column arrays, by table name; missing ones
        empty), its meta stamped with the schema version."""
        meta = {"schema_version": SCHEMA_VERSION, **(meta or {})}
        return cls(
            tables, audio=audio, sample_rate=sample_rate, meta=meta, activations=dict(activations or {})
        )

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise TraceError(f"unknown table {name!r}; the tables are {', '.join(TABLES)}")
        frame = self._frames.get(name)
        if frame is None:
            frame = self._frames[name] = _frame(
                {c: v.astype(VIEW_DTYPES[str(v.dtype)]) if str(v.dtype) in VIEW_DTYPES else v
                 for c, v in self.tables[name].items()}
            )  # fmt: skip
        return frame

    def columns(self, name: str) -> Columns:
        """Table `name` as column arrays in the schema's dtypes (no copy where it can be avoided)."""
        if name not in TABLES:
            raise TraceError(f"unknown table {name!r}; the tables are {', '.join(TABLES)}")
        return self.tables[name]

    def rows(self, name: str) -> int:
        """The number of rows of table `name` (without building its DataFrame)."""
        return len(next(iter(self.columns(name).values())))

    def arrow(self, name: str) -> pa.Table:
        """Table `name` as an Arrow table in `arrow_schema(name)`; NaN (a token's `seconds` outside media)
        becomes null, so SQL aggregates skip it."""
        columns = self.columns(name)
        schema = arrow_schema(name)
        arrays = [to_arrow(columns[f.name], f.type) for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)

    tokens = property(lambda self: self.table("tokens"), doc="one row per token of each component's sequence")
    routing = property(lambda self: self.table("routing"), doc="one row per (token, layer, rank)")
    router_stats = property(lambda self: self.table("router_stats"), doc="one row per (token, layer)")
    router_logits = property(
        lambda self: self.table("router_logits"), doc="full router logits (capture 'logits')"
    )
    codes = property(lambda self: self.table("codes"), doc="one row per (speech frame, codebook)")
    attention = property(
        lambda self: self.table("attention"), doc="thinker/talker attention of chosen layers"
    )
    tower_attention = property(lambda self: self.table("tower_attention"), doc="audio/vision tower attention")
    spans = property(lambda self: self.table("spans"), doc="contiguous runs of one modality and item")
    timings = property(lambda self: self.table("timings"), doc="seconds and calls per stage")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={self.rows(name)}" for name in TABLES if self.rows(name))
        return f"Trace({sizes or 'empty'}; model={self.meta.get('model_id', '?')!r})"

    @property
    def text(self) -> str:
        return self.meta.get("text", "")

    def routing_with_tokens(self) -> pd.DataFrame:
        """The routing table (with each token's modality) joined with its text, token id and item."""
        keys = self.tokens[["component", "pos", "text", "token_id", "item"]].drop_duplicates(
            ["component", "pos"], keep="last"
        )
        return self.routing.merge(keys, on=["component", "pos"], how="left")

    # -- persistence --------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write one Parquet file (zstd) per table, audio.npy and meta.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in TABLES:
            _atomic_parquet(self.arrow(name), directory / f"{name}.parquet")
        if self.audio is not None:
            tmp = directory / "audio.npy.tmp"
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(self.audio, dtype=np.float32))
            os.replace(tmp, directory / "audio.npy")
        elif (directory / "audio.npy").exists():
            (directory / "audio.npy").unlink()
        meta = {**self.meta, "schema_version": SCHEMA_VERSION, "sample_rate": self.sample_rate}
        listing = _save_activations(self.activations, directory / "activations")
        if listing:
            meta["activations"] = listing
        else:
            meta.pop("activations", None)
        tmp = directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=_json_default))
        os.replace(tmp, directory / "meta.json")
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Trace:
        """Read a trace saved by `save`; a missing, truncated or foreign file gets a TraceError naming it."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not directory.is_dir():
            raise TraceError(f"no trace at '{directory}': not a directory")
        if not meta_path.is_file():
            raise TraceError(f"'{directory}' is not an omnilab trace: meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TraceError(f"'{meta_path}' is damaged: not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or "schema_version" not in meta:
            raise TraceError(f"'{meta_path}' is not omnilab trace metadata (no schema_version)")
        if meta["schema_version"] != SCHEMA_VERSION:
            raise TraceError(
                f"trace '{directory}' has schema version {meta['schema_version']}; this omnilab reads "
                f"version {SCHEMA_VERSION}; re-record it or use the omnilab version that wrote it"
            )
        tables = {}
        for name in TABLES:
            path = directory / f"{name}.parquet"
            if not path.is_file():
                raise TraceError(f"trace '{directory}' is incomplete: {path.name} is missing")
            try:
                frame = pq.read_table(path).to_pandas()
            except (pa.ArrowInvalid, OSError) as exc:
                raise TraceError(f"'{path}' is damaged or not Parquet: {exc}") from None
            tables[name] = frame
        audio_path = directory / "audio.npy"
        audio = None
        if audio_path.is_file():
            try:
                audio = np.load(audio_path, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise TraceError(f"'{audio_path}' is damaged: {exc}") from None
        sample_rate = int(meta.get("sample_rate", 24_000))
        trace = cls.build(**tables, audio=audio, sample_rate=sample_rate, meta=meta)
        trace.activations.update(_load_activations(meta.get("activations") or {}, directory, trace))
        return trace


def _save_activations(activations: dict, folder: Path) -> dict:
    """Write each site's values and row keys as safetensors in `folder`; the listing for meta.json."""
    from .activations import file_name, write_site

    values = {key: acts.values for key, acts in activations.items()}  # a loaded trace may read them here
    if folder.exists():
        for old in folder.glob("*.safetensors"):
            old.unlink()
    listing = {}
    for key, acts in activations.items():
        folder.mkdir(parents=True, exist_ok=True)
        write_site(folder / file_name(key), values[key], acts.rows, {"site": key, "name": acts.name})
        listing[key] = {"file": file_name(key), "name": acts.name, "shape": list(acts.values.shape)}
    return listing


def _load_activations(listing: dict, directory: Path, trace: Trace) -> dict:
    """Activations of a saved trace: rows now (joined to its tokens), values on first access."""
    from .activations import Activations, activation_rows, read_site

    out = {}
    tokens = trace.columns("tokens")
    for key, entry in listing.items():
        path = directory / "activations" / entry["file"]
        if not path.is_file():
            raise TraceError(f"trace '{directory}' is incomplete: activations/{entry['file']} is missing")
        _, keys = read_site(path, values=False)
        out[key] = Activations(
            key, entry["name"], activation_rows(keys, tokens), lambda p=path: read_site(p)[0]
        )
    return out


def _atomic_parquet(table: pa.Table, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)
