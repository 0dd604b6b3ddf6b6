"""The app's "Heads" view on the organism, without a browser: a speech question answered through the
app's job, its heads' audio/image attention mass as a table and a figure, and a head ablated through
the job (equal to the library's own `lab.intervene(set=head_ablation(...))`), bad specs refused."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from conftest_app import shared_organism

from apps.demo import heads, jobs
from apps.demo import session as sessions
from apps.demo.layout import build_app
from omnilab.errors import InterventionError, TraceError
from omnilab.instrument.units import head_ablation
from omnilab.organism.examples import examples

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = pytest.mark.usefixtures("app_env")


@pytest.fixture(scope="module")
def organism():
    return shared_organism()


@pytest.fixture(scope="module")
def speech(organism, tmp_path_factory):
    """A session whose last turn is the organism's speech example, with attention recorded."""
    row = next(r for r in examples(tmp_path_factory.mktemp("examples")) if r["task"] == "speech")
    session = sessions.Session()
    message = sessions.user_message(row["text"], audio=row["audio"])
    settings = sessions.settings(organism, speak=False, max_new_tokens=4, attention=True)
    jobs.run_turn(organism, session, message, settings, system="")
    return session


def test_the_heads_table_has_every_recorded_head_with_masses_in_0_1(organism, speech):
    table, figure, spec = heads.heads_view(speech)
    attention = speech.last.reply.trace.attention
    recorded = attention[attention["component"] == "thinker"]["layer"].unique()
    count = int(organism.model.config.thinker_config.text_config.num_attention_heads)
    expected = {(int(la), h) for la in recorded for h in range(count)}
    assert set(zip(table["layer"], table["head"], strict=True)) == expected and len(table) == len(expected)
    for modality in ("audio", "image"):
        assert table[modality].between(0.0, 1.0).all()
    assert table["image"].max() == 0.0  # a speech question has no image tokens to attend to
    top = table.loc[table["audio_rank"] == 1].iloc[0]
    assert top["audio"] > table["audio"].median()  # the top audio head listens more than the median head
    assert spec == f"{int(top['layer'])}: {int(top['head'])}"
    assert [t.type for t in figure.data] == ["heatmap", "heatmap"]
    assert np.nanmax(figure.data[0].z) == pytest.approx(table["audio"].max())


def test_the_heads_view_before_a_turn_and_without_attention():
    table, figure, spec = heads.heads_view(sessions.Session())
    assert table.empty and spec == "" and "send a message" in figure.layout.title.text


def test_a_turn_without_attention_says_how_to_record_it(organism, speech):
    session = sessions.Session()
    settings = sessions.settings(organism, speak=False, max_new_tokens=1, attention=False)
    jobs.run_turn(organism, session, speech.last.conversation[-1], settings, system="")
    with pytest.raises(TraceError, match="record attention"):
        heads.heads_table(session)


def test_ablating_the_top_audio_head_through_the_job_is_the_librarys_head_ablation(organism, speech):
    table = heads.heads_table(speech)
    spec = heads.top_head_spec(table)
    layer, head = (int(x) for x in spec.split(":"))
    original, ablated = jobs.ablate_heads_turn(organism, speech, spec)
    assert speech.ablated is ablated and original is speech.last
    last = speech.last
    with (
        organism.trace(capture=("routing",)) as tracer,
        organism.intervene(set=head_ablation(organism, {layer: [head]})),
    ):
        direct = organism.generate(last.conversation, **asdict(last.settings.generation))
    assert list(ablated.reply.token_ids) == list(direct.token_ids)
    routing = ablated.reply.trace.routing
    pd.testing.assert_frame_equal(
        routing.reset_index(drop=True), tracer.trace.routing.reset_index(drop=True), check_like=True
    )

    def prompt_after(frame):  # the prompt's routing at and after the zeroed head's layer
        rows = frame[(frame["phase"] == "prefill") & (frame["layer"] >= layer)]
        return rows.sort_values(["component", "layer", "pos", "rank"])["weight"].to_numpy()

    before, after = prompt_after(original.reply.trace.routing), prompt_after(routing)
    assert len(before) == len(after) > 0 and not np.array_equal(
        before, after
    )  # the zeroed head moves routing


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ("9: 0", "layer 9"),
        ("0: 17", "head 17"),
        ("0 3", "layer: heads"),
        ("", "layer: head"),
        ("a: 1", "whole"),
    ],
)
def test_a_bad_head_spec_is_refused_by_name(organism, speech, spec, named):
    with pytest.raises(InterventionError, match=named):
        jobs.ablate_heads_turn(organism, speech, spec)


def test_the_app_has_a_heads_tab_and_an_ablate_heads_endpoint(organism, speech):
    app = build_app(organism)
    handlers = {fn.api_name: fn for fn in app.fns.values()}
    figure, table, spec = handlers["heads"].fn(speech)
    assert spec == heads.top_head_spec(heads.heads_table(speech)) and len(table)
    out = handlers["ablate_heads"].fn(speech, spec)
    assert len(out) == 7 and out[0] == speech.last.reply.text and out[2] == speech.ablated.reply.text
    assert (
        handlers["ablate_heads"].concurrency_id == "model" and handlers["ablate_heads"].concurrency_limit == 1
    )
    button = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "ablate-heads")
    assert button.value == "Ablate heads and rerun the last turn"
