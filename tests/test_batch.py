"""Batched collection: many samples in one forward, each sample's rows as if it had run alone.

The reference is the same manifest collected at batch 1 (itself checked against in-memory traces
in test_store). Expert ids, token ids and TM-RoPE positions must match exactly; router weights
within float16 rounding (the stored dtype), entropy and top-k mass within float32 rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from omnilab.instrument.record.activations import default_dtype
from omnilab.instrument.sites import resolve_sites
from omnilab.store import batch as batching
from omnilab.store import collect, layout, query, read_manifest, read_table

DATA = Path(__file__).resolve().parent.parent / "data"
# Text of 14 and 93 tokens, audio, two images, video, audio in video, everything: 14 to 194 tokens.
MIXED = [
    "text-greeting",
    "text-long",
    "audio-only",
    "image-two",
    "video-question",
    "all-media",
    "multiturn-media",
    "video-with-audio",
    "all-media-audio-in-video",
]
EXACT = {
    "tokens": None,
    "spans": None,
    "routing": ["weight"],
    "router_stats": ["entropy", "topk_mass"],
}


def manifest_of(path: Path, ids: list[str], extra: list[dict] = ()) -> Path:
    samples = {s.sample_id: s for s in read_manifest(DATA / "manifest.jsonl")}
    rows = [
        {"id": i, "conversation": samples[i].resolved(), "use_audio_in_video": samples[i].use_audio_in_video}
        for i in ids
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, *extra]))
    return path


def rows(store: Path, table: str) -> pd.DataFrame:
    frame = read_table(store, table).drop(columns=["seconds", "meta"], errors="ignore")
    keys = [c for c in frame.columns if c not in (EXACT.get(table) or [])]
    return frame.sort_values(keys).reset_index(drop=True)


def assert_same_rows(batched: Path, alone: Path, ids: list[str] | None = None) -> None:
    """Every table of `batched` equals `alone`'s: exactly, floats within their stored rounding."""
    for table, floats in EXACT.items():
        got, want = rows(batched, table), rows(alone, table)
        if ids is not None:
            want = want[want["sample_id"].isin(ids)].reset_index(drop=True)
        exact = [c for c in want.columns if c not in (floats or [])]
        pd.testing.assert_frame_equal(got[exact], want[exact], obj=table)
        for column in floats or []:
            a, b = got[column].to_numpy(np.float64), want[column].to_numpy(np.float64)
            if column == "weight":  # float16: at most one unit in the last place apart
                np.testing.assert_array_less(
                    np.abs(a - b), np.spacing(np.abs(b).astype(np.float16)) * 1.01 + 1e-12
                )
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{table}.{column}")
    assert sorted(read_table(batched, "samples")["sample_id"]) == sorted(
        ids or read_table(alone, "samples")["sample_id"]
    )


