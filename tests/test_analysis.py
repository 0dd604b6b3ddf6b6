"""omnilab.analysis: every analysis finds the structure planted in a synthetic trace, agrees with a
direct pandas computation, and accepts every input form (Trace, dict, attributes, prepared, store rows)."""

from __future__ import annotations

import dataclasses
import types
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from synthetic import AUDIO_ID, PPS, synthetic_trace, tiny_trace

from omnilab import analysis
from omnilab.errors import TraceError
from omnilab.trace import Trace


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace()


@pytest.fixture(scope="module")
def plain():
    """The same shapes with nothing planted."""
    return synthetic_trace(planted={}, seed=3)


@pytest.fixture(scope="module")
def repeating():
    return synthetic_trace(n_tokens=400, planted={"repetition": 0.6}, media=False, talker=False, seed=5)


def thinker(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["component"] == "thinker"]


# -- 1. expert load --------------------------------------------------------------------------------------


def test_expert_load_counts_match_a_direct_groupby(trace):
    load = analysis.expert_load(trace)
    direct = trace.routing.groupby(["component", "layer", "expert"]).size()
    merged = load.set_index(["component", "layer", "expert"])["count"]
    assert (merged[merged > 0] == direct.reindex(merged[merged > 0].index)).all()
    assert merged.sum() == len(trace.routing)


def test_expert_load_shares_sum_to_one_per_layer(trace):
    load = analysis.expert_load(trace)
    sums = load.groupby(["component", "layer"], observed=True)["share"].sum()
    assert np.allclose(sums, 1.0)
    assert np.allclose(load["uniform"], 1 / 16)


def test_planted_audio_experts_take_one_slot_per_audio_token(trace):
    audio_tokens = int((thinker(trace.tokens)["modality"] == "audio").sum())
    load = thinker(analysis.expert_load(trace))
    assert (load[load["expert"].isin([0, 1])]["count"] == audio_tokens).all()


def test_balance_loss_uses_exact_probabilities_from_router_logits(trace):
    balance = thinker(analysis.load_balance(trace))
    assert (balance["p_source"] == "router_logits").all()
    logits = thinker(trace.router_logits).copy()
    logits["logit"] = logits["logit"].astype(np.float64)
    logits["p"] = np.exp(logits["logit"] - logits.groupby(["layer", "pos"])["logit"].transform("max"))
    logits["p"] /= logits.groupby(["layer", "pos"])["p"].transform("sum")
    p_mean = logits.groupby(["layer", "expert"])["p"].mean()
    share = thinker(analysis.expert_load(trace)).set_index(["layer", "expert"])["share"]
    expected = (16 * (share * p_mean).groupby(level="layer").sum()).to_numpy()
    assert np.allclose(balance["balance_loss"].to_numpy(), expected, rtol=1e-3)


def test_balance_of_a_perfectly_even_router_is_perfect():
    experts, k, tokens = 8, 2, 16
    pos = np.repeat(np.arange(tokens), k)
    expert = (
        np.arange(tokens * k)
    ) % experts  # each expert exactly tokens*k/E times, distinct within a token
    routing = pd.DataFrame(
        {
            "component": "thinker",
            "layer": 0,
            "pos": pos,
            "phase": "prefill",
            "rank": np.tile([0, 1], tokens),
            "expert": expert,
            "weight": 0.5,
        }
    )
    balance = analysis.load_balance({"routing": routing, "meta": {"num_experts": experts}})
    row = balance.iloc[0]
    assert row["cv"] == pytest.approx(0.0)
    assert row["entropy_norm"] == pytest.approx(1.0)
    assert row["balance_loss"] == pytest.approx(1.0)
    assert row["p_source"] == "top-k weights"


# -- 2. modality specialization --------------------------------------------------------------------------


def test_experts_that_only_see_audio_are_found_audio_specific(trace):
    found = thinker(analysis.modality_experts(trace))
    for layer, rows in found.groupby("layer"):
        audio = rows[rows["modality"] == "audio"]
        assert set(audio["expert"]) == {0, 1}, f"layer {layer}"
        assert (audio["share"] == 1.0).all()


def test_an_unplanted_trace_has_no_modality_specific_experts(plain):
    assert len(thinker(analysis.modality_experts(plain))) == 0


