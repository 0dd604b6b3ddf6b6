"""The trace store: collect over a manifest, query in DuckDB, resume after a kill, the Ray engine.

Model-backed tests use the tiny preset (random weights, seed 0) and prefill-only collection; the
store's own rules (atomic shards, versions, read-only SQL) are checked on synthetic traces.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from omnilab.errors import ConversationError, OmnilabError, TraceError
from omnilab.store import (
    collect,
    expert_load_sql,
    layout,
    load_trace,
    open_store,
    query,
    read_manifest,
    read_source,
    read_table,
    verify_store,
)
from omnilab.store.collect import trace_tables
from omnilab.trace import TABLES as TRACE_TABLES
from omnilab.trace import Trace

DATA = Path(__file__).resolve().parent.parent / "data"
MANIFEST = DATA / "manifest.jsonl"
REPO = DATA.parent


# -- helpers -----------------------------------------------------------------------------------------
def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def text_rows(n: int, prefix: str = "t") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i:03d}",
            "conversation": [{"role": "user", "content": f"Sentence number {i}: count to {i}."}],
        }
        for i in range(n)
    ]


def bundled_rows(ids: list[str]) -> list[dict]:
    """Lines of the bundled manifest, with media paths made absolute (so they can move elsewhere)."""
    samples = {s.sample_id: s for s in read_manifest(MANIFEST)}
    return [
        {
            "id": i,
            "conversation": samples[i].resolved(),
            "use_audio_in_video": samples[i].use_audio_in_video,
            **samples[i].extra,
        }
        for i in ids
    ]


def traced_prefill(lab, conversation, use_audio_in_video=False) -> Trace:
    """The in-memory reference: one traced thinker forward over the prompt, as the brief defines it."""
    inputs = lab.prepare(conversation, use_audio_in_video=use_audio_in_video)
    with lab.trace(capture=("routing", "positions", "codes")) as tracer, torch.inference_mode():
        lab.model.thinker(**inputs, use_audio_in_video=use_audio_in_video)
    return tracer.trace


def keyed(traces: dict[str, Trace]) -> dict:
    """Many traces as one analysis source: each table with the sample's id in front."""
    out = {}
    for name in ("routing", "tokens", "router_stats"):
        frames = [t.table(name).assign(sample_id=sid) for sid, t in traces.items()]
        out[name] = pd.concat(frames, ignore_index=True)
    out["meta"] = next(iter(traces.values())).meta
    return out


def store_rows(store, table: str) -> pd.DataFrame:
    """A table's rows, in a canonical order, without the columns that say when or where they were written."""
    frame = read_table(store, table).drop(columns=["seconds", "meta"], errors="ignore")
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def synthetic_trace(seed: int, tokens: int = 6, layers: int = 2, experts: int = 8, k: int = 2) -> Trace:
    rng = np.random.default_rng(seed)
    modality = np.array(["text", "audio", "image"])[rng.integers(0, 3, tokens)]
    token_frame = pd.DataFrame(
        {
            "component": "thinker",
            "phase": "prefill",
            "step": 0,
            "pos": np.arange(tokens),
            "token_id": 100,
            "text": "x",
            "modality": modality,
            "item": -1,
            "t": np.arange(tokens),
            "h": 0,
            "w": 0,
            "seconds": np.nan,
            "frame": -1,
        }
    )
    rows = [
        ("thinker", layer, pos, "prefill", rank, int(e), 1.0 / k)
        for layer in range(layers)
        for pos in range(tokens)
        for rank, e in enumerate(rng.choice(experts, k, replace=False))
    ]
    routing = pd.DataFrame(rows, columns=["component", "layer", "pos", "phase", "rank", "expert", "weight"])
    return Trace.build(tokens=token_frame, routing=routing, meta={"model_id": "synthetic"})


def synthetic_store(root: Path, traces: dict[str, Trace], per_shard: int = 2) -> Path:
    """A store written straight from traces, `per_shard` samples a shard (no model, no manifest)."""
    root.mkdir(parents=True)
    meta = layout.new_meta(
        model_id="synthetic", config_hash="0", capture=["routing"], generate=0, manifest="-"
    )
    layout.write_meta(root, meta)
    items = list(traces.items())
    for start in range(0, len(items), per_shard):
        chunk = items[start : start + per_shard]
        tables = {}
        for name in TRACE_TABLES:
            parts = [trace_tables(sid, t)[name] for sid, t in chunk if name in trace_tables(sid, t)]
            if parts:
                tables[name] = pa.concat_tables(parts)
        samples = [{"sample_id": sid, "line": 0, "meta": json.dumps(t.meta)} for sid, t in chunk]
        tables["samples"] = pa.Table.from_pylist(samples, schema=layout.schema("samples"))
        layout.write_shard(root, tables)
    return root


