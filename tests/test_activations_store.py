"""A store's activations: collected per shard, read lazily joined to SQL over tokens, probed; at scale."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from omnilab.analysis.probes import store_probe
from omnilab.errors import OmnilabError, TraceError
from omnilab.store import activations, collect, read_manifest
from omnilab.store.activations import sites


@pytest.fixture(scope="module")
def store(tiny, data_dir, tmp_path_factory):
    """The bundled manifest collected with every thinker layer's residual stream, at batch 1 (the exact
    reference: batched values are within float16 rounding of these, tests/test_batch.py)."""
    root = tmp_path_factory.mktemp("acts") / "store"
    summary = collect(
        data_dir / "manifest.jsonl",
        root,
        model=tiny,
        capture=("positions", "resid.*"),
        batch_size=1,
        progress=False,
    )
    assert summary["errors"] == 0
    return root


def test_collect_writes_each_residual_site(store, data_dir):
    assert sites(store) == ["resid.0", "resid.1", "resid.2", "resid.3"]
    acts = activations(store, "resid.2")
    assert set(acts.rows["sample_id"]) == {s.sample_id for s in read_manifest(data_dir / "manifest.jsonl")}
    assert acts.values().shape == (len(acts.rows), 64) and acts.dtype == torch.float16


def test_store_values_are_the_traced_values(store, tiny, data_dir):
    sample = next(s for s in read_manifest(data_dir / "manifest.jsonl") if s.sample_id == "audio-only")
    with tiny.trace(sites="resid.1", dtype=torch.float16) as tr:  # a trace is in the model's dtype
        tiny.forward(sample.resolved(), use_audio_in_video=sample.use_audio_in_video)  # unless asked;
    traced = tr.trace.activations["resid.1"]  # the store records float16
    stored = activations(store, "resid.1", where="sample_id = 'audio-only'")
    assert list(stored.rows["pos"]) == list(traced.rows["pos"])
    assert list(stored.rows["modality"]) == list(traced.rows["modality"])
    assert torch.equal(stored.values(), traced.values)


def test_where_selects_tokens_by_sql(store):
    audio = activations(store, "resid.0", where="modality = 'audio' AND seconds < 1.0")
    assert len(audio) > 0 and set(audio.rows["modality"]) == {"audio"} and audio.rows["seconds"].max() < 1.0
    subquery = "sample_id IN (SELECT sample_id FROM samples WHERE image_items > 0)"
    with_images = activations(store, "resid.0", where=subquery)
    assert "image" in set(with_images.rows["modality"])
    batches = list(with_images.batches(100))
    assert sum(len(r) for r, _ in batches) == len(with_images)
    assert torch.equal(torch.cat([v for _, v in batches]), with_images.values())


def test_reader_errors_name_what_exists(store):
    with pytest.raises(TraceError, match="resid.0, resid.1"):
        activations(store, "mlp.0")
    with pytest.raises(TraceError, match="no_such_column"):
        activations(store, "resid.0", where="no_such_column = 1")


def test_unknown_site_in_capture_is_refused_before_any_sample(tiny, data_dir, tmp_path):
    with pytest.raises(OmnilabError, match="closest"):
        collect(
            data_dir / "manifest.jsonl", tmp_path / "s", model=tiny, capture=("resid.9x",), progress=False
        )


def test_probe_from_the_store_predicts_modality_and_a_manifest_label(store):
    modality = store_probe(store, "modality", where="component = 'thinker'")
    assert list(modality["site"]) == ["resid.0", "resid.1", "resid.2", "resid.3"]
    assert list(modality["layer"]) == [0, 1, 2, 3]
    assert (modality["metric"] == "accuracy").all() and (modality["test_score"] > modality["baseline"]).any()
    kind = store_probe(store, "kind", sites="resid.3")
    assert kind["n_classes"].iloc[0] >= 2 and 0 <= kind["test_score"].iloc[0] <= 1
    seconds = store_probe(store, "seconds", sites="resid.1", where="modality IN ('audio', 'video')")
    assert seconds["metric"].iloc[0] == "r2"


_BUILD = """
import sys, numpy as np, pyarrow as pa, torch
from pathlib import Path
from omnilab.store import layout
root = Path(sys.argv[1]); shards, rows, width = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
root.mkdir(parents=True, exist_ok=True)
layout.write_meta(root, layout.new_meta(model_id="synthetic", config_hash="0", capture=["resid.0"],
                                        generate=0, manifest="-"))