def test_specialization_shares_match_routing_with_tokens(trace):
    joined = trace.routing_with_tokens()
    direct = joined.groupby(["component", "layer", "expert", "modality"]).size()
    spec = analysis.modality_specialization(trace)
    spec = spec[spec["count"] > 0].astype({"modality": str, "component": str})
    assert (
        spec.set_index(["component", "layer", "expert", "modality"])["count"]
        == direct.reindex(spec.set_index(["component", "layer", "expert", "modality"]).index)
    ).all()
    expert_total = spec.groupby(["component", "layer", "expert"])["share"].sum()
    assert np.allclose(expert_total, 1.0)


def test_modality_nmi_is_higher_with_planted_audio_experts(trace, plain):
    planted = thinker(analysis.modality_nmi(trace))["nmi"]
    unplanted = thinker(analysis.modality_nmi(plain))["nmi"]
    assert (planted > unplanted.mean() + 0.05).all()
    assert ((planted >= 0) & (planted <= 1)).all()


# -- 3. co-activation --------------------------------------------------------------------------------------


def test_planted_coactivation_is_certain_both_ways(trace):
    co = thinker(analysis.coactivation(trace))
    pair = co[(co["expert"] == 2) & (co["other"] == 3)]
    back = co[(co["expert"] == 3) & (co["other"] == 2)]
    assert len(pair) == 4 and (pair["p"] == 1.0).all() and (back["p"] == 1.0).all()
    assert np.allclose(pair["lift"], 1 / pair["baseline"])
    others = co[(co["expert"] >= 4) & (co["other"] >= 4)]
    assert others["p"].max() < 1.0


def test_coactivation_counts_match_a_direct_self_join(trace):
    routing = thinker(trace.routing)[["layer", "pos", "expert"]]
    pairs = routing.merge(routing, on=["layer", "pos"], suffixes=("", "_other"))
    pairs = pairs[pairs["expert"] != pairs["expert_other"]]
    direct = pairs.groupby(["layer", "expert", "expert_other"]).size()
    co = thinker(analysis.coactivation(trace)).set_index(["layer", "expert", "other"])["count"]
    co = co[co > 0]
    assert (co.to_numpy() == direct.reindex(co.index).to_numpy()).all()
    assert co.sum() == direct.sum()


# -- 4. repetition -----------------------------------------------------------------------------------------


def test_a_planted_repetition_rate_is_measured_exactly(repeating):
    rep = analysis.repetition(repeating)
    pairs = len(repeating.tokens) - 1
    assert (rep["pairs"] == pairs).all()
    assert np.allclose(rep["top1_repeat"], round(0.6 * pairs) / pairs)
    assert np.allclose(rep["baseline_top1"], 1 / 16) and np.allclose(rep["baseline_topk"], 4 / 16)
    assert (rep["topk_overlap"] >= rep["top1_repeat"] / 4).all()


def test_unplanted_repetition_is_near_the_random_baseline(plain):
    rep = thinker(analysis.repetition(plain))
    assert abs(rep["topk_overlap"].mean() - rep["baseline_topk"].iloc[0]) < 0.06


def test_repetition_by_modality_only_counts_pairs_within_a_modality(trace):
    rep = thinker(analysis.repetition(trace, by="modality"))
    audio = rep[rep["modality"] == "audio"]
    # every consecutive audio pair has both planted audio experts first: top-1 is expert 0 for all
    assert (audio["top1_repeat"] == 1.0).all()
    assert (audio["topk_overlap"] >= 0.5).all()
    total = thinker(analysis.repetition(trace))["pairs"].iloc[0]
    assert rep.groupby("layer")["pairs"].sum().max() < total


# -- 5. paths ----------------------------------------------------------------------------------------------


def test_layer_transitions_count_every_token_once_per_layer_pair(trace):
    tr = thinker(analysis.layer_transitions(trace))
    tokens = int((thinker(trace.tokens)).shape[0])
    assert (tr.groupby("layer")["count"].sum() == tokens).all()
    audio_tokens = int((thinker(trace.tokens)["modality"] == "audio").sum())
    stay = tr[(tr["expert"] == 0) & (tr["next_expert"] == 0)]
    assert (stay["count"] == audio_tokens).all() and (stay["share"] == 1.0).all()


def test_transitions_with_all_ranks_count_k_squared_pairs(trace):
    tr = thinker(analysis.layer_transitions(trace, ranks=4))
    assert (tr.groupby("layer")["count"].sum() == len(thinker(trace.tokens)) * 16).all()