# Code a collect process runs first to stop itself at a chosen point: it writes `marker` and waits
# there for ever, so a test kills it exactly there (no sleeps, no racing the run).
_PAUSE = """
import pathlib, threading
def pause():
    pathlib.Path({marker!r}).write_text("paused")
    threading.Event().wait()
"""
# ... in the middle of writing a shard: the n-th Parquet file written is left half written
_PAUSE_IN_WRITE = """
import pyarrow.parquet as real_pq
from omnilab.store import layout
calls = [0]
class Parquet:
    def __getattr__(self, name):
        return getattr(real_pq, name)
    def write_table(self, data, where, **options):
        calls[0] += 1
        if calls[0] == {n}:
            where.write(b"PAR1 half a file")
            where.flush()
            pause()
        return real_pq.write_table(data, where, **options)
layout.pq = Parquet()
"""
# ... in the middle of the n-th forward of the thinker (its batch run, not yet in any shard)
_PAUSE_IN_FORWARD = """
import omnilab
lab = omnilab.load("tiny")
calls = [0]
def count(module, args, kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        pause()
lab.thinker.register_forward_pre_hook(count, with_kwargs=True)
"""


def run_collect_process(
    manifest: Path, out: Path, *, pause: tuple[str, int, Path] | None = None, **options
) -> subprocess.Popen:
    """`collect` in its own process; `pause`: ("write" | "forward", n, marker file) stops it there."""
    code, model = "", ""
    if pause is not None:
        where, n, marker = pause
        code = _PAUSE.format(marker=str(marker))
        code += (_PAUSE_IN_WRITE if where == "write" else _PAUSE_IN_FORWARD).format(n=n)
        model = ", model=lab" if where == "forward" else ""
    code = textwrap.dedent(code) + textwrap.dedent(f"""
        from omnilab.store import collect
        collect({str(manifest)!r}, {str(out)!r}, progress=False{model}, **{options!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: what it starts (a local Ray) can be killed with it
    )


def committed(out: Path) -> int:
    return len(layout.shard_dirs(out))


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bundled(tmp_path_factory, tiny):
    """The bundled manifest collected once with the session's tiny model (small shards: several of them),
    one sample a forward: the exact reference (batched rows are checked against it in test_batch)."""
    out = tmp_path_factory.mktemp("stores") / "bundled"
    summary = collect(MANIFEST, out, model=tiny, shard_samples=8, batch_size=1, progress=False)
    return out, summary


@pytest.fixture(scope="session")
def memory_traces(tiny):
    """The same samples traced in memory, one by one, without the store."""
    return {
        s.sample_id: traced_prefill(tiny, s.resolved(), s.use_audio_in_video) for s in read_manifest(MANIFEST)
    }


@pytest.fixture()
def small_store(tmp_path):
    traces = {f"s{i}": synthetic_trace(i) for i in range(5)}
    return synthetic_store(tmp_path / "store", traces), traces


# -- the bundled manifest ----------------------------------------------------------------------------------
def test_bundled_manifest_mixes_every_modality_and_audio_in_video():
    samples = read_manifest(MANIFEST)
    assert len(samples) >= 20
    kinds = {k for s in samples for k, n in s.media_counts().items() if n}
    assert kinds == {"audio", "image", "video"}
    assert any(s.use_audio_in_video for s in samples)
    assert any(not any(s.media_counts().values()) for s in samples)  # text only
    for s in samples:  # every media path resolves to a real file next to the manifest
        for message in s.resolved():
            for item in message["content"] if isinstance(message["content"], list) else []:
                if item["type"] != "text":
                    assert Path(item[item["type"]]).is_file()


def test_collect_over_bundled_manifest_stores_every_sample_once(bundled):
    out, summary = bundled
    ids = [s.sample_id for s in read_manifest(MANIFEST)]
    assert summary["done"] == len(ids) and summary["errors"] == 0 and summary["skipped"] == 0
    assert summary["shards"] == -(-len(ids) // 8)
    samples = query(out, "SELECT sample_id, count(*) AS n FROM samples GROUP BY ALL")
    assert sorted(samples["sample_id"]) == sorted(ids) and (samples["n"] == 1).all()
    meta = json.loads((out / "store.json").read_text())
    assert meta["model_id"] == "omnilab/tiny" and meta["capture"] == ["codes", "positions", "routing"]
    assert meta["schema_version"] == 1 and meta["omnilab_version"] and len(meta["config_hash"]) == 16


def test_store_rows_equal_the_in_memory_traces(bundled, memory_traces):
    out, _ = bundled
    con = open_store(out)
    for sample_id, trace in memory_traces.items():
        stored = load_trace(con, sample_id)
        for name in ("tokens", "routing", "router_stats", "spans"):
            pd.testing.assert_frame_equal(stored.table(name), trace.table(name), obj=f"{sample_id}.{name}")


def test_seconds_outside_media_are_null_so_sql_averages_skip_them(bundled, memory_traces):
    out, _ = bundled
    counts = query(
        out,
        "SELECT modality = 'text' AS text, count(seconds) AS timed, count(*) AS n, avg(seconds) AS mean "
        "FROM tokens WHERE component = 'thinker' GROUP BY ALL ORDER BY text",
    )
    media, text = counts.iloc[0], counts.iloc[1]
    assert text["timed"] == 0 and text["n"] > 0
    assert media["timed"] == media["n"] and np.isfinite(media["mean"])
    tokens = pd.concat([t.tokens[t.tokens["component"] == "thinker"] for t in memory_traces.values()])
    assert media["mean"] == pytest.approx(tokens["seconds"].mean())


def test_expert_load_in_duckdb_equals_the_in_memory_analysis(bundled, memory_traces):
    from omnilab import analysis

    out, _ = bundled
    source = keyed(memory_traces)
    by_layer = expert_load_sql(out, by=("component", "layer"))
    reference = analysis.expert_load(source)
    reference = reference[reference["count"] > 0].astype({"component": str})
    pd.testing.assert_frame_equal(
        by_layer[["component", "layer", "expert", "count", "share"]].reset_index(drop=True),
        reference[["component", "layer", "expert", "count", "share"]].reset_index(drop=True),
        check_dtype=False,
    )
    by_modality = expert_load_sql(out)  # component × layer × modality
    specialization = analysis.modality_specialization(source)
    specialization = specialization[specialization["count"] > 0].astype({"component": str, "modality": str})
    merged = by_modality.merge(
        specialization,
        on=["component", "layer", "modality", "expert"],
        how="outer",
        suffixes=("", "_memory"),
        indicator=True,
    )
    assert (merged["_merge"] == "both").all()
    assert (merged["count"] == merged["count_memory"]).all()
    np.testing.assert_allclose(merged["share"], merged["coverage"], rtol=1e-12)
    # and a plain pandas group-by over the in-memory traces
    routing = source["routing"].drop(columns="modality")  # the tokens' modality is joined here
    joined = routing.merge(
        source["tokens"][["sample_id", "component", "pos", "modality"]],
        on=["sample_id", "component", "pos"],
        how="left",
    )
    counts = joined.groupby(["component", "layer", "modality", "expert"]).size()
    assert counts.sum() == by_modality["count"].sum() == len(source["routing"])


def test_routing_analyses_over_store_tables_equal_in_memory(bundled, memory_traces):
    from omnilab import analysis

    out, _ = bundled
    memory = keyed(memory_traces)
    stored = read_source(out)
    assert stored["meta"]["model_id"] == memory["meta"]["model_id"]
    for name, fn in analysis.ROUTING_ANALYSES.items():
        pd.testing.assert_frame_equal(fn(stored), fn(memory), obj=name, check_dtype=False)
    subset = ["audio-only", "image-two"]
    one = read_source(out, sample_ids=subset)
    assert set(one["routing"]["sample_id"]) == set(subset)
    pd.testing.assert_frame_equal(
        analysis.expert_load(one)[["component", "layer", "expert", "count"]]
        .query("count > 0")
        .reset_index(drop=True),
        expert_load_sql(out, sample_ids=subset, by=("component", "layer"))[
            ["component", "layer", "expert", "count"]
        ],
        check_dtype=False,
        check_categorical=False,
    )


def test_every_routing_analysis_takes_the_store_itself(bundled, memory_traces):
    from omnilab import analysis

    out, _ = bundled
    memory = keyed(memory_traces)
    con = open_store(out)
    for name, fn in analysis.ROUTING_ANALYSES.items():
        expected = fn(memory)
        pd.testing.assert_frame_equal(fn(out), expected, obj=f"{name}(folder)", check_dtype=False)
        pd.testing.assert_frame_equal(fn(con), expected, obj=f"{name}(connection)", check_dtype=False)
    suite = analysis.routing_suite(str(out), component="thinker", layer=[1])
    pd.testing.assert_frame_equal(
        suite["expert_load"], analysis.expert_load(memory, component="thinker", layer=1), check_dtype=False
    )


def test_a_store_larger_than_the_chunk_is_analysed_a_few_layers_at_a_time(
    bundled, memory_traces, monkeypatch
):
    from omnilab import analysis
    from omnilab.analysis import _source
    from omnilab.store import sql

    out, _ = bundled
    per_layer = sql.routing_layers(out)
    assert per_layer["rows"].nunique() == 1  # every layer routes every token
    monkeypatch.setattr(_source, "STORE_CHUNK_ROWS", int(per_layer["rows"].iloc[0] * 1.5))
    assert [layers for _, layers, _ in _source.layer_chunks(out)] == [[i] for i in per_layer["layer"]]
    largest = []
    read_source = sql.read_source

    def spy(*args, **kwargs):
        source = read_source(*args, **kwargs)
        largest.append(len(source.get("routing", ())))
        return source

    monkeypatch.setattr(sql, "read_source", spy)
    memory = keyed(memory_traces)
    expected = analysis.routing_suite(memory)
    for name, fn in analysis.ROUTING_ANALYSES.items():
        if name == "token_paths":  # as large as its input: read whole (see per_layer)
            continue
        largest.clear()
        pd.testing.assert_frame_equal(fn(out), expected[name], obj=name, check_dtype=False)
        # one layer at a time; two where the analysis pairs a layer with the next
        assert max(largest) <= per_layer["rows"].iloc[0] * (2 if name == "layer_transitions" else 1), name
    suite = analysis.routing_suite(out)
    for name, frame in expected.items():
        pd.testing.assert_frame_equal(suite[name], frame, obj=f"suite {name}", check_dtype=False)


def test_store_analyses_read_only_the_rows_asked_for_in_compact_columns(bundled, memory_traces):
    from omnilab import analysis

    out, _ = bundled
    source = read_source(out, component="thinker", layer=[0, 2], sample_ids=["audio-only", "all-media"])
    routing = source["routing"]
    assert set(routing["layer"]) == {0, 2} and set(routing["sample_id"]) == {"audio-only", "all-media"}
    expected = query(
        out,
        "SELECT count(*) AS n FROM routing WHERE layer IN (0, 2) AND sample_id IN ('audio-only', 'all-media')",
    )["n"].iloc[0]
    assert len(routing) == expected
    # expert_load_sql takes the same filters
    load = expert_load_sql(out, component="thinker", layer=[0, 2], sample_ids=["audio-only", "all-media"])
    assert set(load["layer"]) == {0, 2} and load["count"].sum() == expected
    for column in ("sample_id", "component", "phase"):
        assert isinstance(routing[column].dtype, pd.CategoricalDtype), column
    assert routing["weight"].dtype == np.float16 and routing["expert"].dtype == np.int16
    assert isinstance(source["tokens"]["text"].dtype, pd.CategoricalDtype)
    # prepare(store, phase=...) equals the same preparation in memory
    memory = keyed(memory_traces)
    pd.testing.assert_frame_equal(
        analysis.expert_load(analysis.prepare(out, phase="prefill", layer=[3])),
        analysis.expert_load(analysis.prepare(memory, phase="prefill", layer=[3])),
        check_dtype=False,
    )


def test_phase_chosen_in_duckdb_equals_the_phase_chosen_in_memory(tmp_path, tiny):
    from omnilab import analysis

    manifest = write_manifest(tmp_path / "m.jsonl", text_rows(2))
    out = tmp_path / "store"
    collect(manifest, out, model=tiny, capture=("routing", "positions"), generate=3, progress=False)
    plain = {name: read_table(out, name) for name in ("routing", "tokens", "router_stats")}
    assert set(plain["routing"]["phase"]) == {"prefill", "decode"}
    for phase in ("prefill", "decode"):
        for fn in (analysis.expert_load, analysis.router_confidence, analysis.repetition):
            pd.testing.assert_frame_equal(
                fn(analysis.prepare(out, phase=phase)),
                fn(analysis.prepare(plain, phase=phase)),
                obj=f"{fn.__name__}({phase})",
                check_dtype=False,
            )


def test_analyses_refuse_a_path_that_is_not_a_store_and_per_trace_ones_refuse_a_store(bundled, tmp_path):
    from omnilab import analysis

    out, _ = bundled
    with pytest.raises(TraceError, match=r"is not a trace store \(it has no store\.json\)"):
        analysis.expert_load(tmp_path)
    with pytest.raises(TraceError, match="is not a trace store"):
        analysis.modality_nmi(str(tmp_path / "missing"))
    with pytest.raises(TraceError, match=r"store holds many.*load_trace"):
        analysis.position_layout(out)
    with pytest.raises(TraceError, match=r"store holds many.*load_trace"):
        analysis.codebook_usage(open_store(out))
    with pytest.raises(TraceError, match="layer must be a layer number"):
        analysis.expert_load(out, layer="first")


def test_query_answers_sql_over_views_of_every_table(bundled):
    out, _ = bundled
    con = open_store(out)
    views = set(con.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").df()["view_name"])
    assert set(layout.TABLES) <= views
    frame = query(out, "SELECT modality, count(*) AS n FROM tokens GROUP BY ALL ORDER BY modality")
    assert set(frame["modality"]) == {"text", "audio", "image", "video"}
    assert query(out, "SELECT count(*) AS n FROM errors")["n"].iloc[0] == 0


def test_second_collect_skips_everything_already_there(bundled, tiny):
    out, _ = bundled
    summary = collect(MANIFEST, out, model=tiny, progress=False)
    assert summary["skipped"] == len(read_manifest(MANIFEST)) and summary["done"] == summary["shards"] == 0


# -- failures -----------------------------------------------------------------------------------------
def test_bad_samples_are_recorded_with_their_reason_and_the_run_goes_on(tmp_path, tiny):
    (tmp_path / "noise.wav").write_bytes(b"RIFF" + os.urandom(300))
    rows = [
        {"id": "ok", "conversation": [{"role": "user", "content": "Hello."}]},
        {
            "id": "missing",
            "conversation": [{"role": "user", "content": [{"type": "audio", "audio": "nowhere.wav"}]}],
        },
        {
            "id": "corrupt",
            "conversation": [{"role": "user", "content": [{"type": "audio", "audio": "noise.wav"}]}],
        },
        {"id": "long", "conversation": [{"role": "user", "content": "word " * 200}]},
        {"id": "bad-role", "conversation": [{"role": "robot", "content": "hi"}]},
    ]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "store"
    summary = collect(manifest, out, model=tiny, max_tokens=100, progress=False)
    assert (summary["done"], summary["errors"]) == (1, 4)
    errors = query(out, "SELECT sample_id, error, reason FROM errors ORDER BY sample_id").set_index(
        "sample_id"
    )
    assert errors.loc["missing", "error"] == "MediaError" and "nowhere.wav" in errors.loc["missing", "reason"]
    assert errors.loc["corrupt", "error"] == "MediaError"
    assert "too long" in errors.loc["long", "reason"] and "100" in errors.loc["long", "reason"]
    assert errors.loc["bad-role", "error"] == "ConversationError"
    assert list(query(out, "SELECT sample_id FROM samples")["sample_id"]) == ["ok"]
    again = collect(manifest, out, model=tiny, max_tokens=100, progress=False)
    assert again["skipped"] == 5 and again["errors"] == 0  # failures are not retried, nor written twice


def test_manifest_errors_name_the_line(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"id": "a", "conversation": "hi"}\n{"id": "b", \n')
    with pytest.raises(ConversationError, match=r"line 2 is not valid JSON"):
        read_manifest(bad_json)
    duplicate = write_manifest(
        tmp_path / "b.jsonl", [{"id": "x", "conversation": "a"}, {"id": "x", "conversation": "b"}]
    )
    with pytest.raises(ConversationError, match=r"line 2: id 'x' is already used on line 1"):
        read_manifest(duplicate)
    with pytest.raises(ConversationError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


def test_media_paths_are_relative_to_the_manifest_folder(tmp_path):
    folder = tmp_path / "deep" / "set"
    folder.mkdir(parents=True)
    manifest = write_manifest(
        folder / "m.jsonl",
        [
            {
                "id": 1,
                "conversation": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": "img/a.png"},
                            {"type": "audio", "audio": "/abs/b.wav"},
                        ],
                    }
                ],
                "label": "cat",
            },
        ],
    )
    (sample,) = read_manifest(manifest)
    content = sample.resolved()[0]["content"]
    assert content[0]["image"] == str(folder / "img" / "a.png") and content[1]["audio"] == "/abs/b.wav"
    assert sample.sample_id == "1" and sample.extra == {"label": "cat"}


def test_datasets_folder_without_datasets_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails, installed or not
    with pytest.raises(OmnilabError, match="datasets package is not installed"):
        read_manifest(tmp_path)


def test_datasets_folder_collects_the_same_rows_as_the_jsonl_manifest(tmp_path, bundled, tiny):
    import datasets

    ids = ["audio-only", "image-two", "video-with-audio", "text-greeting"]
    rows = bundled_rows(ids)
    # `conversation` as JSON text: one column type for every row, whatever its content
    flat = [{**row, "conversation": json.dumps(row["conversation"])} for row in rows]
    folder = tmp_path / "dataset"
    datasets.Dataset.from_list(flat).save_to_disk(str(folder))
    samples = read_manifest(folder)
    assert [s.sample_id for s in samples] == ids
    assert [s.resolved() for s in samples] == [row["conversation"] for row in rows]
    assert [s.use_audio_in_video for s in samples] == [row["use_audio_in_video"] for row in rows]
    out = tmp_path / "store"
    summary = collect(folder, out, model=tiny, batch_size=1, progress=False)  # as `bundled`: exact rows
    assert summary["done"] == len(ids) and summary["errors"] == 0
    bundled_out, _ = bundled
    for table in ("tokens", "routing", "router_stats"):
        mine = store_rows(out, table)
        theirs = store_rows(bundled_out, table)
        theirs = theirs[theirs["sample_id"].isin(ids)].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, theirs, obj=table)


def test_datasets_folder_with_native_nested_conversations_runs(tmp_path, tiny):
    """Arrow gives every content item every key of its column (None where absent): still a valid item."""
    import datasets

    rows = bundled_rows(["audio-image", "image-only"])
    folder = tmp_path / "nested"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    samples = read_manifest(folder)
    item = samples[0].conversation[0]["content"][0]
    assert item["type"] == "audio" and "image" in item and item["image"] is None  # what Arrow made of it
    summary = collect(folder, tmp_path / "store", model=tiny, progress=False)
    assert summary["done"] == 2 and summary["errors"] == 0
    reference = {s.sample_id: s for s in read_manifest(write_manifest(tmp_path / "m.jsonl", rows))}
    for sample in samples:
        a = lab_inputs(tiny, sample)
        b = lab_inputs(tiny, reference[sample.sample_id])
        assert torch.equal(a, b)


def lab_inputs(lab, sample):
    return lab.prepare(sample.resolved(), use_audio_in_video=sample.use_audio_in_video)["input_ids"]


def test_datasets_folder_of_splits_asks_for_one_split(tmp_path):
    import datasets

    rows = text_rows(2)
    flat = [{**row, "conversation": json.dumps(row["conversation"])} for row in rows]
    split = datasets.Dataset.from_list(flat)
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ConversationError, match="splits train, test"):
        read_manifest(tmp_path / "splits")
    (tmp_path / "other").mkdir()
    with pytest.raises(ConversationError, match="not a dataset saved with save_to_disk"):
        read_manifest(tmp_path / "other")


# -- store rules (synthetic traces) ----------------------------------------------------------------------
def test_synthetic_store_round_trips_each_trace(small_store):
    root, traces = small_store
    for sid, trace in traces.items():
        stored = load_trace(root, sid)
        pd.testing.assert_frame_equal(stored.routing, trace.routing)
        pd.testing.assert_frame_equal(stored.tokens, trace.tokens)
    assert verify_store(root)["samples"] == len(traces)
    assert sorted(p.name for p in (root / "shards" / "shard=000000").iterdir()) == sorted(
        f"{t}.parquet" for t in layout.TABLES
    )


def test_store_of_another_schema_version_is_refused_naming_the_file(small_store):
    root, _ = small_store
    meta = json.loads((root / "store.json").read_text())
    (root / "store.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(TraceError, match=r"schema version 99.*store\.json"):
        open_store(root)
    with pytest.raises(TraceError, match="store.json"):
        query(root, "SELECT 1")


def test_damaged_shard_is_named_in_the_error(small_store):
    root, _ = small_store
    damaged = root / "shards" / "shard=000001" / "routing.parquet"
    damaged.write_bytes(damaged.read_bytes()[:40])
    with pytest.raises(TraceError, match=r"shard=000001/routing\.parquet"):
        query(root, "SELECT count(*) FROM routing")
    with pytest.raises(TraceError, match=r"shard=000001/routing\.parquet"):
        verify_store(root)
    (root / "shards" / "shard=000002" / "samples.parquet").unlink()
    with pytest.raises(TraceError, match=r"shard=000002.*samples\.parquet is missing"):
        open_store(root)


def test_bad_sql_gives_duckdbs_message_and_the_cli_prints_it(small_store, capsys):
    from omnilab.cli import main

    root, _ = small_store
    with pytest.raises(TraceError, match=r'Referenced column "nope" not found'):
        query(root, "SELECT nope FROM routing")
    with pytest.raises(TraceError, match="syntax error"):
        query(root, "SELEC 1")
    assert main(["query", str(root), "SELECT nope FROM routing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omnilab: Binder Error") and "Traceback" not in err
    assert main(["query", str(root), "SELECT count(*) AS n FROM samples"]) == 0
    assert "5" in capsys.readouterr().out


def test_query_is_read_only(small_store, tmp_path):
    root, _ = small_store
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    target = root / "shards" / "stolen.csv"
    for sql in (f"COPY routing TO '{target}'", "CREATE TABLE t AS SELECT 1", "ATTACH 'x.db'"):
        with pytest.raises(TraceError, match="read-only"):
            query(root, sql)
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_cli_query_writes_the_whole_result_to_csv_parquet_or_jsonl(small_store, tmp_path, capsys):
    from omnilab.cli import main

    root, _ = small_store
    sql = "SELECT sample_id, layer, pos, rank, expert FROM routing ORDER BY ALL"
    expected = query(root, sql)
    for suffix, read in ((".csv", pd.read_csv), (".parquet", pd.read_parquet), (".jsonl", None)):
        out = tmp_path / f"result{suffix}"
        assert main(["query", str(root), sql, "--out", str(out)]) == 0
        assert f"wrote {len(expected)} rows" in capsys.readouterr().out
        frame = pd.read_json(out, lines=True) if read is None else read(out)
        pd.testing.assert_frame_equal(frame, expected, check_dtype=False)
    assert not list(tmp_path.glob("*.tmp"))
    for bad, message in (
        (tmp_path / "result.xlsx", "write a .csv, .parquet, .jsonl file"),
        (root / "inside.csv", "is inside the store"),
        (tmp_path / "missing" / "r.csv", "does not exist"),
    ):
        assert main(["query", str(root), sql, "--out", str(bad)]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_empty_store_has_typed_empty_views(tmp_path):
    root = synthetic_store(tmp_path / "empty", {})
    frame = query(root, "SELECT * FROM routing")
    assert len(frame) == 0 and list(frame.columns)[:3] == ["sample_id", "component", "layer"]


def test_half_written_shard_is_ignored_and_cleaned_on_resume(tmp_path, tiny):
    manifest = write_manifest(tmp_path / "m.jsonl", text_rows(3))
    out = tmp_path / "store"
    collect(manifest, out, model=tiny, shard_samples=1, progress=False, max_tokens=None)
    # what a kill in the middle of a shard leaves: a temporary folder with partial files
    stray = out / "_tmp" / "shard=000003"
    stray.mkdir(parents=True)
    (stray / "samples.parquet").write_bytes(b"PAR1 half")
    assert query(out, "SELECT count(*) AS n FROM samples")["n"].iloc[0] == 3  # readers never see it
    summary = collect(manifest, out, model=tiny, progress=False)
    assert summary["skipped"] == 3 and not stray.exists()


def test_resume_with_other_options_is_refused(tmp_path, tiny):
    manifest = write_manifest(tmp_path / "m.jsonl", text_rows(2))
    out = tmp_path / "store"
    collect(manifest, out, model=tiny, progress=False)
    with pytest.raises(TraceError, match="capture"):
        collect(manifest, out, model=tiny, capture=("routing",), progress=False)


def test_a_second_writer_is_refused_while_one_holds_the_store(tmp_path, tiny):
    manifest = write_manifest(tmp_path / "m.jsonl", text_rows(1))
    out = tmp_path / "store"
    with layout.writer_lock(out), pytest.raises(TraceError, match="another `omnilab collect`"):
        collect(manifest, out, model=tiny, progress=False)


def test_collect_refuses_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    manifest = write_manifest(tmp_path / "m.jsonl", text_rows(1))
    with pytest.raises(TraceError, match="not an omnilab trace store"):
        collect(manifest, tmp_path, progress=False)


# -- kill and resume ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_runs_resume_to_exactly_once(tmp_path):
    """SIGKILL collect half-way through writing a shard, in the middle of a batch's forward, and after
    two more shards; a last run finishes the rest. Each kill lands where the run stopped itself (or,
    for the shards, once they are committed): no sleeps, no racing the run."""
    rows = text_rows(24, "k")  # enough that each kill lands before the run is through
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "store"
    tables = len(layout.TABLES)  # Parquet files a shard writes
    kills = [  # (where the run stops itself, or None; the condition the kill waits for)
        (("write", tables + 3), None),  # the second shard's third table, half written
        (("forward", 2), None),  # the second batch's forward: the first one's shards are committed
        (None, lambda before: committed(out) >= before + 2),
    ]
    progress = []
    for i, (pause, ready) in enumerate(kills):
        before = committed(out) if out.exists() else 0
        marker = tmp_path / f"paused-{i}"
        where = (*pause, marker) if pause else None
        process = run_collect_process(manifest, out, pause=where, shard_samples=2)
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            if ready(before) if ready else marker.exists():
                break
            time.sleep(0.01)  # polling the condition, not timing the kill
        assert process.poll() is None, (
            "the collect ended before the kill: " + process.stderr.read().decode()[-2000:]
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
        if pause and pause[0] == "write":  # the kill found a half-written shard, which no query sees
            assert any(p.read_bytes() == b"PAR1 half a file" for p in (out / "_tmp").rglob("*.parquet"))
        ids = query(out, "SELECT sample_id FROM samples")["sample_id"]
        assert ids.is_unique  # never twice, even mid-way
        progress.append(len(ids))
    assert progress == sorted(progress) and progress[-1] < len(rows)  # each kill interrupted the work
    process = run_collect_process(manifest, out, shard_samples=2)
    assert process.wait(timeout=180) == 0, process.stderr.read().decode()[-2000:]
    samples = query(out, "SELECT sample_id, count(*) AS n FROM samples GROUP BY ALL")
    assert sorted(samples["sample_id"]) == [r["id"] for r in rows] and (samples["n"] == 1).all()
    duplicated = query(
        out, "SELECT sample_id, layer, pos, rank, count(*) AS n FROM routing GROUP BY ALL HAVING n > 1"
    )
    assert len(duplicated) == 0
    tokens = query(
        out, "SELECT sample_id, count(*)::INTEGER AS n FROM tokens GROUP BY ALL ORDER BY sample_id"
    )
    prompt = query(out, "SELECT sample_id, prompt_tokens AS n FROM samples ORDER BY sample_id")
    pd.testing.assert_frame_equal(tokens, prompt)  # each sample's rows are all there, once
    assert verify_store(out)["samples"] == len(rows)


# -- the Ray engine -----------------------------------------------------------------------------------
def run_ray_collect(manifest: Path, out: Path, *, kill_after_shards: int | None = None) -> int:
    """A Ray-engine collect in its own process, SIGKILLed once `kill_after_shards` shards are committed
    (None: run to the end). Retried when Ray itself fails to start (its raylet has a fixed 30 s start-up
    window a loaded machine can miss). Returns the process's exit code."""
    options = {"engine": "ray", "workers": 2, "shard_samples": 2}
    for _ in range(3):
        process = run_collect_process(manifest, out, **options)
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                if kill_after_shards is not None and out.exists() and committed(out) >= kill_after_shards:
                    process.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.01)
            code = process.wait(timeout=10)
            error = process.stderr.read().decode()
        finally:
            time.sleep(0.5)
            # A driver killed this way leaves Ray's own agents behind (a known Ray leak): end its group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        if "could not start or reach a local Ray instance" not in error:
            break
    assert code in (0, -signal.SIGKILL), error[-2000:]
    return code


