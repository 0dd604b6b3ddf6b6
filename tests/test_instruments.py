"""Instruments: what the trace holds equals what the model computes; interventions leave nothing behind."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest
import torch

import omnilab
from omnilab.instrument.sites import find_sites

GEN = {"max_new_tokens": 4, "max_speech_frames": 5}


@pytest.fixture(scope="module")
def traced(tiny, all_media_conversation):
    return tiny.generate(all_media_conversation, trace=("routing", "positions", "codes", "timings"), **GEN)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_sites_on_the_real_config_find_48_thinker_and_20_talker_routers():
    from omnilab.models.card import meta_model, real_config

    sites = find_sites(meta_model(real_config()))
    routers = [s for s in sites if s.kind == "router"]
    assert sum(s.component == "thinker" for s in routers) == 48
    assert sum(s.component == "talker" for s in routers) == 20
    assert routers[10].name == "thinker.model.language_model.layers.10.mlp.gate"


def test_sites_table_lists_every_kind(tiny):
    kinds = set(tiny.sites()["kind"])
    assert {
        "router",
        "rotary",
        "attention",
        "audio_tower",
        "vision_tower",
        "codec_head",
        "code_predictor",
        "code2wav",
    } <= kinds


def test_routing_equals_output_router_logits_in_prefill_and_decode(tiny, all_media_conversation):
    inputs = tiny.prepare(all_media_conversation)
    seen = {"thinker": [], "talker": []}

    def keep(component):
        def hook(module, args, output):
            if getattr(output, "router_logits", None) is not None:
                seen[component].append([logits.detach().clone() for logits in output.router_logits])

        return hook

    # The thinker returns its router logits (output_router_logits=True); the talker's output has no
    # such field in transformers 5.24, so for it we collect the gate's logits with plain hooks.
    talker_step: list = []

    def talker_gate(module, args, output):
        talker_step.append(output[0].detach().clone())

    def talker_done(module, args, output):
        seen["talker"].append(list(talker_step))
        talker_step.clear()

    handles = [tiny.model.thinker.register_forward_hook(keep("thinker"))]
    handles += [layer.mlp.gate.register_forward_hook(talker_gate) for layer in tiny.model.talker.model.layers]
    handles.append(tiny.model.talker.register_forward_hook(talker_done))
    kwargs = tiny.generation_kwargs(inputs, max_new_tokens=3, max_speech_frames=3)
    try:
        with tiny.trace(capture=("routing",)) as tr, torch.no_grad():
            tiny.model.generate(**kwargs, thinker_output_router_logits=True, talker_output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
    routing = tr.trace.routing
    for component, steps in seen.items():
        module = getattr(tiny.model, component)
        text = module.config.text_config
        k = text.num_experts_per_tok
        assert len(steps) >= 2  # prefill and at least one decode step
        start = 0
        for step in steps:
            n = step[0].shape[0]
            for layer, logits in enumerate(step):
                probs = torch.softmax(logits.float(), -1)
                weights, top = torch.topk(probs, k, -1)
                if text.norm_topk_prob:
                    weights = weights / weights.sum(-1, keepdim=True)
                got = routing.query(
                    "component == @component and layer == @layer and @start <= pos < @start + @n"
                )
                got = got.sort_values(["pos", "rank"])
                assert np.array_equal(got["expert"].to_numpy().reshape(n, k), top.numpy()), (
                    component,
                    layer,
                    start,
                )
                assert np.allclose(
                    got["weight"].to_numpy(np.float32).reshape(n, k), weights.numpy(), atol=1e-3
                )
            start += n
    assert set(routing["phase"]) == {"prefill", "decode"}


def test_routing_weights_are_the_routers_own(traced, tiny):
    routing = traced.trace.routing.query("component == 'thinker'")
    sums = routing.groupby(["layer", "pos"])["weight"].sum().astype(float)
    assert np.allclose(sums, 1.0, atol=5e-3)  # the thinker renormalizes its top-k (norm_topk_prob)
    talker = traced.trace.routing.query("component == 'talker'")
    assert talker["expert"].nunique() > tiny.model.config.talker_config.text_config.num_experts_per_tok


def test_routing_is_compact_as_stored(traced):
    import pyarrow as pa

    routing = traced.trace.columns("routing")
    assert routing["expert"].dtype == np.int16 and routing["weight"].dtype == np.float16
    assert traced.trace.arrow("routing").schema.field("weight").type == pa.float16()
    assert routing["expert"].max() < 256  # fits a uint8 in Parquet's dictionary/bit-packed encoding


def test_showing_routing_warns_nothing_and_reads_float32(traced):
    import warnings

    routing = traced.trace.routing
    assert routing["weight"].dtype == np.float32
    assert np.array_equal(routing["weight"], traced.trace.columns("routing")["weight"].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repr(routing), routing._repr_html_()


def test_routing_carries_each_tokens_modality(traced):
    trace = traced.trace
    tokens = trace.tokens.set_index(["component", "pos"])["modality"]
    routing = trace.routing
    expected = tokens.loc[list(zip(routing["component"], routing["pos"], strict=True))].to_numpy()
    assert np.array_equal(routing["modality"].to_numpy(), expected)
    assert {"audio", "image", "video", "text", "speech"} <= set(routing["modality"])
    # a routing table without the column (a trace saved before it existed) gets it from the tokens
    older = omnilab.Trace.build(tokens=trace.tokens, routing=routing.drop(columns="modality"))
    assert older.routing["modality"].equals(routing["modality"])


def test_positions_equal_get_rope_index(traced, tiny, all_media_conversation):
    inputs = tiny.prepare(all_media_conversation)
    thinker = tiny.model.thinker
    positions, _ = thinker.model.get_rope_index(
        inputs["input_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
        inputs["attention_mask"],
        False,
        inputs["feature_attention_mask"].sum(-1),
        inputs.get("video_second_per_grid"),
    )
    tokens = traced.trace.tokens.query("component == 'thinker' and phase == 'prefill'").sort_values("pos")
    assert np.array_equal(tokens[["t", "h", "w"]].to_numpy().T, positions[:, 0].numpy())


def test_positions_with_use_audio_in_video_equal_get_rope_index(tiny, data_dir):
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(data_dir / "video.mp4")}]}]
    inputs = tiny.prepare(conversation, use_audio_in_video=True)
    with tiny.trace(capture=("positions",)) as tr, torch.no_grad():
        tiny.model.thinker(**inputs, use_audio_in_video=True)
    positions, _ = tiny.model.thinker.model.get_rope_index(
        inputs["input_ids"],
        None,
        inputs["video_grid_thw"],
        inputs["attention_mask"],
        True,
        inputs["feature_attention_mask"].sum(-1),
        inputs["video_second_per_grid"],
    )
    tokens = tr.trace.tokens.sort_values("pos")
    assert np.array_equal(tokens[["t", "h", "w"]].to_numpy().T, positions[:, 0].numpy())
    assert {"audio", "video"} <= set(tokens["modality"])


def test_seconds_follow_position_id_per_seconds(traced, tiny):
    pps = tiny.model.config.thinker_config.position_id_per_seconds
    video = traced.trace.tokens.query("component == 'thinker' and modality == 'video'")
    seconds = sorted(video["seconds"].unique())
    # two temporal grids of 2 frames at 2 fps: one second apart
    assert np.allclose(np.diff(seconds), 1.0 * pps / pps)
    audio = traced.trace.tokens.query("component == 'thinker' and modality == 'audio'")
    assert np.allclose(audio["seconds"].diff().dropna(), 1 / pps)


def test_a_video_slower_than_two_fps_keeps_its_true_seconds(tiny, tmp_path):
    # a 1-fps video is sampled at 1 fps; the processor must be told so, or each grid of 2 frames
    # would be placed 1 s after the last instead of 2 s (it was: the lab always said 2 fps)
    from omnilab.organism import world

    frames = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    path = world.write_video(tmp_path / "slow.mp4", frames, fps=1)
    conversation = [{"role": "user", "content": [{"type": "video", "video": str(path)}]}]
    with tiny.trace(capture=("positions",)) as tr, torch.no_grad():
        tiny.forward(conversation)
    video = tr.trace.tokens.query("modality == 'video'")
    assert np.allclose(np.diff(sorted(video["seconds"].unique())), 2.0)
    both = conversation[0]["content"] + [{"type": "video", "video": str(tmp_path / "slow.mp4")}]
    assert tiny.prepare([{"role": "user", "content": both}])["video_second_per_grid"].tolist() == [2.0, 2.0]


def test_codes_equal_what_code2wav_decodes(tiny, all_media_conversation):
    decoded = []
    original = tiny.model.code2wav.chunked_decode

    def spy(codes, *args, **kwargs):
        decoded.append(codes.clone())
        return original(codes, *args, **kwargs)

    tiny.model.code2wav.chunked_decode = spy
    try:
        reply = tiny.generate(all_media_conversation, trace=True, **GEN)
    finally:
        del tiny.model.code2wav.chunked_decode
    codes = reply.trace.codes.pivot(index="frame", columns="codebook", values="code").to_numpy()
    assert np.array_equal(codes, decoded[0][0].T.numpy())
    assert np.array_equal(codes, reply.codes)


def test_every_generated_token_and_frame_appears_once(traced):
    tokens = traced.trace.tokens
    thinker = tokens.query("component == 'thinker'")
    assert not thinker["pos"].duplicated().any()
    generated = thinker.sort_values("pos")["token_id"].to_numpy()[-len(traced.token_ids) :]
    assert generated.tolist() == traced.token_ids
    speech = tokens.query("component == 'talker' and modality == 'speech'")
    assert sorted(speech["frame"]) == list(range(traced.codes.shape[0]))
    assert len(traced.trace.codes) == traced.codes.size


def test_timings_cover_every_stage(traced):
    stages = set(traced.trace.timings["stage"])
    assert {
        "thinker_prefill",
        "thinker_decode",
        "talker_prefill",
        "talker_decode",
        "code_predictor",
        "code2wav",
    } <= stages
    assert (traced.trace.timings["seconds"] > 0).all()


def test_attention_rows_sum_to_one_and_spans_cover_every_token(tiny, all_media_conversation):
    with tiny.trace(capture=("attention",), attention_layers={"thinker": [0, 1]}) as tr:
        tiny.generate(all_media_conversation, max_new_tokens=2, return_audio=False)
    attention = tr.trace.attention
    # Weights are stored float16 (relative rounding <= 2**-11), so a row of positive weights sums to
    # 1 within 5e-4; whole rows and per-block masses each sum to 1 for every recorded query.
    for reduction in ("row", "block"):
        part = attention[attention["reduction"] == reduction]
        sums = part.groupby(["layer", "head", "query_pos"])["weight"].sum()
        assert len(sums) and np.allclose(sums, 1.0, atol=5e-4)
    assert set(attention["layer"]) == {0, 1}
    spans = tr.trace.spans.query("component == 'thinker'")
    covered = np.zeros(spans["end"].max(), dtype=int)
    for start, end in spans[["start", "end"]].itertuples(index=False):
        covered[start:end] += 1
    assert (covered == 1).all()
    assert tiny.model.thinker.model.language_model.config._attn_implementation == "sdpa"


def test_tower_attention_maps_are_the_towers_own_and_rows_sum_to_one(tiny, all_media_conversation):
    """The recording function computes the towers' attention the model's own (eager) way."""
    inputs = tiny.prepare(all_media_conversation)
    towers = {"audio_tower": [0, 1], "vision_tower": [1]}
    thinker = tiny.model.thinker
    with torch.no_grad():
        bare = thinker(**inputs).logits
    with tiny.trace(capture=("attention",), attention_layers=towers) as tr, torch.no_grad():
        recorded = thinker(**inputs).logits
    # Same output (eager vs sdpa within float tolerance), and the towers are back on their implementation.
    assert torch.allclose(bare, recorded, atol=1e-4)
    assert thinker.model.audio_tower.config._attn_implementation == "sdpa"
    assert thinker.model.visual.config._attn_implementation == "sdpa"
    maps = tr.trace.tower_attention
    assert set(zip(maps["tower"], maps["layer"], strict=True)) == {
        ("audio_tower", 0),
        ("audio_tower", 1),
        ("vision_tower", 1),
    }
    sums = maps.groupby(["tower", "layer", "call", "head", "query"])["weight"].sum()
    assert np.allclose(sums, 1.0, atol=1e-4)
    # The vision tower runs once for the image and once for the video; each attends within its windows.
    vision = maps[maps["tower"] == "vision_tower"]
    assert set(vision["call"]) == {0, 1}
    for _, rows in vision.groupby(["call", "window"]):
        assert rows["query"].min() == rows["key"].min() and rows["query"].max() == rows["key"].max()
    # Every audio frame the tower saw is a query exactly once per head and layer.
    audio = maps[(maps["tower"] == "audio_tower") & (maps["layer"] == 0) & (maps["head"] == 0)]
    queries = audio.groupby("call")["query"].nunique()
    assert (queries == audio.groupby("call")["query"].max() + 1).all()
    # The analysis averages heads and places audio frames in time; the figure is query x key.
    from omnilab import analysis, plots

    mean = analysis.tower_attention_map(tr.trace, tower="audio_tower", layer=0)
    assert set(mean["head"]) == {-1}
    assert np.allclose(mean.groupby("query")["weight"].sum(), 1.0, atol=1e-4)
    assert np.allclose(mean["query_seconds"], mean["query"] / tr.trace.meta["position_id_per_seconds"])
    fig = plots.tower_attention_heatmap(mean)
    n = int(mean["query"].max()) + 1
    assert np.asarray(fig.data[0].z).shape == (n, n) and "audio tower" in fig.layout.title.text


def test_nested_tower_traces_both_record_and_restore_once(tiny, all_media_conversation):
    inputs = tiny.prepare(all_media_conversation)
    tower = tiny.model.thinker.model.audio_tower
    with tiny.trace(capture=("attention",), attention_layers={"audio_tower": [0]}) as outer, torch.no_grad():
        with tiny.trace(capture=("attention",), attention_layers={"audio_tower": [1]}) as inner:
            tiny.model.thinker(**inputs)
        tiny.model.thinker(**inputs)  # the inner exit must not switch the outer's recording off
        assert tower.config._attn_implementation != "sdpa"
    assert tower.config._attn_implementation == "sdpa"
    assert set(inner.trace.tower_attention["call"]) == {0}
    assert set(outer.trace.tower_attention["call"]) == {0, 1}


def test_tower_attention_asks_for_a_real_layer(tiny):
    with pytest.raises(omnilab.InterventionError, match="audio_tower has"):
        with tiny.trace(capture=("attention",), attention_layers={"audio_tower": [99]}):
            pass


def test_ablation_keeps_a_modality_away_from_experts_and_changes_the_output(
    tiny, all_media_conversation, traced
):
    thinker = traced.trace.routing_with_tokens().query(
        "component == 'thinker' and layer == 1 and modality == 'audio'"
    )
    banned = thinker["expert"].value_counts().index[:2].tolist()
    inputs = tiny.prepare(all_media_conversation)
    with torch.no_grad():
        bare = tiny.model.thinker(**inputs).logits
    with (
        tiny.intervene(ablate={"thinker": {1: banned}}, modality="audio"),
        tiny.trace(capture=("routing",)) as tr,
    ):
        with torch.no_grad():
            ablated = tiny.model.thinker(**inputs).logits
    routed = tr.trace.routing_with_tokens().query("layer == 1")
    assert not routed.query("modality == 'audio'")["expert"].isin(banned).any()
    assert routed.query("modality != 'audio'")["expert"].isin(banned).any()
    assert not torch.equal(bare, ablated)


def test_a_modality_ablation_applies_to_every_row_of_a_batch_and_refuses_an_unseen_forward(
    tiny, all_media_conversation
):
    from omnilab.store.batch import batch_inputs

    # a batched forward's router rows are [batch * length]: the ablation must find every row's
    # tokens (it used to match none and silently ablate nothing); a forward of a submodule that no
    # hook saw has no token ids to go by, and says so
    inputs = tiny.prepare(all_media_conversation)
    twice = batch_inputs([inputs, inputs], pad_id=151643)  # the store's padded batch of two
    spec = {"thinker": {layer: list(range(8)) for layer in range(4)}}
    with torch.no_grad():
        bare = tiny.model.thinker(**twice).logits
        with tiny.intervene(ablate=spec, modality="audio"):
            one = tiny.model.thinker(**inputs).logits
            both = tiny.model.thinker(**twice).logits
    assert not torch.allclose(both[0], bare[0], atol=1e-4)  # the ablation reached the batch
    torch.testing.assert_close(both[0], one[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[1], one[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(omnilab.InterventionError, match="forward was not seen"):
        with tiny.intervene(ablate=spec, modality="audio"), torch.no_grad():
            tiny.model.thinker.model(**inputs)


def test_force_puts_the_expert_in_every_tokens_top_k(tiny):
    with tiny.intervene(force={"talker": {0: [5]}}), tiny.trace(capture=("routing",)) as tr:
        tiny.generate("Hi", **GEN)
    talker = tr.trace.routing.query("component == 'talker' and layer == 0")
    assert talker.groupby("pos")["expert"].apply(lambda e: 5 in set(e)).all()


def test_replay_routes_an_unablated_run_as_the_recorded_ablated_one(tiny, all_media_conversation):
    # A greedy rerun is identical without replay too; a route recorded under an ablation is not the
    # model's own, so only a replay that is honoured makes the un-ablated run follow it.
    spec = {"thinker": {layer: list(range(8)) for layer in range(4)}}
    run = {"max_new_tokens": 3, "return_audio": False}
    with tiny.intervene(ablate=spec):
        ablated = tiny.generate(all_media_conversation, trace=("routing",), **run)
        ablated_logits = tiny.forward(all_media_conversation)
    bare_logits = tiny.forward(all_media_conversation)
    assert (ablated_logits - bare_logits).abs().max() > 1e-3
    with tiny.intervene(replay=ablated.trace):
        replayed_logits = tiny.forward(all_media_conversation)
        replayed = tiny.generate(all_media_conversation, trace=("routing",), **run)
    torch.testing.assert_close(replayed_logits, ablated_logits, rtol=1e-5, atol=1e-5)
    assert replayed.token_ids == ablated.token_ids
    routes = [r.trace.routing.sort_values(["component", "layer", "pos", "rank"]) for r in (replayed, ablated)]
    assert np.array_equal(routes[0]["expert"].to_numpy(), routes[1]["expert"].to_numpy())


def test_temporal_only_positions_reach_the_rotary_embedding(tiny, all_media_conversation):
    with tiny.intervene(positions="temporal_only"), tiny.trace(capture=("positions",)) as tr:
        tiny.generate(all_media_conversation, max_new_tokens=2, return_audio=False)
    tokens = tr.trace.tokens
    assert (tokens["h"] == tokens["t"]).all() and (tokens["w"] == tokens["t"]).all()


def test_contexts_nest_and_leave_the_bare_model(tiny, all_media_conversation, traced):
    inputs = tiny.prepare(all_media_conversation)
    before = _hooks(tiny.model)
    with torch.no_grad():
        bare = tiny.model.thinker(**inputs).logits
    with tiny.trace(capture=("routing", "attention"), attention_layers={"thinker": [0]}):
        with tiny.intervene(ablate={"thinker": {0: [1, 2]}}), tiny.intervene(positions="temporal_only"):
            with tiny.intervene(replay=traced.trace):
                tiny.generate(all_media_conversation, **GEN)
    assert _hooks(tiny.model) == before
    with torch.no_grad():
        after = tiny.model.thinker(**inputs).logits
    assert torch.equal(bare, after)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"ablate": {"thinker": {99: [1]}}}, "no thinker router at layer 99"),
        ({"ablate": {"thinker": {0: [1000]}}}, "out of range"),
        ({"force": {"talker": {0: list(range(10))}}}, "top-"),
        ({"positions": "sideways"}, "unknown positions"),
        ({}, "nothing to do"),
    ],
)
def test_bad_interventions_get_clear_errors(tiny, spec, match):
    with pytest.raises(omnilab.InterventionError, match=match):
        tiny.intervene(**spec)


def test_save_load_round_trip_is_lossless(traced, tmp_path):
    path = traced.trace.save(tmp_path / "run")
    loaded = omnilab.Trace.load(path)
    for name in ("tokens", "routing", "router_stats", "codes", "spans", "timings"):
        a, b = getattr(traced.trace, name), getattr(loaded, name)
        assert a.reset_index(drop=True).equals(b.reset_index(drop=True)), name
    assert np.array_equal(loaded.audio, traced.trace.audio)
    assert loaded.meta["config_hash"] == traced.trace.meta["config_hash"]


def test_a_traced_run_reads_the_same_as_dataframes_and_as_arrow(traced):
    from omnilab.trace import COLUMNS, TABLES, VIEW_DTYPES

    trace = traced.trace
    for name in TABLES:
        frame, table = trace.table(name), trace.arrow(name)
        assert list(frame.columns) == list(COLUMNS[name]), name
        assert [str(t) for t in frame.dtypes] == [VIEW_DTYPES.get(d, d) for d in COLUMNS[name].values()], name
        assert table.num_rows == len(frame) == trace.rows(name), name
        assert table.to_pandas().astype(frame.dtypes.to_dict()).equals(frame), name
    assert trace.tokens is trace.tokens  # built once, then kept


def test_a_trace_built_from_columns_equals_one_built_from_dataframes(traced):
    from omnilab.trace import TABLES

    trace = traced.trace
    from_frames = omnilab.Trace.build(meta=trace.meta, **{n: trace.table(n).copy() for n in TABLES})
    from_columns = omnilab.Trace.build(meta=trace.meta, **{n: trace.columns(n) for n in TABLES})
    for name in TABLES:
        assert from_frames.table(name).equals(from_columns.table(name)), name
        assert from_frames.arrow(name).equals(from_columns.arrow(name)), name  # NaN is stored as null
    quiet = replace(trace, tables={**trace.tables, "routing": None}, meta={**trace.meta, "note": "x"})
    assert len(quiet.routing) == 0 and quiet.meta["note"] == "x" and quiet.tokens.equals(trace.tokens)
    assert len(trace.routing) > 0  # the original is untouched
    with pytest.raises(FrozenInstanceError):
        trace.audio = None


def test_bad_column_tables_get_clear_errors(traced):
    columns = dict(traced.trace.columns("codes"))
    with pytest.raises(omnilab.TraceError, match="lacks columns \\['code'\\]"):
        omnilab.Trace.build(codes={k: v for k, v in columns.items() if k != "code"})
    with pytest.raises(omnilab.TraceError, match="different lengths"):
        omnilab.Trace.build(codes={**columns, "code": columns["code"][:-1]})
    with pytest.raises(omnilab.TraceError, match="unknown trace tables"):
        omnilab.Trace.build(experts=columns)
    with pytest.raises(omnilab.TraceError, match="must be a DataFrame or a dict of column arrays; got list"):
        omnilab.Trace.build(codes=[1, 2, 3])


def test_saved_trace_is_readable_by_duckdb_without_omnilab(traced, tmp_path):
    import duckdb

    path = traced.trace.save(tmp_path / "run")
    count = duckdb.sql(f"select count(*) from '{path}/routing.parquet'").fetchall()[0][0]
    assert count == len(traced.trace.routing)


def test_truncated_or_foreign_trace_files_get_clear_errors(traced, tmp_path):
    path = traced.trace.save(tmp_path / "run")
    data = (path / "routing.parquet").read_bytes()
    (path / "routing.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(omnilab.TraceError, match="routing.parquet"):
        omnilab.Trace.load(path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "meta.json").write_text('{"hello": 1}')
    with pytest.raises(omnilab.TraceError, match="not omnilab trace metadata"):
        omnilab.Trace.load(tmp_path / "foreign")
    with pytest.raises(omnilab.TraceError, match="not a directory"):
        omnilab.Trace.load(tmp_path / "nothing")


def test_forward_traces_the_prompt_with_its_media_items(tiny, all_media_conversation):
    with tiny.trace(capture=("routing", "positions")) as tr:
        logits = tiny.forward(all_media_conversation)
    tokens = tr.trace.tokens
    assert logits.shape[1] == len(tokens) and set(tokens["phase"]) == {"prefill"}
    items = tr.trace.meta["items"]
    assert {i["modality"] for i in items} == {"audio", "image", "video"}
    # A trace names media by file name only, never by the path on the machine that made it.
    assert all("/" not in i["name"] for i in items)
    assert (
        tr.trace.meta["components"]["thinker"]["num_experts"]
        == tiny.model.config.thinker_config.text_config.num_experts
    )


# -- the recording engine ----------------------------------------------------------------------------
def test_special_token_ids_come_from_the_config(tiny):
    from omnilab.instrument.record import special_tokens

    tokenizer = tiny.processor.tokenizer
    special = special_tokens(tiny.model)
    for token, wanted in (
        ("<|audio_pad|>", special.audio),
        ("<|image_pad|>", special.image),
        ("<|video_pad|>", special.video),
        ("<|audio_start|>", special.audio_start),
        ("<|vision_start|>", special.vision_start),
    ):
        assert tokenizer.convert_tokens_to_ids(token) == wanted
    assert special_tokens(tiny.thinker) == special  # a thinker-only model reads the same config


def test_a_new_capture_is_one_recorder_fed_each_forwards_place(tiny, all_media_conversation):
    """A recorder of any module's output sees the forward it runs in; its rows join the tokens table."""
    from omnilab.instrument.record import Recorder, Recording, TokensRecorder, Turn

    class LayerOutputNorms(Recorder):
        kind = "norms"

        def __init__(self):
            self.rows = []

        def attach(self, recording):
            layer = recording.model.thinker.model.language_model.layers[1]
            recording.on_output(layer, "thinker", self.receive)

        def receive(self, forward, output):
            hidden = output[0] if isinstance(output, tuple) else output
            norms = hidden[0].float().norm(dim=-1)
            self.rows += [(forward.phase, forward.start + i, float(n)) for i, n in enumerate(norms)]

    norms, tokens = LayerOutputNorms(), TokensRecorder()
    hooks = _hooks(tiny.model)
    with Recording(tiny.model, [tokens, norms]) as recording:
        reply = tiny.generate(all_media_conversation, max_new_tokens=3, return_audio=False)
    assert _hooks(tiny.model) == hooks
    table = recording.tables(Turn(tiny.processor.tokenizer))["tokens"]
    fed = set(table["pos"][table["component"] == "thinker"].tolist())
    assert {pos for _, pos, _ in norms.rows} == fed
    prompt = tiny.prepare(all_media_conversation)["input_ids"].shape[1]
    assert sum(phase == "prefill" for phase, _, _ in norms.rows) == prompt
    assert sum(phase == "decode" for phase, _, _ in norms.rows) == len(reply.token_ids) - 1


