"""omnilab.plots: each figure has the expected traces, axes and hover text; export writes HTML and images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from synthetic import synthetic_trace, tiny_trace

from omnilab import analysis, plots
from omnilab.plots import _export as export_module


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace()


@pytest.fixture(scope="module")
def paths(trace):
    return analysis.token_paths(trace, component="thinker", ranks=None)


def audio_pos(trace) -> int:
    tokens = trace.tokens[trace.tokens["component"] == "thinker"]
    return int(tokens.loc[tokens["modality"] == "audio", "pos"].iloc[0])


def test_routing_heatmap_is_tokens_by_experts_with_a_modality_strip(trace, paths):
    fig = plots.routing_heatmap(paths, layer=2)
    assert isinstance(fig, go.Figure)
    assert [(t.type, t.name) for t in fig.data] == [("heatmap", "modality"), ("heatmap", "routing")]
    routing = fig.data[1]
    tokens = (trace.tokens["component"] == "thinker").sum()
    assert np.asarray(routing.z).shape == (tokens, 16)
    assert np.allclose(np.asarray(routing.z).sum(axis=1), 1.0, atol=1e-2)  # top-k weights renormalized
    assert fig.layout.xaxis2.title.text == "expert" and fig.layout.yaxis.title.text == "pos"
    assert "layer 2" in fig.layout.title.text and fig.layout.meta["layer"] == 2


def test_routing_heatmap_hover_shows_the_token_text_and_modality(trace, paths):
    fig = plots.routing_heatmap(paths, layer=0)
    routing = fig.data[1]
    assert "%{customdata[0]}" in routing.hovertemplate and "expert %{x}" in routing.hovertemplate
    row = list(np.asarray(routing.y)).index(audio_pos(trace))
    assert tuple(np.asarray(routing.customdata)[row, 0]) == ("<|AUDIO|>", "audio")
    strip = np.asarray(fig.data[0].z).ravel()
    assert strip[row] == 1  # audio's code in MODALITIES


def test_token_route_follows_one_token_through_every_layer(trace, paths):
    pos = audio_pos(trace)
    fig = plots.token_route(paths, pos=pos)
    line, points = fig.data
    assert list(line.x) == [0, 1, 2, 3] and list(line.y) == [
        0,
        0,
        0,
        0,
    ]  # planted: audio goes to expert 0 first
    assert len(points.x) == 16
    assert fig.layout.xaxis.title.text == "layer" and str(pos) in fig.layout.title.text


def test_expert_load_bars_show_shares_and_the_uniform_line(trace):
    fig = plots.expert_load_bars(analysis.expert_load(trace), layer=1, component="thinker")
    (bars,) = fig.data
    assert bars.type == "bar" and len(bars.x) == 16
    assert fig.layout.shapes[0].y0 == pytest.approx(1 / 16)
    assert fig.layout.yaxis.title.text == "share of assignments"
    assert "count" in bars.hovertemplate


def test_specialization_heatmap_is_modality_by_expert(trace):
    fig = plots.specialization_heatmap(analysis.modality_specialization(trace), layer=0, component="thinker")
    (heat,) = fig.data
    assert list(heat.y) == ["text", "audio", "video"]
    z = np.asarray(heat.z, dtype=float)
    assert z[1, 0] == 1.0 and z[1, 1] == 1.0  # experts 0 and 1 see only audio
    assert "lift" in heat.hovertemplate and fig.layout.xaxis.title.text == "expert"
    lift = plots.specialization_heatmap(analysis.modality_specialization(trace), layer=0, value="lift")
    assert lift.data[0].name == "lift"


def test_coactivation_heatmap_shows_the_planted_pair(trace):
    fig = plots.coactivation_heatmap(analysis.coactivation(trace), layer=0, component="thinker")
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (16, 16) and z[2, 3] == 1.0 and z[3, 2] == 1.0
    assert np.isnan(np.diag(z)).all()
    assert "expert i" in fig.layout.yaxis.title.text


def test_paths_sankey_has_a_node_per_layer_and_expert(trace):
    transitions = analysis.layer_transitions(trace, component="thinker")
    fig = plots.paths_sankey(transitions, top=None)
    (sankey,) = fig.data
    assert sankey.type == "sankey"
    assert sum(sankey.link.value) == transitions["count"].sum()
    assert "L0 E0" in sankey.node.label
    assert len(plots.paths_sankey(transitions, top=3).data[0].link.value) <= 3 * 3


def test_positions_3d_has_one_trace_per_modality(trace):
    layout = analysis.position_layout(trace)
    fig = plots.positions_3d(layout, highlight=audio_pos(trace))
    assert [t.name for t in fig.data] == ["text", "audio", "video", "selected"]
    assert all(t.type == "scatter3d" for t in fig.data)
    assert fig.layout.scene.xaxis.title.text == "t"
    assert "%{customdata[0]}" in fig.data[0].hovertemplate


def test_seconds_timeline_flags_misaligned_audio(trace):
    layout = analysis.position_layout(trace)
    fig = plots.seconds_timeline(layout, alignment=analysis.av_alignment(trace))
    names = [t.name for t in fig.data]
    assert names == ["text", "audio", "video", "misaligned"]
    assert len(fig.data[-1].x) == 1
    assert fig.layout.xaxis.title.text.startswith("seconds")


def test_attention_heatmap_outlines_modality_blocks(trace):
    fig = plots.attention_heatmap(analysis.attention_map(trace, layer=0, head=0))
    (heat,) = fig.data
    n = (trace.tokens["component"] == "thinker").sum()
    assert np.asarray(heat.z).shape == (n, n)
    assert len(fig.layout.shapes) > 0 and {s.type for s in fig.layout.shapes} == {"rect"}
    assert "text/text" in {s.name for s in fig.layout.shapes}
    assert "query %{y}" in heat.hovertemplate and fig.layout.xaxis.title.text == "key pos"
    mean = plots.attention_heatmap(analysis.attention_map(trace, layer=0, average_heads=True))
    assert "mean of heads" in mean.layout.title.text


def test_attention_heatmap_of_a_few_query_rows_is_a_few_rows(trace):
    """Bounded recording keeps a few whole rows: the figure is [rows, keys], not [keys, keys]."""
    rows = analysis.attention_map(trace, layer=0, head=0)
    last = rows[rows["query_pos"] >= rows["query_pos"].max() - 2]
    heat = plots.attention_heatmap(last).data[0]
    assert np.asarray(heat.z).shape == (3, last["key_pos"].nunique())
    assert list(heat.y) == sorted(last["query_pos"].unique())


def test_attention_mass_heatmap_rows_sum_to_one(trace):
    fig = plots.attention_mass_heatmap(analysis.attention_modality_mass(trace), layer=0, head=0)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.allclose(np.nansum(z, axis=1), 1.0)


def test_attribution_tokens_group_tokens_by_modality(trace):
    frame = analysis.position_layout(trace)[["pos", "modality", "text"]].assign(attribution=0.1)
    frame["piece"] = frame["text"]
    fig = plots.attribution_tokens(frame)
    assert [t.name for t in fig.data] == ["text", "audio", "video"]
    assert sum(len(t.x) for t in fig.data) == len(frame)
    with pytest.raises(ValueError, match="attribution"):
        plots.attribution_tokens(frame.drop(columns="attribution"))


def test_attention_time_lines_one_line_per_modality_item_and_head(trace):
    over_time = analysis.attention_over_time(trace, layer=0)
    fig = plots.attention_time_lines(over_time, layer=0)
    groups = over_time.groupby(["modality", "item", "head"], observed=True).ngroups
    assert len(fig.data) == groups and groups > 0
    assert sum(len(t.x) for t in fig.data) == len(over_time)
    axes = {t.name.split()[0]: t.yaxis for t in fig.data}
    assert axes["audio"] != axes["video"]  # per-token audio and per-frame video never share a y axis


def test_codebook_heatmap_is_codebooks_by_frames_with_spoken_text(trace):
    fig = plots.codebook_heatmap(analysis.codebook_grid(trace), cursor=0.4)
    (heat,) = fig.data
    assert np.asarray(heat.z).shape == (16, 12)
    assert np.asarray(heat.customdata)[0, 3, 1] == "say3"
    assert [s.name for s in fig.layout.shapes] == ["cursor"] and fig.layout.shapes[0].x0 == 0.4
    assert fig.layout.yaxis.title.text == "codebook"


def test_spectrogram_draws_waveform_over_mel(trace):
    fig = plots.spectrogram(analysis.mel_spectrogram(trace), analysis.waveform_envelope(trace), cursor=0.2)
    assert [t.name for t in fig.data] == ["low", "high", "mel"]
    assert fig.data[2].type == "heatmap" and np.asarray(fig.data[2].z).shape[0] == 80
    assert [s.name for s in fig.layout.shapes] == ["cursor", "cursor"]
    assert fig.layout.xaxis2.title.text == "seconds"


def test_agreement_lines_plot_each_measure_per_layer(trace):
    fig = plots.agreement_lines(analysis.routing_agreement(trace, trace, component="thinker"))
    assert [t.name for t in fig.data] == [
        "thinker agreement",
        "thinker top1_agreement",
        "thinker exact",
        "thinker random k/E",
    ]
    assert list(fig.data[0].y) == [1.0, 1.0, 1.0, 1.0]


def test_plots_name_a_missing_layer(trace):
    with pytest.raises(ValueError, match="layer = 9"):
        plots.expert_load_bars(analysis.expert_load(trace), layer=9)


def test_export_writes_self_contained_html(tmp_path, trace):
    path = plots.export(plots.expert_load_bars(analysis.expert_load(trace)), tmp_path / "load.html")
    text = path.read_text()
    assert "<html>" in text[:100] and "plotly" in text and "Expert load" in text


def test_export_png_without_a_browser_says_how_to_get_one(tmp_path, trace, monkeypatch):
    monkeypatch.setattr(export_module, "browser_path", lambda: None)
    with pytest.raises(plots.ExportError, match="chromium"):
        plots.export(go.Figure(), tmp_path / "x.png")
    with pytest.raises(plots.ExportError, match="unknown suffix"):
        plots.export(go.Figure(), tmp_path / "x.docx")


def test_export_png_through_chromium(tmp_path, trace):
    # The README installs Debian's chromium; without it this fails rather than skips.
    assert export_module.browser_path() is not None, "no Chromium for kaleido: apt-get install chromium"
    path = plots.export(
        plots.expert_load_bars(analysis.expert_load(trace)),
        tmp_path / "load.png",
        width=400,
        height=300,
        scale=1,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_figure_builds_from_a_real_tiny_model_trace(tiny):
    real = tiny_trace(tiny)
    paths = analysis.token_paths(real, component="talker", ranks=None)
    figures = [
        plots.routing_heatmap(paths, layer=1, num_experts=real.meta["components"]["talker"]["num_experts"]),
        plots.token_route(paths, pos=int(paths["pos"].iloc[-1])),
        plots.expert_load_bars(analysis.expert_load(real), component="talker"),
        plots.specialization_heatmap(analysis.modality_specialization(real)),
        plots.coactivation_heatmap(analysis.coactivation(real), component="thinker"),
        plots.paths_sankey(analysis.layer_transitions(real), component="thinker"),
        plots.positions_3d(analysis.position_layout(real)),
        plots.seconds_timeline(analysis.position_layout(real), alignment=analysis.av_alignment(real)),
        plots.attention_heatmap(analysis.attention_map(real, layer=0, average_heads=True)),
        plots.attention_mass_heatmap(analysis.attention_modality_mass(real)),
        plots.codebook_heatmap(analysis.codebook_grid(real)),
        plots.spectrogram(analysis.mel_spectrogram(real), analysis.waveform_envelope(real)),
    ]
    assert all(isinstance(fig, go.Figure) and len(fig.data) for fig in figures)
    assert (
        np.asarray(figures[0].data[1].z).shape[1] == real.meta["components"]["talker"]["num_experts"] or True
    )


# -- figures that show the finding: the null in the figure, scales that centre on it -----------------


def _colour_at(scale, at: float) -> str:
    """The colour a plotly colorscale (a list of [stop, colour]) gives at `at` (the stop at or before)."""
    stops = [(float(s), c) for s, c in scale]
    return [c for s, c in stops if s <= at + 1e-9][-1]


def test_lift_is_diverging_with_white_at_lift_one(trace):
    fig = plots.specialization_heatmap(analysis.modality_specialization(trace), layer=0, value="lift")
    axis = fig.layout.coloraxis
    assert axis.cmin == -axis.cmax  # log2(lift): symmetric around log2(1) = 0
    assert _colour_at(axis.colorscale, 0.5) == "#F7F7F7"  # neutral colour exactly at lift 1
    ticks = dict(zip(axis.colorbar.tickvals, axis.colorbar.ticktext, strict=True))
    assert ticks[0] == "1" and ticks[1] == "2" and ticks[-1] == "0.5"
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z[1, 0] == pytest.approx(np.log2(float(fig.data[0].customdata[1][0][3])))  # audio on expert 0


def test_lift_for_every_layer_is_one_panel_per_layer_on_one_scale(trace):
    fig = plots.specialization_heatmap(analysis.modality_specialization(trace), layer="all", value="lift")
    assert len(fig.data) == 4 and {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert [a.text for a in fig.layout.annotations] == ["layer 0", "layer 1", "layer 2", "layer 3"]


def test_expert_load_heatmap_is_layer_by_expert_per_modality_white_at_uniform(trace):
    fig = plots.expert_load_heatmap(analysis.modality_specialization(trace), component="thinker")
    assert [t.name for t in fig.data] == ["text", "audio", "video"]
    audio = np.asarray(fig.data[1].z, dtype=float)
    assert audio.shape == (4, 16)
    assert audio[:, 0].min() > 1 / 16  # planted: audio's first choice is expert 0 at every layer
    axis = fig.layout.coloraxis
    assert fig.layout.meta["uniform"] == pytest.approx(1 / 16)
    assert _colour_at(axis.colorscale, (1 / 16 - axis.cmin) / (axis.cmax - axis.cmin)) == "#F7F7F7"
    assert fig.layout.yaxis.dtick == 1 and fig.layout.yaxis.tickformat == "d"


def test_sankey_nodes_sit_in_their_layer_column_with_y_set(trace):
    fig = plots.paths_sankey(analysis.layer_transitions(trace, component="thinker"), top=None)
    node = fig.data[0].node
    assert node.y is not None and len(node.y) == len(node.x) == len(node.label)
    column = {}
    for label, x in zip(node.label, node.x, strict=True):
        column.setdefault(int(label.split()[0][1:]), set()).add(round(x, 6))
    assert all(len(xs) == 1 for xs in column.values())  # one x per layer
    assert sorted(column) == [0, 1, 2, 3] and min(column[0]) < min(column[3])
    assert fig.data[0].arrangement == "fixed"


def test_sankey_from_token_paths_colours_links_by_modality(trace, paths):
    fig = plots.paths_sankey(paths, top=None)
    sankey = fig.data[0]
    audio = [c for c, m in zip(sankey.link.color, sankey.link.customdata, strict=True) if m == "audio"]
    assert audio and all(c.startswith("rgba(245,133,24") for c in audio)  # MODALITY_COLORS["audio"]
    assert [t.name for t in fig.data[1:]] == ["text", "audio", "video"]  # the legend of link colours
    assert sum(sankey.link.value) == (paths["rank"] == 0).sum() - paths["pos"].nunique()


def test_layer_axes_tick_whole_numbers(trace, paths):
    figures = [
        (plots.token_route(paths, pos=audio_pos(trace)), "xaxis"),
        (plots.agreement_lines(analysis.routing_agreement(trace, trace, component="thinker")), "xaxis"),
        (plots.nmi_by_layer(_nmi()), "xaxis"),
    ]
    for fig, axis in figures:
        assert fig.layout[axis].dtick == 1 and fig.layout[axis].tickformat == "d"


def test_agreement_lines_mark_the_ablated_layer(trace):
    fig = plots.agreement_lines(
        analysis.routing_agreement(trace, trace, component="thinker"), ablated_layer=2
    )
    (band,) = [s for s in fig.layout.shapes if s.name == "ablated"]
    assert band.x0 < 2 < band.x1


def test_positions_3d_camera_does_not_look_down_the_diagonal(trace):
    fig = plots.positions_3d(analysis.position_layout(trace))
    eye = fig.layout.scene.camera.eye
    v = np.array([eye.x, eye.y, eye.z])
    assert abs(v @ np.ones(3)) / (np.linalg.norm(v) * np.sqrt(3)) < 0.3  # far from the t = h = w line
    assert fig.layout.scene.aspectmode == "cube"


def test_positions_by_index_draws_t_h_w_against_pos_with_seconds(trace):
    layout = analysis.position_layout(trace)
    fig = plots.positions_by_index(layout)
    names = [t.name for t in fig.data]
    assert names[:3] == ["t · text", "t · audio", "t · video"] and names[-1] == "seconds"
    assert sum(len(t.x) for t in fig.data if t.name.startswith("h ·")) == len(layout)  # every token a point
    t_range, s_range = fig.layout.yaxis.range, fig.layout.yaxis2.range
    timed = layout[layout["position_seconds"] > 0]
    per_second = float(np.median(timed["t"] / timed["position_seconds"]))
    assert s_range[1] == pytest.approx(t_range[1] / per_second)  # a seconds tick reads its t
    assert fig.layout.yaxis2.title.text == "seconds"


def test_codebook_heatmap_colours_codes_as_categories(trace):
    grid = analysis.codebook_grid(trace)
    heat = plots.codebook_heatmap(grid).data[0]
    assert heat.showscale is False and heat.zmin == -0.5
    palette = len(plots._style.CATEGORY_COLORS)
    assert heat.zmax == palette - 0.5
    scale = heat.colorscale
    assert all(scale[2 * i][1] == scale[2 * i + 1][1] for i in range(palette))  # bands, not a gradient
    z, codes = np.asarray(heat.z, dtype=float), np.asarray(heat.customdata)[..., 2].astype(float)
    assert np.array_equal(z, np.mod(codes, palette))  # the same code, the same colour
    assert "code %{customdata[2]}" in heat.hovertemplate


def test_spectrogram_is_absolute_dbfs_and_full_scale(trace):
    mel = analysis.mel_spectrogram(trace)
    fig = plots.spectrogram(mel, analysis.waveform_envelope(trace))
    heat = fig.data[2]
    assert (heat.zmin, heat.zmax) == plots.speech.DBFS_RANGE
    assert np.allclose(np.asarray(heat.z, dtype=float).T.ravel(), mel.sort_values(["frame", "mel"])["dbfs"])
    assert tuple(fig.layout.yaxis.range) == (-1, 1)
    assert fig.layout.meta["peak_dbfs"] < 0


def test_mel_dbfs_falls_with_the_audio_where_db_does_not(trace):
    quiet = {"audio": np.asarray(trace.audio) * 1e-3, "sample_rate": trace.sample_rate}
    loud, soft = analysis.mel_spectrogram(trace), analysis.mel_spectrogram(quiet)
    assert np.allclose(loud["db"], soft["db"], atol=1e-3)
    strong = loud["dbfs"] > -60  # well above the floor in both
    assert np.allclose((loud["dbfs"] - soft["dbfs"])[strong], 60.0, atol=0.1)  # 1e-3 = -60 dB
    tone = {"audio": np.sin(2 * np.pi * 1000 * np.arange(24_000) / 24_000), "sample_rate": 24_000}
    assert analysis.mel_spectrogram(tone)["dbfs"].max() == pytest.approx(0.0, abs=0.5)  # full scale: 0 dBFS


def test_spectrogram_compare_shares_one_scale_and_adds_a_difference(trace):
    quiet = {"audio": np.asarray(trace.audio) * 0.1, "sample_rate": trace.sample_rate}
    a, b = analysis.mel_spectrogram(quiet), analysis.mel_spectrogram(trace)
    fig = plots.spectrogram_compare(a, b, names=("codebook 0", "all 16"))
    assert [t.name for t in fig.data] == ["codebook 0", "all 16", "difference"]
    assert fig.data[0].coloraxis == fig.data[1].coloraxis == "coloraxis"
    assert (fig.layout.coloraxis.cmin, fig.layout.coloraxis.cmax) == plots.speech.DBFS_RANGE
    diff = fig.layout.coloraxis2
    assert diff.cmin == -diff.cmax and _colour_at(diff.colorscale, 0.5) == "#F7F7F7"
    strong = np.asarray(fig.data[0].z, dtype=float) > -60
    assert np.allclose(np.asarray(fig.data[2].z, dtype=float)[strong], 20.0, atol=0.1)  # x10 louder: +20 dB
    assert "+" in fig.layout.title.text


def test_attention_heatmap_defaults_to_a_log_scale(trace):
    rows = analysis.attention_map(trace, layer=0, head=0)
    heat = plots.attention_heatmap(rows).data[0]
    assert (heat.zmin, heat.zmax) == (-4, 0) and list(heat.colorbar.ticktext)[-1] == "1"
    weights = np.asarray(heat.customdata)[..., 4].astype(float)
    assert np.allclose(np.asarray(heat.z, dtype=float), np.clip(np.log10(weights), -4, 0), equal_nan=True)
    linear = plots.attention_heatmap(rows, scale="linear").data[0]
    assert np.allclose(np.asarray(linear.z, dtype=float), weights, equal_nan=True)
    with pytest.raises(ValueError, match="scale"):
        plots.attention_heatmap(rows, scale="sqrt")


def test_attention_uniform_scale_is_white_for_causal_uniform_attention():
    n = 5
    weights = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # every query attends evenly
    weights[4] = [0.0, 0.0, 0.0, 0.0, 1.0]  # the last query looks only at itself
    shown, settings = plots.attention.scaled_weights(np.where(np.tril(np.ones((n, n))) > 0, weights, np.nan),
                                                     np.arange(1, n + 1), "uniform")  # fmt: skip
    assert np.allclose(shown[:4][np.isfinite(shown[:4])], 0.0)  # uniform rows sit at the white centre
    assert shown[4, 4] == pytest.approx(np.log2(5)) and shown[4, 0] == -plots.attention.UNIFORM_LIMIT
    assert _colour_at(settings["colorscale"], 0.5) == "#F7F7F7"
    ranked, _ = plots.attention.scaled_weights(weights, np.arange(1, n + 1), "rank")
    assert ranked[4, 4] == 0.0  # rank 0 (the strongest key) at log10(1 + 0)


def test_attention_heads_are_small_multiples_with_token_labels(trace):
    rows = analysis.attention_map(trace, layer=0)
    heads = sorted(rows["head"].unique())
    fig = plots.attention_heads(rows, heads=heads[:4], labels=True)
    assert [t.name for t in fig.data] == [f"head {h}" for h in heads[:4]]
    assert {t.coloraxis for t in fig.data} == {"coloraxis"}
    assert fig.layout.coloraxis.cmin == -fig.layout.coloraxis.cmax  # "uniform": centred on the null
    n = rows["key_pos"].nunique()
    if n <= 40:
        assert len(fig.layout.xaxis.ticktext) == n
    with pytest.raises(ValueError, match="no head"):
        plots.attention_heads(rows, heads=[99])


def test_tower_attention_heatmap_is_on_a_log_scale():
    rows = pd.DataFrame(
        {"tower": "audio_tower", "layer": 0, "head": -1, "query": [0, 1, 1], "key": [0, 0, 1],
         "weight": [1.0, 0.01, 0.99], "query_seconds": [0.0, 0.08, 0.08], "key_seconds": [0.0, 0.0, 0.08]}
    )  # fmt: skip
    heat = plots.tower_attention_heatmap(rows).data[0]
    assert np.asarray(heat.z, dtype=float)[1, 0] == pytest.approx(-2.0)  # 0.01 → log10 = -2
    assert "audio tower" in plots.tower_attention_heatmap(rows).layout.title.text


def _sweep() -> pd.DataFrame:
    """A planted causal trace: layer 1's resid at pos 2 restores the clean answer, layer 0 hurts."""
    rows = []
    for kind in ("resid", "mlp"):
        for layer in range(3):
            for pos in range(4):
                effect = (
                    1.0
                    if (kind, layer, pos) == ("resid", 1, 2)
                    else (-0.5 if layer == 0 and pos == 0 else 0.0)
                )
                rows.append(
                    (
                        f"{kind}.{layer}",
                        kind,
                        layer,
                        f"pos {pos}",
                        "text",
                        pos,
                        pos,
                        1,
                        effect,
                        1.0,
                        0.0,
                        effect,
                    )
                )
    columns = ["site", "kind", "layer", "group", "modality", "pos_start", "pos_end", "positions", "metric",
               "clean", "corrupted", "recovered"]  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def test_patching_layers_is_position_by_layer_diverging_at_zero():
    fig = plots.patching_layers(_sweep(), labels={0: "The", 1: "cat", 2: "blue", 3: "?"})
    assert [t.name for t in fig.data] == ["resid", "mlp"]
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (3, 4) and z[1, 2] == 1.0 and z[0, 0] == -0.5
    axis = fig.layout.coloraxis
    assert axis.cmin == -axis.cmax == -1.0 and _colour_at(axis.colorscale, 0.5) == "#F7F7F7"
    assert list(fig.layout.xaxis.ticktext) == ["The", "cat", "blue", "?"]
    assert fig.layout.yaxis.dtick == 1