@pytest.mark.slow
def test_killed_ray_run_resumes_to_exactly_once(tmp_path):
    """SIGKILL the driver of a Ray-engine collect after two shards; a second Ray run finishes the rest."""
    rows = text_rows(16, "r")
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    out = tmp_path / "store"
    assert run_ray_collect(manifest, out, kill_after_shards=2) == -signal.SIGKILL
    done = query(out, "SELECT sample_id FROM samples")["sample_id"]
    assert done.is_unique and 4 <= len(done) < len(rows)
    assert run_ray_collect(manifest, out) == 0
    samples = query(out, "SELECT sample_id, count(*) AS n FROM samples GROUP BY ALL")
    assert sorted(samples["sample_id"]) == [r["id"] for r in rows] and (samples["n"] == 1).all()
    assert verify_store(out)["samples"] == len(rows)


@pytest.fixture()
def local_ray():
    """A local Ray instance on this machine's 2 CPUs (started here, so collect uses it and leaves it up)."""
    import ray  # a dev dependency: missing, the test fails rather than skips

    for attempt in range(3):  # on a loaded machine the raylet can miss Ray's fixed 30 s start-up window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_engine_writes_the_same_store_as_the_local_engine(tmp_path, bundled, local_ray):
    local, _ = bundled
    ids = ["text-greeting", "audio-question", "image-two", "video-with-audio", "all-media", "multiturn-media"]
    manifest = write_manifest(tmp_path / "m.jsonl", bundled_rows(ids))
    out = tmp_path / "ray"
    summary = collect(
        manifest, out, model="tiny", engine="ray", workers=2, shard_samples=4, batch_size=1, progress=False
    )
    assert local_ray.is_initialized()  # an instance collect did not start is left running
    assert summary["done"] == len(ids) and summary["errors"] == 0
    assert (
        json.loads((out / "store.json").read_text())["config_hash"]
        == json.loads((local / "store.json").read_text())["config_hash"]
    )
    for table in ("tokens", "routing", "router_stats", "spans"):
        ray_rows = store_rows(out, table)
        local_rows = store_rows(local, table)
        local_rows = local_rows[local_rows["sample_id"].isin(ids)].reset_index(drop=True)
        pd.testing.assert_frame_equal(ray_rows, local_rows, obj=table)
    stored = store_rows(out, "samples").drop(columns=["conversation", "line"])
    expected = store_rows(local, "samples").drop(columns=["conversation", "line"])
    expected = expected[expected["sample_id"].isin(ids)].reset_index(drop=True)
    pd.testing.assert_frame_equal(stored, expected)