per_sample = 512
for shard in range(shards):
    ids = np.repeat([f"s{shard}-{i}" for i in range(rows // per_sample)], per_sample).astype(object)
    pos = np.tile(np.arange(per_sample, dtype=np.int32), rows // per_sample)
    modality = np.where(pos % 4 == 0, "audio", "text").astype(object)
    schema = layout.schema("tokens")
    columns = {"sample_id": ids, "component": np.full(rows, "thinker", object), "phase": np.full(rows, "prefill", object),
               "step": np.zeros(rows, np.int32), "pos": pos, "token_id": np.zeros(rows, np.int64),
               "text": np.full(rows, "", object), "modality": modality, "item": np.zeros(rows, np.int32),
               "t": pos.astype(np.int64), "h": pos.astype(np.int64), "w": pos.astype(np.int64),
               "seconds": pos / 25.0, "frame": np.zeros(rows, np.int32)}
    tokens = pa.table({f.name: pa.array(columns[f.name], f.type) for f in schema}, schema=schema)
    index = pa.table({"sample_id": pa.array(ids, pa.string()), "component": pa.array(columns["component"], pa.string()),
                      "phase": pa.array(columns["phase"], pa.string()), "step": columns["step"], "pos": pos,
                      "row": np.arange(rows, dtype=np.int64)})
    values = torch.full((rows, width), float(shard), dtype=torch.float16)
    layout.write_shard(root, {"tokens": tokens}, {"resid.0": (index, values)})
    del values, tokens, index
"""

_READ = """
import sys, json, torch
from omnilab.store.activations import activations, size_bytes
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")  # torch, transformers, duckdb, pandas imported: ~0.85 GiB of libraries here
acts = activations(sys.argv[1], "resid.0", where=None)
total, count = 0.0, 0
for rows, values in acts.batches(8192):
    total += float(values.float().sum()); count += len(values)
audio = activations(sys.argv[1], "resid.0", where="modality = 'audio' AND pos < 64").values()
print(json.dumps({"bytes": size_bytes(sys.argv[1], "resid.0"), "rows": count, "total": total,
                  "audio": list(audio.shape), "peak_rss": status("VmHWM"), "before": before}))
"""


def test_reading_one_site_of_a_gigabyte_store_stays_under_a_gigabyte_of_memory(tmp_path):
    root = tmp_path / "big"
    shards, rows, width = 4, 65_536, 2048  # 4 x 256 MiB of float16
    subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BUILD), str(root), str(shards), str(rows), str(width)],
        check=True,
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(_READ), str(root)],
            check=True,
            capture_output=True,
            text=True,
        )
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        assert figures["bytes"] >= 2**30
        assert figures["rows"] == shards * rows
        # every value is its shard's number: 0 + 1 + 2 + 3 per (row, column) of a shard
        assert figures["total"] == pytest.approx(rows * width * sum(range(shards)))
        assert figures["audio"] == [shards * (rows // 512) * 16, width]
        # What reading costs: the peak resident memory above the process's before the first read
        # (the interpreter with torch and transformers imported holds ~0.85 GiB before any read).
        added = figures["peak_rss"] - figures["before"]
        assert added < 2**30 and added < figures["bytes"] / 2, f"reading added {added / 2**20:.0f} MiB"
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert np.isfinite(figures["total"])