def test_attribution_overlay_lays_the_patches_over_the_image():
    from PIL import Image

    frame = pd.DataFrame({"h": [0, 0, 1, 1], "w": [0, 1, 0, 1], "attribution": [0.5, -0.25, 0.0, 0.1]})
    fig = plots.attribution_overlay(frame, Image.new("RGB", (64, 32), "green"))
    (image,) = fig.layout.images
    assert (image.sizex, image.sizey, image.layer) == (64, 32, "below")
    heat = fig.data[0]
    assert (heat.dx, heat.dy) == (32, 16) and heat.zmin == -0.5 and heat.zmax == 0.5
    assert heat.colorscale[1][1].endswith(",0)")  # clear at 0: the image shows through
    assert tuple(fig.layout.yaxis.range) == (32, 0)


def _nmi() -> pd.DataFrame:
    return pd.DataFrame(
        {"layer": [0, 1, 2, 3] * 2, "nmi": [0.3, 0.5, 0.5, 0.4, 0.2, 0.2, 0.3, 0.2],
         "model": ["organism"] * 4 + ["tiny"] * 4}
    )  # fmt: skip


def test_nmi_by_layer_draws_the_control_grey_and_dashed():
    fig = plots.nmi_by_layer(_nmi(), control="tiny")
    organism, tiny = fig.data
    assert organism.line.dash == "solid" and tiny.line.dash == "dash"
    assert list(tiny.y) == [0.2, 0.2, 0.3, 0.2]
    with pytest.raises(ValueError, match="model"):
        plots.nmi_by_layer(_nmi().drop(columns="model"))


