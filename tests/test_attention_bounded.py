"""Attention recorded at bounded cost: the model's own sdpa runs; the kept rows are eager's rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnilab.instrument.budget import BudgetError, attention_rows, estimate_capture_bytes

GEN = {"max_new_tokens": 3, "return_audio": False}


def _eager_maps(lab, conversation, layers, new_tokens: int):
    """Eager attention maps of the thinker's `layers` over the prompt and the generated tokens:
    {layer: [heads, positions, positions]} of a forward over prompt + reply (causal, so each row is
    the one the step that fed that position computed)."""
    reply = lab.generate(conversation, max_new_tokens=new_tokens, return_audio=False)
    inputs = lab.prepare(conversation)
    fed = torch.tensor([reply.token_ids[:-1]], dtype=inputs["input_ids"].dtype)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], fed], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    text_model = lab.thinker.model.language_model
    text_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = lab.thinker(**inputs, output_attentions=True)
    finally:
        text_model.set_attn_implementation("sdpa")
    return {layer: out.attentions[layer][0].float().numpy() for layer in layers}, reply


@pytest.fixture(scope="module")
def recorded(tiny, all_media_conversation):
    layers = [0, 1]
    with tiny.trace(
        capture=("attention",), attention_layers={"thinker": layers}, attention={"top_k": 4}
    ) as tracer:
        reply = tiny.generate(all_media_conversation, **GEN)
    maps, eager_reply = _eager_maps(tiny, all_media_conversation, layers, GEN["max_new_tokens"])
    assert eager_reply.token_ids == reply.token_ids
    return tracer.trace, maps, reply


def test_kept_rows_equal_the_eager_maps_rows_on_a_mixed_prompt_and_in_decode(recorded, tiny):
    trace, maps, reply = recorded
    rows = trace.attention.query("reduction == 'row'")
    prompt = int(trace.tokens.query("component == 'thinker' and phase == 'prefill'")["pos"].max()) + 1
    fed = prompt + len(reply.token_ids) - 1
    assert sorted(rows["query_pos"].unique()) == list(range(prompt - 1, fed))  # last prompt row + decode rows
    assert set(trace.tokens.query("component == 'thinker'")["modality"]) >= {
        "audio",
        "image",
        "video",
        "text",
    }
    for (layer, head, query), row in rows.groupby(["layer", "head", "query_pos"]):
        eager = maps[layer][head, query, : query + 1]
        got = np.zeros(query + 1, dtype=np.float32)
        got[row["key_pos"].to_numpy()] = row["weight"].to_numpy()
        np.testing.assert_allclose(got, eager, atol=2e-3, rtol=2e-3)  # float16 storage
        assert (row["key_end"] == row["key_pos"] + 1).all()


def test_blocks_hold_every_querys_mass_per_modality_run(recorded):
    trace, maps, _ = recorded
    blocks = trace.attention.query("reduction == 'block'")
    tokens = trace.tokens.query("component == 'thinker'").set_index("pos")
    for (layer, head), part in blocks.groupby(["layer", "head"]):
        sums = part.groupby("query_pos")["weight"].sum()
        np.testing.assert_allclose(sums, 1.0, atol=5e-3)
        assert len(sums) == maps[layer].shape[1]  # every query, prompt and decode
        for query, start, end, weight in part[["query_pos", "key_pos", "key_end", "weight"]].to_numpy()[::97]:
            query, start, end = int(query), int(start), int(end)
            np.testing.assert_allclose(
                weight, maps[layer][head, query, start:end].sum(), atol=2e-3, rtol=2e-3
            )
            assert tokens.loc[start:end - 1, "modality"].nunique() == 1  # fmt: skip


def test_top_k_keys_are_each_querys_strongest(recorded):
    trace, maps, _ = recorded
    top = trace.attention.query("reduction == 'top_k' and layer == 1 and head == 2")
    for query, part in list(top.groupby("query_pos"))[::50]:
        eager = maps[1][2, query, : query + 1]
        assert len(part) == min(4, query + 1)
        strongest = np.sort(eager)[::-1][: len(part)]
        np.testing.assert_allclose(np.sort(part["weight"].to_numpy())[::-1], strongest, atol=2e-3)


def test_the_model_keeps_its_own_attention_and_output(tiny, all_media_conversation):
    bare = tiny.generate(all_media_conversation, **GEN)
    with tiny.trace(capture=("attention",), attention_layers={"thinker": [0, 3]}):
        assert tiny.thinker.model.language_model.config._attn_implementation == "sdpa"
        traced = tiny.generate(all_media_conversation, **GEN)
    assert traced.token_ids == bare.token_ids


def test_the_estimate_counts_the_rows_exactly_and_grows_linearly(tiny, all_media_conversation, recorded):
    trace, _, reply = recorded
    inputs = tiny.prepare(all_media_conversation)
    heads = tiny.thinker.config.text_config.num_attention_heads
    settings = {"top_k": 4}
    assert len(trace.attention) == 2 * heads * attention_rows(tiny, inputs, settings, max_new_tokens=3)
    linear = [attention_rows(tiny, n, None, max_new_tokens=3) for n in (1000, 4000, 16000)]
    assert linear[2] / linear[1] == pytest.approx(4, rel=0.01) and linear[1] / linear[0] == pytest.approx(
        4, rel=0.01
    )
    square = [attention_rows(tiny, n, {"queries": "all"}) for n in (1000, 4000)]
    assert square[1] / square[0] > 15


def test_a_capture_over_budget_is_refused_before_the_forward(tiny, all_media_conversation):
    calls = []
    handle = tiny.thinker.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(
            BudgetError, match="refused before running.*MB.*the budget is 100.0 KB.*memory_budget"
        ):
            with tiny.trace(capture=("attention",), attention={"queries": "all"}, memory_budget=10**5):
                tiny.generate(all_media_conversation, **GEN)
    finally:
        handle.remove()
    assert calls == []
    inputs = tiny.prepare(all_media_conversation)
    estimate = estimate_capture_bytes(
        tiny, inputs, ("attention",), {"thinker": [0]}, attention={"queries": "all"}
    )
    assert estimate.over(10**5)


def test_modality_mass_from_blocks_equals_the_mass_of_whole_rows(tiny, all_media_conversation):
    from dataclasses import replace

    from omnilab import analysis

    with tiny.trace(capture=("attention",), attention={"queries": "all"}) as tracer:
        tiny.generate(all_media_conversation, **GEN)
    trace = tracer.trace
    attention = trace.tables["attention"]
    rows_only = {c: v[attention["reduction"] == "row"] for c, v in attention.items()}
    from_blocks = analysis.attention_modality_mass(trace)
    from_rows = analysis.attention_modality_mass(
        replace(trace, tables={**trace.tables, "attention": rows_only})
    )
    assert (attention["reduction"] == "block").any() and len(from_blocks) == len(from_rows)
    np.testing.assert_allclose(from_blocks["mass"], from_rows["mass"], atol=2e-3)
    assert (from_blocks["queries"] == from_rows["queries"]).all()


def test_traces_keep_the_reductions_and_older_attention_tables_read_as_whole_rows(recorded, tmp_path):
    import pandas as pd

    from omnilab.trace import Trace

    trace, _, _ = recorded
    loaded = Trace.load(trace.save(tmp_path / "t"))
    assert loaded.arrow("attention").schema.field("weight").type == "halffloat"
    pd.testing.assert_frame_equal(loaded.attention, trace.attention)
    old = trace.attention.query("reduction == 'row'")[
        ["component", "layer", "head", "query_pos", "key_pos", "weight"]
    ]
    older = Trace.build(tokens=trace.tokens, attention=old.astype({"weight": "float32"}))
    assert (older.attention["reduction"] == "row").all()
    assert (older.attention["key_end"] == older.attention["key_pos"] + 1).all()


def test_talker_attention_is_recorded_the_same_way(tiny, all_media_conversation):
    with tiny.trace(capture=("attention",), attention_layers={"talker": [1]}) as tracer:
        reply = tiny.generate(all_media_conversation, max_new_tokens=2, max_speech_frames=3)
    attention = tracer.trace.attention
    assert set(attention["component"]) == {"talker"} and reply.audio is not None
    for reduction in ("row", "block"):
        sums = attention[attention["reduction"] == reduction].groupby(["head", "query_pos"])["weight"].sum()
        assert len(sums) and np.allclose(sums, 1.0, atol=5e-4)
    speech = attention[(attention["reduction"] == "block") & (attention["key_pos"] > 0)]
    assert len(speech)  # the generated frames are a block of their own (speech)