def test_token_paths_are_the_routing_rows_of_a_token(trace):
    tokens = thinker(trace.tokens)
    pos = int(tokens.loc[tokens["modality"] == "audio", "pos"].iloc[3])
    paths = analysis.token_paths(trace, component="thinker", pos=pos, ranks=None)
    rows = trace.routing[(trace.routing["component"] == "thinker") & (trace.routing["pos"] == pos)]
    assert len(paths) == len(rows)
    assert (
        paths.sort_values(["layer", "rank"])["expert"].to_numpy()
        == rows.sort_values(["layer", "rank"])["expert"].to_numpy()
    ).all()
    assert set(paths["text"].astype(str)) == {"<|AUDIO|>"}


# -- 6. vocabulary -------------------------------------------------------------------------------------------


def test_a_token_id_always_routed_to_one_expert_has_specialization_one(trace):
    vocab = thinker(analysis.vocabulary_specialization(trace))
    planted = vocab[vocab["token_id"] == 4242]
    assert len(planted) == 4
    assert (planted["expert"] == 4).all() and (planted["specialization"] == 1.0).all()
    assert (planted["occurrences"] > 5).all()
    audio = vocab[vocab["token_id"] == AUDIO_ID]
    assert set(audio["expert"]) <= {0, 1} and (audio["specialization"] == 1.0).all()


def test_vocabulary_min_occurrences_drops_rare_ids(trace):
    vocab = analysis.vocabulary_specialization(trace, min_occurrences=5)
    assert (vocab["occurrences"] >= 5).all()


# -- 7. confidence -------------------------------------------------------------------------------------------


def test_router_confidence_matches_router_stats_by_modality_and_phase(trace):
    conf = thinker(analysis.router_confidence(trace))
    stats = thinker(trace.router_stats).merge(thinker(trace.tokens)[["pos", "modality"]], on="pos")
    direct = stats.groupby(["layer", "modality", "phase"])[["entropy", "topk_mass"]].mean()
    mine = conf.astype({"modality": str, "phase": str}).set_index(["layer", "modality", "phase"])
    assert np.allclose(mine["entropy"], direct.reindex(mine.index)["entropy"], rtol=1e-5)
    assert np.allclose(mine["topk_mass"], direct.reindex(mine.index)["topk_mass"], rtol=1e-5)


def test_sharpened_audio_routing_is_more_confident(trace):
    conf = thinker(analysis.router_confidence(trace))
    by = conf.groupby("modality", observed=True)["entropy_norm"].mean()
    assert by["audio"] < by["text"] - 0.2


# -- 8. agreement --------------------------------------------------------------------------------------------


def test_a_trace_agrees_with_itself_completely(trace):
    agree = analysis.routing_agreement(trace, trace)
    assert np.allclose(agree["agreement"], 1.0) and np.allclose(agree["exact"], 1.0)
    assert np.allclose(agree["top1_agreement"], 1.0)


def test_independent_routings_agree_near_chance(plain):
    other = synthetic_trace(planted={}, seed=11)
    agree = thinker(analysis.routing_agreement(plain, other))
    assert abs(agree["agreement"].mean() - agree["baseline"].iloc[0]) < 0.06
    per_token = analysis.routing_agreement(plain, other, by="token", component="thinker")
    assert len(per_token) == len(thinker(plain.tokens)) * 4
    assert np.allclose(
        per_token.groupby("layer")["agreement"].mean().to_numpy(), agree["agreement"].to_numpy()
    )


def test_agreement_after_changing_one_layer_drops_only_there(trace):
    routing = trace.routing.copy()
    layer2 = (routing["component"] == "thinker") & (routing["layer"] == 2)
    routing.loc[layer2, "expert"] = (routing.loc[layer2, "expert"] + 8) % 16
    changed = Trace.build(tokens=trace.tokens, routing=routing, meta=trace.meta)
    agree = thinker(analysis.routing_agreement(trace, changed)).set_index("layer")
    assert agree.loc[2, "agreement"] < 0.5
    assert np.allclose(agree.drop(index=2)["agreement"], 1.0)


# -- input forms ---------------------------------------------------------------------------------------------


def test_dicts_and_attribute_objects_give_the_same_answers(trace):
    as_dict = {
        "routing": trace.routing,
        "tokens": trace.tokens,
        "router_stats": trace.router_stats,
        "router_logits": trace.router_logits,
        "meta": trace.meta,
    }
    as_object = types.SimpleNamespace(**as_dict)
    prepared = analysis.prepare(trace)
    for fn in (analysis.expert_load, analysis.coactivation, analysis.repetition, analysis.router_confidence):
        expected = fn(trace)
        for source in (as_dict, as_object, prepared):
            pd.testing.assert_frame_equal(fn(source), expected)