def test_one_tracer_refuses_a_second_run_and_keeps_the_first(tiny):
    from omnilab.errors import InterventionError

    with tiny.trace() as tracer:
        first = tiny.generate("Hello", max_new_tokens=3, return_audio=False)
        with pytest.raises(InterventionError, match="one Tracer records one run.*new lab.trace"):
            tiny.generate("Name three rivers.", max_new_tokens=3, return_audio=False)
    trace = tracer.trace
    top_k = trace.meta["components"]["thinker"]["top_k"]
    rows = trace.routing.groupby(["component", "layer", "pos"]).size()
    assert (rows == top_k).all()
    assert not trace.tokens.duplicated(["component", "pos"]).any()
    prompt = len(tiny.prepare("Hello")["input_ids"][0])
    assert trace.tokens["pos"].max() == prompt + len(first.token_ids) - 1
    assert trace.text == first.text


def test_meta_says_the_talker_positions_ignore_use_audio_in_video(tiny, data_dir):
    from omnilab.instrument.tracer import TALKER_POSITIONS_NOTE

    conversation = [{"role": "user", "content": [{"type": "video", "video": str(data_dir / "video.mp4")}]}]
    options = dict(max_new_tokens=2, max_speech_frames=2, trace=("positions",))
    meta = tiny.generate(conversation, use_audio_in_video=True, **options).trace.meta
    assert meta["use_audio_in_video"] is True and meta["talker_use_audio_in_video"] is False
    assert meta["notes"] == [TALKER_POSITIONS_NOTE] and "flat" in TALKER_POSITIONS_NOTE
    plain = tiny.generate(conversation, **options).trace.meta
    assert "talker_use_audio_in_video" not in plain and "notes" not in plain


def test_sites_resolve_aliases_globs_and_sets_and_name_the_closest_when_unknown(tiny):
    from omnilab.errors import InterventionError
    from omnilab.instrument.sites import resolve_sites

    resid = resolve_sites(tiny.model, "resid.*")
    assert [s.alias for s in resid] == ["resid.0", "resid.1", "resid.2", "resid.3"]
    assert resid[2].name == "thinker.model.language_model.layers.2"
    assert resolve_sites(tiny.model, ["thinker.model.language_model.layers.2", "resid.2"]) == [resid[2]]
    assert {s.kind for s in resolve_sites(tiny.model, "routing")} == {"router"}
    assert {s.alias for s in resolve_sites(tiny.model, "talker.resid.*")} == {
        "talker.resid.0",
        "talker.resid.1",
    }
    with pytest.raises(InterventionError, match=r"no site 'resid10'.*closest: resid\.1"):
        resolve_sites(tiny.model, "resid10")