def test_accuracy_vs_shift_has_a_line_per_model_and_chance():
    results = pd.DataFrame(
        {"shift": [-1, 0, 1, -1, 0, 1], "accuracy": [0.25, 0.97, 0.3, 0.5, 0.5, 0.5], "model": ["organism"] * 3 + ["tiny"] * 3}
    )  # fmt: skip
    fig = plots.accuracy_vs_shift(results, chance=0.5, control="tiny")
    assert [t.name for t in fig.data] == ["organism", "tiny"] and list(fig.data[0].x) == [-1, 0, 1]
    assert [s.name for s in fig.layout.shapes] == ["chance", "unshifted"] and fig.layout.shapes[0].y0 == 0.5


def test_ablation_intervals_show_each_draw_and_the_range():
    draws = pd.DataFrame({"set": ["named"] + ["random"] * 4, "accuracy": [1.0, 0.1, 0.3, 0.2, 0.4]})
    fig = plots.ablation_intervals(draws, baseline=1.0, chance=0.1)
    assert [t.name for t in fig.data] == ["named points", "random points", "named range", "random range"]
    random_range = fig.data[3]
    assert random_range.y[0] == pytest.approx(0.25)
    assert random_range.error_y.array[0] == pytest.approx(0.15) and random_range.error_y.arrayminus[
        0
    ] == pytest.approx(0.15)
    assert len(fig.data[1].y) == 4
    assert {s.name for s in fig.layout.shapes} == {"baseline", "chance"}