def test_every_routing_analysis_takes_routing_data_and_answers_as_from_the_trace(trace):
    data = analysis.RoutingData.of(trace)
    assert analysis.RoutingData.of(data) is data  # made once, never re-read
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.meta = {}
    for name, fn in analysis.ROUTING_ANALYSES.items():
        pd.testing.assert_frame_equal(fn(data), fn(trace), obj=name)
        selected = {"component": "talker", "layer": [1]}
        pd.testing.assert_frame_equal(fn(data, **selected), fn(trace, **selected), obj=f"{name} (selected)")
    pd.testing.assert_frame_equal(
        analysis.routing_agreement(data, data, by="token"),
        analysis.routing_agreement(trace, trace, by="token"),
    )
    with pytest.raises(TraceError, match="already prepared"):
        analysis.RoutingData.of(data, phase="decode")


def test_row_order_does_not_change_any_routing_analysis(trace):
    shuffled = trace.routing.sample(frac=1.0, random_state=0).reset_index(drop=True)
    other = {
        "routing": shuffled,
        "tokens": trace.tokens,
        "router_stats": trace.router_stats,
        "router_logits": trace.router_logits,
        "meta": trace.meta,
    }
    for name, fn in analysis.ROUTING_ANALYSES.items():
        a, b = fn(trace), fn(other)
        pd.testing.assert_frame_equal(a, b, obj=name)


def test_store_rows_of_several_samples_are_kept_apart(repeating):
    tables = {}
    for name in ("routing", "tokens"):
        frame = getattr(repeating, name)
        tables[name] = pd.concat(
            [frame.assign(sample_id="a"), frame.assign(sample_id="b")], ignore_index=True
        )
    both = {**tables, "meta": repeating.meta}
    load = analysis.expert_load(both)
    assert (load["count"].to_numpy() == 2 * analysis.expert_load(repeating)["count"].to_numpy()).all()
    rep = analysis.repetition(both)
    single = analysis.repetition(repeating)
    assert (rep["pairs"] == 2 * single["pairs"]).all()  # no pair across the two samples
    assert np.allclose(rep["top1_repeat"], single["top1_repeat"])


def test_query_results_with_arrow_strings_and_float32_weights_work(trace):
    """DuckDB hands back Arrow-backed strings and no float16: the answers must not change."""
    strings = {"component": "str", "phase": "str"}
    routing = trace.routing.astype({**strings, "weight": "float32", "expert": "int64"}).assign(sample_id="s0")
    tokens = trace.tokens.astype({**strings, "modality": "str", "text": "str"}).assign(sample_id="s0")
    source = {"routing": routing, "tokens": tokens, "meta": trace.meta}
    for fn in (analysis.expert_load, analysis.modality_specialization, analysis.repetition):
        pd.testing.assert_frame_equal(
            fn(source), fn({**source, "routing": trace.routing, "tokens": trace.tokens})
        )


def test_missing_routing_rows_are_left_out_not_invented(trace):
    routing = trace.routing[~((trace.routing["pos"] == 5) & (trace.routing["rank"] == 3))]
    partial = {"routing": routing, "tokens": trace.tokens, "meta": trace.meta}
    load = analysis.expert_load(partial)
    assert load["count"].sum() == len(routing)
    assert len(analysis.token_paths(partial, pos=5, component="thinker", ranks=None)) == 4 * 3


def test_component_and_layer_select(trace):
    load = analysis.expert_load(trace, component="talker", layer=[1])
    assert set(load["component"]) == {"talker"} and set(load["layer"]) == {1}
    with pytest.raises(TraceError, match="no routing of component"):
        analysis.expert_load(trace, component="Thinker")


def test_an_empty_trace_gives_empty_tables_with_columns():
    empty = Trace.build()
    results = analysis.routing_suite(empty)
    assert all(len(frame) == 0 and len(frame.columns) > 2 for frame in results.values())
    for fn in (
        analysis.position_layout,
        analysis.av_alignment,
        analysis.attention_modality_mass,
        analysis.codebook_usage,
        analysis.codebook_grid,
        analysis.mel_spectrogram,
        analysis.spoken_text,
    ):
        assert len(fn(empty)) == 0


def test_routing_suite_runs_every_routing_analysis(trace):
    results = analysis.routing_suite(trace)
    assert set(results) == set(analysis.ROUTING_ANALYSES)
    assert all(len(frame) for name, frame in results.items())


# -- 9. positions -------------------------------------------------------------------------------------------


