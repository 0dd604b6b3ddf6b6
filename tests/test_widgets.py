"""omnilab.widgets: explorers build their figures and keep them in step when driven from Python."""

from __future__ import annotations

import numpy as np
import pytest
from plotly.callbacks import Points
from synthetic import synthetic_trace, tiny_trace

from omnilab import analysis, plots
from omnilab.widgets import PositionExplorer, RoutingExplorer, SpeechExplorer


@pytest.fixture(scope="module")
def trace():
    return synthetic_trace()


@pytest.fixture(scope="module")
def audio_pos(trace):
    tokens = trace.tokens[trace.tokens["component"] == "thinker"]
    return int(tokens.loc[tokens["modality"] == "audio", "pos"].iloc[2])


@pytest.fixture
def routing(trace):
    return RoutingExplorer(trace)


def test_routing_explorer_starts_at_the_first_layer_of_the_thinker(routing):
    assert routing.component.value == "thinker" and routing.layer.value == 0
    assert routing.figure.layout.meta["layer"] == 0
    assert [t.name for t in routing.figure.data] == ["modality", "routing"]


def test_moving_the_layer_slider_redraws_the_heatmap(routing, trace):
    routing.layer.value = 3
    expected = plots.routing_heatmap(analysis.token_paths(trace, component="thinker", ranks=None), layer=3)
    assert routing.figure.layout.meta["layer"] == 3 and "layer 3" in routing.figure.layout.title.text
    assert np.array_equal(np.asarray(routing.figure.data[1].z), np.asarray(expected.data[1].z))


def test_select_shows_a_tokens_route_through_all_layers(routing, audio_pos):
    routing.select(audio_pos)
    assert routing.selected == audio_pos
    assert str(audio_pos) in routing.route.layout.title.text
    assert list(routing.route.data[0].y) == [0, 0, 0, 0]  # audio's planted first choice at every layer
    assert "audio" in routing.info.value
    marks = [s for s in routing.figure.layout.shapes if s.name == "selected"]
    assert len(marks) == 1 and marks[0].y0 == audio_pos - 0.5


def test_clicking_a_token_in_the_heatmap_selects_it(routing):
    heatmap = routing.figure.data[1]
    heatmap._dispatch_on_click(Points(point_inds=[[7, 2]], xs=[2], ys=[7], trace_index=1), None)
    assert routing.selected == 7 and "pos 7" in routing.route.layout.title.text


def test_selecting_a_token_without_routing_is_refused(routing):
    with pytest.raises(ValueError, match="pos 9999"):
        routing.select(9999)


def test_switching_to_the_talker_shows_its_layers(routing):
    routing.component.value = "talker"
    assert list(routing.layer.options) == [0, 1] and routing.layer.value == 0
    assert "talker" in routing.figure.layout.title.text
    routing.layer.value = 1
    assert routing.figure.layout.meta["layer"] == 1


def test_position_explorer_highlights_a_selected_token(trace, audio_pos):
    explorer = PositionExplorer(trace)
    assert [t.name for t in explorer.figure.data] == ["text", "audio", "video", "misaligned"]
    explorer.select(audio_pos)
    assert explorer.figure.data[-1].name == "selected"
    assert f"pos {audio_pos}" in explorer.info.value and "aligned" in explorer.info.value
    explorer.view.value = "3-D"
    assert {t.type for t in explorer.figure.data} == {"scatter3d"} and explorer.figure.data[
        -1
    ].name == "selected"


def test_position_explorer_names_a_misaligned_token(trace):
    explorer = PositionExplorer(trace)
    flagged = analysis.av_alignment(trace).query("not aligned")["pos"].iloc[0]
    explorer.select(int(flagged))
    assert "misaligned" in explorer.info.value


def test_speech_explorer_plays_the_reply(trace):
    explorer = SpeechExplorer(trace)
    assert explorer.player.value[:4] == b"RIFF" and explorer.player.format == "wav"
    assert explorer.time.max == pytest.approx(12 * 0.08)


def test_moving_the_time_cursor_moves_both_figures(trace):
    explorer = SpeechExplorer(trace)
    explorer.time.value = 0.5
    cursors = [
        s.x0 for f in (explorer.codes, explorer.spectrum) for s in f.layout.shapes if s.name == "cursor"
    ]
    assert cursors == [0.5, 0.5, 0.5]
    assert explorer.frame == 6 and "say6" in explorer.info.value


def test_select_frame_and_clicking_the_grid_move_the_cursor(trace):
    explorer = SpeechExplorer(trace)
    explorer.select_frame(3)
    assert explorer.frame == 3 and "say3" in explorer.info.value
    explorer.codes.data[0]._dispatch_on_click(
        Points(point_inds=[[0, 9]], xs=[0.72], ys=[0], trace_index=0), None
    )
    assert explorer.frame == 9


def test_explorers_follow_a_real_tiny_model_trace(tiny):
    real = tiny_trace(tiny)
    routing = RoutingExplorer(real, component="talker")
    routing.layer.value = 1
    assert routing.figure.layout.meta == {"layer": 1, "component": "talker"}
    positions = PositionExplorer(real)
    assert [t.name for t in positions.figure.data] == ["text", "audio", "video"]  # nothing misaligned
    speech = SpeechExplorer(real)
    speech.select_frame(2)
    assert speech.frame == 2