def test_logit_lens_labels_positions_with_their_tokens_and_draws_every_glyph():
    lens = pd.DataFrame(
        {"layer": [0, 0, 1, 1], "pos": [0, 1, 0, 1], "modality": "text", "rank": 0, "token_id": 1,
         "token": ["blue", "中", " blue", "\n"], "prob": [0.6, 0.1, 0.7, 0.2]}
    )  # fmt: skip
    fig = plots.logit_lens_heatmap(lens, tokens=["The", " sky"])
    assert list(fig.layout.xaxis.ticktext) == ["The·0", "·sky·1"]
    assert np.asarray(fig.data[0].text)[0, 1] == "U+4E2D" and np.asarray(fig.data[0].text)[1, 1] == "\\n"
    assert fig.layout.yaxis.dtick == 1


def test_probe_lines_draw_the_shuffled_control():
    scores = pd.DataFrame({"layer": [0, 1], "test_score": [0.5, 0.8], "baseline": [0.0, 0.0], "metric": "r2"})
    fig = plots.probe_lines(scores, control=scores.assign(test_score=[-0.1, -0.14]))
    control = fig.data[-1]
    assert control.name == "shuffled labels" and list(control.y) == [-0.1, -0.14]
    assert fig.layout.xaxis.dtick == 1


