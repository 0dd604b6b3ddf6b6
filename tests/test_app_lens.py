"""The app's logit-lens panel: the lens of the last turn, read on request (thin over the library)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest_app import DATA, FAST, shared_lab

from apps.demo import jobs, panels
from apps.demo import session as sessions
from omnilab.errors import ConversationError

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = pytest.mark.usefixtures("app_env")


@pytest.fixture(scope="module")
def lab():
    return shared_lab()


@pytest.fixture(scope="module")
def turned(lab):
    session = sessions.Session()
    message = sessions.user_message("what is this?", image=DATA / "image.png")
    jobs.run_turn(lab, session, message, sessions.settings(lab, **FAST))
    return session


def test_the_lens_panel_reads_the_last_turns_prompt_and_predicts_its_reply(lab, turned):
    lens = jobs.lens_turn(lab, turned, positions=12)
    layers = len(lab.thinker.model.language_model.layers)
    assert lens["pos"].nunique() == 12 and lens["layer"].nunique() == layers
    last = lens[(lens["layer"] == layers - 1) & (lens["pos"] == lens["pos"].max())]
    assert last["token_id"].tolist() == turned.last.reply.token_ids[:1]  # greedy: the reply's first token
    fig = panels.lens_figure(turned, lens)
    assert np.asarray(fig.data[0].z).shape == (layers, 12)
    assert not fig.layout.annotations  # a chart, not a note


def test_the_lens_panel_says_what_to_do_before_a_turn_and_before_reading(lab, turned):
    assert "send a message" in panels.lens_figure(sessions.Session()).layout.annotations[0].text
    assert "press Read the logit lens" in panels.lens_figure(turned).layout.annotations[0].text
    with pytest.raises(ConversationError, match="send a message first"):
        jobs.lens_turn(lab, sessions.Session())


def test_the_app_wires_the_lens_button_as_a_model_job(lab):
    from apps.demo.layout import build_app

    app = build_app(lab)
    (lens,) = [fn for fn in app.fns.values() if fn.api_name == "logit_lens"]
    assert lens.api_visibility == "public"
    assert lens.concurrency_id == "model" and lens.concurrency_limit == 1  # a model job, one at a time
