"""omnilab.plots: each figure has the expected traces, axes and hover text; export writes HTML and images."""

from __future__ import annotations

import numpy as np
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