def test_the_misaligned_audio_token_is_flagged_and_only_it(trace):
    alignment = analysis.av_alignment(trace)
    audio = thinker(trace.tokens)[thinker(trace.tokens)["modality"] == "audio"].sort_values("pos")
    planted = int(audio["pos"].iloc[trace.meta["planted"]["misaligned"]])
    assert alignment.loc[~alignment["aligned"], "pos"].tolist() == [planted]
    bad = alignment[alignment["pos"] == planted].iloc[0]
    assert bad["offset"] == pytest.approx(trace.meta["planted"]["shift"] / PPS)
    assert (alignment["video_item"] == 0).all()


def test_each_audio_token_is_paired_with_the_video_frame_of_its_moment(trace):
    alignment = analysis.av_alignment(trace)
    # video frames last 1 s: audio at media time s falls in frame floor(s)
    expected = np.floor(alignment["media_seconds"] + 1e-9).astype(int)
    assert (alignment["video_frame"].to_numpy() == expected.to_numpy()).all()


def test_position_layout_times_tokens(trace):
    layout = analysis.position_layout(trace)
    audio = layout[layout["modality"] == "audio"]
    video = layout[layout["modality"] == "video"]
    assert np.allclose(audio["seconds_per_token"].median(), 1 / PPS)
    assert np.allclose(video["seconds_per_token"], 1.0 / 4)  # a 1 s frame shared by 2x2 patches
    assert layout["seconds_per_token"][layout["modality"] == "text"].isna().all()
    assert (layout["t_step"][layout["modality"] == "text"].iloc[1:5] == 1).all()
    assert np.allclose(layout["position_seconds"], layout["t"] / PPS)


# -- 10. attention ------------------------------------------------------------------------------------------


def test_planted_attention_mass_on_audio_is_measured(trace):
    mass = analysis.attention_modality_mass(trace)
    text_to_audio = mass[(mass["query_modality"] == "text") & (mass["key_modality"] == "audio")].set_index(
        "head"
    )
    tokens = thinker(trace.tokens)
    after = tokens["pos"] > tokens.loc[tokens["modality"] == "audio", "pos"].max()
    text = tokens["modality"] == "text"
    expected = 0.7 * (text & after).sum() / text.sum()
    assert text_to_audio.loc[0, "mass"] == pytest.approx(expected, rel=1e-6)
    assert text_to_audio.loc[1, "mass"] < expected
    per_query = mass.groupby(["layer", "head", "query_modality"], observed=True)["mass"].sum()
    assert np.allclose(per_query, 1.0)


def test_attention_over_time_adds_up_to_the_modality_mass(trace):
    over_time = analysis.attention_over_time(trace, modality="audio", query_modality="text")
    mass = analysis.attention_modality_mass(trace)
    total = over_time.groupby("head")["mass"].sum()
    expected = mass[(mass["query_modality"] == "text") & (mass["key_modality"] == "audio")].set_index("head")[
        "mass"
    ]
    assert np.allclose(total.to_numpy(), expected.reindex(total.index).to_numpy())
    assert len(over_time[over_time["head"] == 0]) == 4 * PPS  # one row per audio token: 4 s, 13 a second


def test_attention_map_averages_heads(trace):
    both = analysis.attention_map(trace, layer=0)
    mean = analysis.attention_map(trace, layer=0, average_heads=True)
    assert (mean["head"] == -1).all()
    assert len(mean) == len(both) // 2
    # weights are stored float16: a row of positive weights sums to 1 within its rounding, 2**-11
    assert np.allclose(mean.groupby("query_pos")["weight"].sum(), 1.0, atol=5e-4)


# -- 12. speech ---------------------------------------------------------------------------------------------


def test_a_collapsed_codebook_has_zero_entropy(trace):
    usage = analysis.codebook_usage(trace).set_index("codebook")
    assert (
        usage.loc[15, "entropy"] == 0 and usage.loc[15, "codes_used"] == 1 and usage.loc[15, "top_share"] == 1
    )
    assert (usage.drop(index=15)["entropy_norm"] > 0.9).all()
    assert (usage["frames"] == 12).all()


def test_frame_i_speaks_reply_token_i(trace):
    spoken = analysis.spoken_text(trace)
    assert spoken["text"].tolist() == [f"say{i}" for i in range(12)]
    assert np.allclose(spoken["end"] - spoken["start"], 0.08)
    grid = analysis.codebook_grid(trace)
    assert len(grid) == 12 * 16 and (grid[grid["frame"] == 3]["text"] == "say3").all()