class ForwardSpy:
    """The thinker's forwards: `tried` every one's (batch, length), `sizes` the batch sizes of those
    that ran; `fail(ids)` may raise for some batches, as the model would."""

    def __init__(self, lab, fail=None):
        self.tried: list[tuple[int, int]] = []
        self.sizes: list[int] = []
        self.fail = fail
        self.handle = lab.thinker.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        self.tried.append(tuple(ids.shape))
        if self.fail is not None:
            self.fail(ids)
        self.sizes.append(int(ids.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny):
    """The mixed manifest collected at batch 1 and at batch 8 (with the batch sizes each forward had)."""
    root = tmp_path_factory.mktemp("batch")
    manifest = manifest_of(root / "mixed.jsonl", MIXED)
    alone = collect(manifest, root / "alone", model=tiny, batch_size=1, progress=False)
    with ForwardSpy(tiny) as spy:
        batched = collect(manifest, root / "batched", model=tiny, batch_size=8, progress=False)
    return manifest, root / "alone", root / "batched", spy.sizes, (alone, batched)


def test_batched_rows_equal_batch_one_rows_for_mixed_media_of_very_different_lengths(mixed):
    manifest, alone, batched, sizes, summaries = mixed
    assert summaries[0]["done"] == summaries[1]["done"] == len(MIXED)
    # 7 samples in one padded batch, the 2 with audio in video in another (one flag per forward)
    assert sorted(sizes) == [2, 7]
    lengths = read_table(alone, "samples").set_index("sample_id")["prompt_tokens"]
    assert lengths.min() < 20 and lengths.max() > 180  # very different lengths: much padding cut off
    assert_same_rows(batched, alone)


def test_batched_positions_are_each_rows_own_tm_rope_positions(mixed):
    _, alone, batched, _, _ = mixed
    columns = ["sample_id", "pos", "token_id", "modality", "t", "h", "w"]
    got = read_table(batched, "tokens")[columns].sort_values(["sample_id", "pos"]).reset_index(drop=True)
    want = read_table(alone, "tokens")[columns].sort_values(["sample_id", "pos"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    video = got[got["modality"] == "video"]
    assert video["h"].nunique() > 1 and (video["t"] != video["pos"]).any()  # 3-D positions, not 1-D


def test_batch_inputs_pad_ids_and_audio_and_concatenate_media_in_row_order(tiny):
    samples = {s.sample_id: s for s in read_manifest(DATA / "manifest.jsonl")}
    inputs = [
        tiny.prepare(samples[i].resolved(), use_audio_in_video=False)
        for i in ("text-greeting", "audio-image", "video-question", "image-two")
    ]
    pad = tiny.processor.tokenizer.pad_token_id
    batch = batching.batch_inputs(inputs, pad)
    lengths = [int(x["input_ids"].shape[1]) for x in inputs]
    assert batch["input_ids"].shape == (4, max(lengths))
    for row, (x, n) in enumerate(zip(inputs, lengths, strict=True)):
        assert torch.equal(batch["input_ids"][row, :n], x["input_ids"][0])
        assert (batch["input_ids"][row, n:] == pad).all() and batch["attention_mask"][row].sum() == n
    assert torch.equal(
        batch["pixel_values"], torch.cat([inputs[1]["pixel_values"], inputs[3]["pixel_values"]])
    )
    assert torch.equal(
        batch["image_grid_thw"], torch.cat([inputs[1]["image_grid_thw"], inputs[3]["image_grid_thw"]])
    )
    assert torch.equal(batch["pixel_values_videos"], inputs[2]["pixel_values_videos"])
    assert torch.equal(batch["input_features"], inputs[1]["input_features"])


# -- memory ------------------------------------------------------------------------------------------
def test_plan_sorts_by_length_keeps_audio_in_video_apart_and_splits_what_would_not_fit():
    def prepared(i, length, flag=False):
        from omnilab.store.manifest import Sample

        sample = Sample(f"s{i}", [{"role": "user", "content": "x"}], use_audio_in_video=flag, line=i)
        return batching.Prepared(sample, {}, length, 0.0)

    items = [prepared(0, 10), prepared(1, 300), prepared(2, 50, True), prepared(3, 40), prepared(4, 900)]
    plan = batching.plan_batches(items, 8, lambda lengths: True)
    assert [[p.length for p in b] for b in plan] == [[900, 300, 40, 10], [50]]
    plan = batching.plan_batches(items, 1, lambda lengths: True)
    assert [[p.length for p in b] for b in plan] == [[10], [300], [50], [40], [900]]  # batch 1: as listed
    plan = batching.plan_batches(items, 2, lambda lengths: True)
    assert [[p.length for p in b] for b in plan] == [[900, 300], [40, 10], [50]]
    plan = batching.plan_batches(items, 8, lambda lengths: max(lengths) * len(lengths) < 600)
    assert [[p.length for p in b] for b in plan] == [
        [900],
        [300],
        [40, 10],
        [50],
    ]  # 900 alone: over, runs alone


def test_a_batch_over_the_memory_budget_is_split_not_crashed(mixed, tiny, tmp_path):
    manifest, alone, _, _, _ = mixed
    lengths = sorted(int(p) for p in read_table(alone, "samples")["prompt_tokens"])
    capture = ("codes", "positions", "routing")
    budget = batching.batch_bytes(tiny, lengths[-2:], capture)  # the longest two fit, all of them not
    assert batching.batch_bytes(tiny, lengths, capture) > 3 * budget
    with ForwardSpy(tiny) as spy:
        summary = collect(
            manifest, tmp_path / "store", model=tiny, batch_size=8, memory_budget=budget, progress=False
        )
    assert summary["done"] == len(MIXED) and summary["errors"] == 0
    assert len(spy.tried) > 3 and max(spy.sizes) > 1  # split into more batches, yet still batched
    for size, length in spy.tried:  # every forward within the budget
        assert batching.batch_bytes(tiny, [length] * size, capture) <= budget
    assert_same_rows(tmp_path / "store", alone)


def test_the_batch_estimate_counts_the_site_activations_asked_for(tiny):
    # every padded position of every resid site, at the hidden width, in the recording dtype
    plain = batching.batch_bytes(tiny, [100, 60], ("positions",))
    sites = batching.batch_bytes(tiny, [100, 60], ("positions", "resid.*"))
    config = tiny.model.config.thinker_config.text_config
    layers = len(resolve_sites(tiny.model, "resid.*"))
    element = torch.empty(0, dtype=default_dtype(tiny.model)).element_size()
    assert sites - plain == layers * config.hidden_size * element * 100 * 2


def test_a_batch_out_of_memory_is_halved_until_it_runs(mixed, tiny, tmp_path):
    manifest, alone, _, _, _ = mixed

    def fail(ids):
        if ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with ForwardSpy(tiny, fail) as spy:
        summary = collect(manifest, tmp_path / "store", model=tiny, batch_size=8, progress=False)
    assert summary["done"] == len(MIXED) and summary["errors"] == 0
    assert sorted(size for size, _ in spy.tried) == [1, 2, 2, 2, 2, 3, 4, 7]  # 7 -> 3 + 4 -> 1 + 2 + 2 + 2
    assert max(spy.sizes) == 2  # (the 2 with audio in video ran as they were)
    assert_same_rows(tmp_path / "store", alone)


# -- bad samples ---------------------------------------------------------------------------------------
def test_a_failing_sample_goes_to_errors_and_the_rest_of_its_batch_lands(mixed, tiny, tmp_path):
    manifest, alone, _, _, _ = mixed
    (tmp_path / "noise.wav").write_bytes(b"RIFF" + os.urandom(300))
    bad = [
        {
            "id": "corrupt",
            "conversation": [
                {"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "noise.wav")}]}
            ],
        },
        {"id": "too-long", "conversation": [{"role": "user", "content": "word " * 400}]},
    ]
    mixed_bad = manifest_of(tmp_path / "m.jsonl", MIXED, bad)
    audio_only = int(read_table(alone, "samples").set_index("sample_id").loc["audio-only", "prompt_tokens"])

    def fail(ids):  # the model itself fails on one sample (here: the audio-only prompt's length)
        if ((ids != 151643).sum(-1) == audio_only).any():
            raise RuntimeError("simulated failure inside the forward")

    with ForwardSpy(tiny, fail) as spy:
        summary = collect(
            mixed_bad, tmp_path / "store", model=tiny, batch_size=8, max_tokens=300, progress=False
        )
    assert (summary["done"], summary["errors"]) == (len(MIXED) - 1, 3)
    errors = query(tmp_path / "store", "SELECT sample_id, error, reason FROM errors").set_index("sample_id")
    assert errors.loc["corrupt", "error"] == "MediaError"
    assert "too long" in errors.loc["too-long", "reason"]
    assert "simulated failure" in errors.loc["audio-only", "reason"]
    assert (7, 194) in spy.tried and spy.sizes.count(1) == 6  # the batch failed; each ran alone, one failed
    ok = [i for i in MIXED if i != "audio-only"]
    assert_same_rows(tmp_path / "store", alone, ok)


# -- resume --------------------------------------------------------------------------------------------
def test_a_run_interrupted_between_batches_resumes_to_exactly_once(tiny, tmp_path, monkeypatch):
    rows_ = [
        {"id": f"t{i:02d}", "conversation": [{"role": "user", "content": f"Count to {i} " * (i % 5 + 1)}]}
        for i in range(10)
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    out = tmp_path / "store"
    forward = batching._forward
    calls = []

    def interrupted(lab, batch, capture):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C inside the second batch's forward
        return forward(lab, batch, capture)

    monkeypatch.setattr(batching, "_forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect(manifest, out, model=tiny, batch_size=4, shard_samples=3, progress=False)
    first = query(out, "SELECT sample_id FROM samples")["sample_id"]
    assert len(first) == 4 and first.is_unique  # the first batch, whole, and nothing of the second
    monkeypatch.setattr(batching, "_forward", forward)
    summary = collect(manifest, out, model=tiny, batch_size=4, shard_samples=3, progress=False)
    assert summary["skipped"] == 4 and summary["done"] == 6
    samples = query(out, "SELECT sample_id, count(*) AS n FROM samples GROUP BY ALL")
    assert sorted(samples["sample_id"]) == [r["id"] for r in rows_] and (samples["n"] == 1).all()
    assert (
        len(
            query(
                out,
                "SELECT sample_id, layer, pos, rank, count(*) AS n FROM routing GROUP BY ALL HAVING n > 1",
            )
        )
        == 0
    )
    assert layout.shard_dirs(out)


def test_generated_samples_run_one_by_one(tiny, tmp_path):
    manifest = manifest_of(tmp_path / "m.jsonl", ["text-greeting", "text-long", "audio-only"])
    with ForwardSpy(tiny) as spy:
        summary = collect(manifest, tmp_path / "store", model=tiny, generate=2, batch_size=8, progress=False)
    assert summary["done"] == 3 and set(spy.sizes) == {1}  # upstream generate with the talker is batch 1


def test_batch_size_must_be_a_positive_whole_number(tmp_path):
    from omnilab.errors import OmnilabError

    manifest = manifest_of(tmp_path / "m.jsonl", ["text-greeting"])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(OmnilabError, match="batch_size"):
            collect(manifest, tmp_path / "store", batch_size=bad, progress=False)


def test_cli_collect_takes_batch_size(tmp_path, capsys):
    from omnilab.cli import main

    manifest = manifest_of(tmp_path / "m.jsonl", ["text-greeting", "text-long", "text-system"])
    assert main(["collect", str(manifest), "--out", str(tmp_path / "store"), "--batch-size", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 3


def test_batched_activations_equal_batch_one_activations(tiny, tmp_path):
    """Residual rows de-padded per sample: the same (sample, pos) rows, values within float16 rounding."""
    from omnilab.store import activations
    from omnilab.store.batch import batched

    manifest = manifest_of(tmp_path / "mixed.jsonl", MIXED)
    capture = ("routing", "positions", "resid.*")
    assert batched(capture, 0) and not batched(("positions", "audio_tower"), 0)
    with ForwardSpy(tiny) as spy:
        collect(manifest, tmp_path / "batched", model=tiny, capture=capture, batch_size=8, progress=False)
    assert max(spy.sizes) > 1
    collect(manifest, tmp_path / "alone", model=tiny, capture=capture, batch_size=1, progress=False)
    for site in ("resid.0", "resid.3"):
        got, want = (activations(tmp_path / name, site) for name in ("batched", "alone"))
        keys = ["sample_id", "component", "phase", "step", "pos"]
        order_got = got.rows.sort_values(keys).index.to_numpy()
        order_want = want.rows.sort_values(keys).index.to_numpy()
        pd.testing.assert_frame_equal(
            got.rows.loc[order_got, keys].reset_index(drop=True),
            want.rows.loc[order_want, keys].reset_index(drop=True),
        )
        a = got.values().float().numpy()[order_got]
        b = want.values().float().numpy()[order_want]
        assert (
            len(a) == read_table(tmp_path / "alone", "tokens").shape[0]
        )  # every prompt position, no padding
        # float16 storage; batched expert matmuls round differently: a few float16 ulps at most
        np.testing.assert_array_less(np.abs(a - b), 4 * np.spacing(np.abs(b).astype(np.float16)) + 1e-3)


def test_every_trace_in_the_store_names_its_samples_media_and_audio_in_video_as_lab_forward_does(mixed, tiny):
    """Batched and batch-1 collection alike: each sample's meta carries its media items and its own
    use_audio_in_video (batched rows once all said items=[] and False; batch 1 never began the tracer)."""
    manifest, alone, batched, _, _ = mixed
    samples = read_manifest(manifest)
    metas = {
        store: {r.sample_id: json.loads(r.meta) for r in read_table(store, "samples").itertuples()}
        for store in (alone, batched)
    }
    for sample in samples:
        counts = sample.media_counts()
        for store in (alone, batched):
            meta = metas[store][sample.sample_id]
            assert meta["use_audio_in_video"] is sample.use_audio_in_video, (store.name, sample.sample_id)
            kinds = [item["modality"] for item in meta["items"]]
            assert {m: kinds.count(m) for m in ("audio", "image", "video")} == counts, (
                store.name,
                sample.sample_id,
            )
        assert metas[batched][sample.sample_id] == metas[alone][sample.sample_id]
    everything = next(s for s in samples if s.sample_id == "all-media-audio-in-video")
    with tiny.trace(capture=("routing", "positions", "codes")) as tracer:
        tiny.forward(everything.resolved(), use_audio_in_video=True)
    assert metas[batched][everything.sample_id]["items"] == tracer.trace.meta["items"]


def test_a_collect_says_where_its_time_went(mixed):
    for summary in mixed[4]:  # batch 1 and batch 8
        stages = summary["stage_seconds"]
        assert set(stages) == {"prepare", "forward", "record", "rows", "write"}
        assert all(seconds > 0 for seconds in stages.values()), stages
        assert sum(stages.values()) <= summary["seconds"] * 1.01  # parts of the run's wall time