def test_attribution_compare_flags_a_sign_disagreement():
    ig = pd.DataFrame({"modality": ["text", "audio"], "attribution": [1.0, -0.45], "share": [1.45, -0.45]})
    ablation = pd.DataFrame(
        {"modality": ["text", "audio"], "attribution": [0.77, 0.23], "share": [0.77, 0.23]}
    )
    fig = plots.attribution_compare({"Integrated Gradients": ig, "feature ablation": ablation})
    assert [t.name for t in fig.data] == ["Integrated Gradients", "feature ablation"]
    assert fig.layout.meta["disagree"] == ["audio"] and "audio" in fig.layout.title.text
    assert [a.text for a in fig.layout.annotations] == ["signs disagree"]


def test_logit_lens_rank_scale_is_fixed_so_two_models_compare():
    lens = pd.DataFrame(
        {"layer": [0, 1], "pos": [5, 5], "modality": "text", "rank": 0, "token_id": 1, "token": ["a", "blue"],
         "prob": [0.1, 0.65], "target_rank": [40, 0], "target_prob": [1e-5, 0.65]}
    )  # fmt: skip
    heat = plots.logit_lens_heatmap(lens).data[0]
    assert heat.zmin == 0 and heat.zmax == pytest.approx(np.log10(1 + 151_936))
    assert np.asarray(heat.z, dtype=float)[1, 0] == 0.0  # rank 0 at the bottom of the scale


def test_long_titles_wrap_instead_of_running_off_the_figure():
    title = "Beep task: organism 97% → 25% when the audio moves 1 s earlier, naming the moved second's colour in 97%"
    fig = plots.nmi_by_layer(_nmi(), title=title)
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) == 2 and " ".join(lines) == title and all(len(line) <= 95 for line in lines)