def test_mel_spectrogram_finds_the_planted_tones(trace):
    mel = analysis.mel_spectrogram(trace)
    peak = mel.loc[mel.groupby("frame")["db"].idxmax()]
    first = peak[peak["seconds"] < 0.4]["hz"].median()
    second = peak[peak["seconds"] > 0.6]["hz"].median()
    assert 800 < first < 1250 and 2600 < second < 3500
    assert mel["db"].max() == pytest.approx(0.0)


def test_mel_spectrogram_of_near_silent_speech_keeps_its_shape(trace):
    """Random-weight talkers peak near 1e-6: the picture must be the same as at full scale."""
    quiet = replace(trace, audio=trace.audio * 1e-6)
    loud, soft = analysis.mel_spectrogram(trace), analysis.mel_spectrogram(quiet)
    assert soft["db"].std() > 1.0
    assert np.allclose(loud["db"], soft["db"], atol=1e-3)


def test_waveform_envelope_brackets_the_samples(trace):
    env = analysis.waveform_envelope(trace, points=100)
    assert len(env) == 100 and (env["low"] <= env["high"]).all()
    assert env["high"].max() == pytest.approx(float(trace.audio.max()))


# -- benchmark -------------------------------------------------------------------------------------------------


def test_bench_reports_seconds_per_analysis_total_and_target():
    from omnilab.bench import analysis as bench

    report = bench.run(tokens=2_000, layers=4, experts=32, top_k=4)
    assert set(report["seconds"]) == {"prepare", *analysis.ROUTING_ANALYSES}
    assert report["routing_rows"] == 2_000 * 4 * 4
    assert report["target_s"] == 10.0 and report["pass"] is True
    assert report["total_s"] == pytest.approx(sum(report["seconds"].values()), abs=0.01)


# -- a real trace of the tiny model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tiny):
    return tiny_trace(tiny)


def test_the_suite_runs_on_a_real_tiny_model_trace(real):
    results = analysis.routing_suite(real)
    for name, frame in results.items():
        if name != "modality_experts":  # random weights: no expert need be modality-specific
            assert set(frame["component"].astype(str)) == {"thinker", "talker"}, name
    load = results["expert_load"]
    assert load["count"].sum() == len(real.routing)
    assert (results["load_balance"]["p_source"] == "router_logits").all()
    talker = results["load_balance"].query("component == 'talker'")
    assert (talker["experts"] == real.meta["components"]["talker"]["num_experts"]).all()
    for component, rows in results["repetition"].groupby("component", observed=True):
        info = real.meta["components"][component]
        assert np.allclose(rows["baseline_topk"], info["top_k"] / info["num_experts"])


def test_prepare_by_phase_splits_the_routing_into_prompt_and_reply(real):
    by_phase = {p: analysis.expert_load(analysis.prepare(real, phase=p)) for p in ("prefill", "decode")}
    for phase, load in by_phase.items():
        assert load["count"].sum() == (real.routing["phase"] == phase).sum(), phase
    keys = ["component", "layer", "expert"]
    both = (
        by_phase["prefill"].merge(by_phase["decode"], on=keys, suffixes=("_p", "_d"), how="outer").fillna(0)
    )
    whole = analysis.expert_load(real).merge(both, on=keys)
    assert (whole["count"] == whole["count_p"] + whole["count_d"]).all()
    with pytest.raises(TraceError, match="unknown phase"):
        analysis.prepare(real, phase="training")


def test_real_audio_in_video_is_aligned_and_paired(real):
    alignment = analysis.av_alignment(real)
    audio = real.tokens.query("component == 'thinker' and modality == 'audio'")
    assert len(alignment) == len(audio) > 0
    assert alignment["aligned"].all() and (alignment["video_item"] == 0).all()
    assert np.allclose(alignment["offset"], 0.0, atol=1e-9)


def test_real_attention_and_speech_analyses(real):
    mass = analysis.attention_modality_mass(real)
    assert np.allclose(
        mass.groupby(["layer", "head", "query_modality"], observed=True)["mass"].sum(), 1.0, atol=1e-4
    )
    spoken = analysis.spoken_text(real)
    assert len(spoken) == real.codes["frame"].nunique() and len(spoken) > 0
    assert len(analysis.codebook_usage(real)) == 16
    assert len(analysis.mel_spectrogram(real)) > 0
    layout = analysis.position_layout(real)
    assert set(layout["modality"].astype(str)) == {"text", "audio", "video"}
