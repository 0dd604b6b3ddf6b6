"""Activations as a value: one site's tensor [rows, width] and its rows, joinable to the tokens table.

    acts = trace.activations["resid.3"]
    acts.values          # torch.Tensor [rows, width] on the host (float16/bfloat16 unless asked)
    acts.rows            # DataFrame: component, phase, step, pos, then the token's modality, item,
                         # seconds, frame, token_id, text (from trace.tokens; row i describes values[i])

On disk (a saved trace's `activations/`, a store shard's `activations/`) each site is one
safetensors file holding `values` [rows, width] and its row keys (`component`, `phase` as small
codes, `step`, `pos`), the codes named in the file's metadata. Why safetensors and not Arrow
fixed-size lists in Parquet: bfloat16 is kept as it was recorded (Arrow, Parquet and DuckDB have no
bfloat16, and DuckDB no float16); the tensor is one contiguous block after a JSON header, so a reader
takes any rows by offset without decoding pages (a store's reader streams a selection in batches,
never the store); and torch, numpy and jax read it without omnilab. The SQL side stays where DuckDB
is strong: a store keeps a small Parquet index per site (sample_id, component, pos, row) that joins
to `tokens` (see omnilab.store.activations).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import TraceError

COMPONENT_CODES = ("thinker", "talker", "code_predictor")
PHASE_CODES = ("prefill", "decode")
KEY_COLUMNS = ("component", "phase", "step", "pos")
TOKEN_COLUMNS = ("modality", "item", "seconds", "frame", "token_id", "text")
# safetensors dtype names of the tensors we write
_DTYPES = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "F64": np.float64}


@dataclass(frozen=True, eq=False)
class Activations:
    """One site's recorded tensor [rows, width] (`values`, loaded on first access when saved) and
    `rows` (a DataFrame of KEY_COLUMNS and the tokens' TOKEN_COLUMNS, one row per tensor row)."""

    site: str  # the key in trace.activations: an alias ("resid.3"), ":input" for a module's input
    name: str  # the module path
    rows: pd.DataFrame
    source: torch.Tensor | Callable[[], torch.Tensor]
    _cache: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def values(self) -> torch.Tensor:
        """The tensor [rows, width] (read from disk on first access for a loaded trace)."""
        if "values" not in self._cache:
            self._cache["values"] = self.source if isinstance(self.source, torch.Tensor) else self.source()
        return self._cache["values"]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Activations({self.site!r}, rows={len(self.rows)})"


def activation_rows(keys: dict, tokens: dict) -> pd.DataFrame:
    """Row keys (component, phase, step, pos arrays) with each token's TOKEN_COLUMNS from `tokens`
    (the tokens table's columns); rows without a token (the code predictor's) get speech / -1 / NaN."""
    n = len(keys["pos"])
    out = {c: np.asarray(keys[c]) for c in KEY_COLUMNS}
    defaults = {"modality": "speech", "item": -1, "seconds": np.nan, "frame": -1, "token_id": -1, "text": ""}
    where = np.full(n, -1, dtype=np.int64)  # the tokens row of each activation row, -1 for none
    for component in pd.unique(np.asarray(tokens["component"])):
        mask = np.asarray(tokens["component"]) == component
        pos = np.asarray(tokens["pos"])[mask].astype(np.int64)
        table = np.full(int(pos.max()) + 2, -1, dtype=np.int64)  # the last slot: positions past the end
        table[pos] = np.flatnonzero(mask)
        rows = out["component"] == component
        where[rows] = table[np.clip(out["pos"][rows].astype(np.int64), 0, len(table) - 1)]
    found = where >= 0
    for column in TOKEN_COLUMNS:
        source = np.asarray(tokens[column])
        values = np.full(n, defaults[column], dtype=source.dtype if len(source) else object)
        values[found] = source[where[found]]
        out[column] = values
    if n and (out["component"] == "code_predictor").any():
        mask = out["component"] == "code_predictor"
        out["frame"][mask] = out["step"][mask]  # it completes the frame whose codebook 0 that step chose
    frame = pd.DataFrame(out)
    return frame.astype({"step": "int32", "pos": "int32"})


def key_tensors(rows: pd.DataFrame) -> dict[str, torch.Tensor]:
    """The row keys of `rows` as small tensors (component and phase as codes of COMPONENT_CODES, PHASE_CODES)."""
    return {
        "component": torch.tensor(pd.Categorical(rows["component"], COMPONENT_CODES).codes.astype(np.int8)),
        "phase": torch.tensor(pd.Categorical(rows["phase"], PHASE_CODES).codes.astype(np.int8)),
        "step": torch.tensor(rows["step"].to_numpy(np.int32)),
        "pos": torch.tensor(rows["pos"].to_numpy(np.int32)),
    }


def keys_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """KEY_COLUMNS from the tensors `key_tensors` wrote."""
    return {
        "component": np.asarray(COMPONENT_CODES, dtype=object)[tensors["component"].numpy()],
        "phase": np.asarray(PHASE_CODES, dtype=object)[tensors["phase"].numpy()],
        "step": tensors["step"].numpy(),
        "pos": tensors["pos"].numpy(),
    }


def write_site(
    path: Path, values: torch.Tensor, rows: pd.DataFrame | None = None, meta: dict | None = None
) -> None:
    """Write one site's values (and its row keys, when given) as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors = {"values": values.contiguous()}
    if rows is not None:
        tensors.update(key_tensors(rows))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)


def read_site(path: Path, *, values: bool = True) -> tuple[torch.Tensor | None, dict[str, np.ndarray] | None]:
    """Values (None with values=False: only the small keys are read) and row keys (None when the
    file has none) of a file `write_site` wrote."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            keys = keys_from_tensors({k: f.get_tensor(k) for k in KEY_COLUMNS}) if "pos" in names else None
            tensor = f.get_tensor("values") if values else None
    except (SafetensorError, OSError) as exc:
        raise TraceError(f"'{path}' is damaged or not safetensors: {exc}") from None
    return tensor, keys


@dataclass(frozen=True)
class ValuesLayout:
    """Where the `values` tensor lies in a safetensors file: offset (bytes), shape, dtype, torch dtype."""

    offset: int
    rows: int
    width: int
    numpy_dtype: np.dtype
    torch_dtype: torch.dtype


def values_layout(path: Path) -> ValuesLayout:
    """The layout of `values` in a safetensors file, from its header only (nothing else is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    entry = header["values"]
    dtype = entry["dtype"]
    if dtype not in _DTYPES:
        raise TraceError(f"'{path}' holds values of dtype {dtype}; omnilab reads {', '.join(_DTYPES)}")
    rows, width = entry["shape"]
    torch_dtype = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[
        dtype
    ]
    return ValuesLayout(
        8 + size + entry["data_offsets"][0], rows, width, np.dtype(_DTYPES[dtype]), torch_dtype
    )


def read_rows(path: Path, rows: np.ndarray, layout: ValuesLayout | None = None) -> torch.Tensor:
    """Rows `rows` (sorted ascending) of a site file's values, read run by run with positioned reads
    (no memory map: what is resident is what was asked for)."""
    layout = layout or values_layout(path)
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), layout.width), dtype=layout.numpy_dtype)
    row_bytes = layout.width * layout.numpy_dtype.itemsize
    if len(rows):
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(rows)]])
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            view = memoryview(out.reshape(-1).view(np.uint8))
            for s, e in zip(starts, ends, strict=True):
                want = (e - s) * row_bytes
                got = os.preadv(
                    fd, [view[s * row_bytes : e * row_bytes]], layout.offset + int(rows[s]) * row_bytes
                )
                if got != want:
                    raise TraceError(f"'{path}' is truncated: rows {rows[s]}..{rows[e - 1]} lie past its end")
    tensor = torch.from_numpy(out)
    return tensor.view(torch.bfloat16) if layout.torch_dtype == torch.bfloat16 else tensor


def file_name(key: str) -> str:
    """The file name of a site key (":" is not allowed in every file system)."""
    return key.replace(":", "@") + ".safetensors"
