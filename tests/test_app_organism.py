"""The app on the organism (what `make demo` opens): its banner says what it knows, its settings start
from what it was trained with, and every example it offers is answered correctly, clicked and sent
through the app's own handlers with the app's defaults."""

from __future__ import annotations

import gradio as gr
import pytest
from conftest_app import shared_organism

from apps.demo import panels
from apps.demo.layout import build_app
from omnilab.models.presets import QWEN_SYSTEM, system_prompt
from omnilab.organism.examples import examples

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = pytest.mark.usefixtures("app_env")


@pytest.fixture(scope="module")
def organism():
    return shared_organism()


@pytest.fixture(scope="module")
def app(organism):
    return build_app(organism)


def _handler(app, name: str):
    return next(fn for fn in app.fns.values() if fn.api_name == name)


def _example_click(app):
    """The example Dataset and the handler Gradio runs when an example is clicked (the Dataset's
    preprocessed click: (index, sample)) -> the inputs' updates."""
    dataset = next(b for b in app.blocks.values() if isinstance(b, gr.Dataset))
    click = next(fn for fn in app.fns.values() if fn.targets and fn.targets[0][0] == dataset._id)
    return dataset, click


def test_the_banner_says_what_the_organism_knows(organism):
    text = panels.banner(organism)
    assert "organism" in text and "What is in the picture?" in text and "random weights" not in text


def test_each_model_has_the_system_prompt_it_was_trained_with():
    assert system_prompt("organism") == ""  # trained on its world's conversations, no system message
    assert system_prompt("Qwen/Qwen3-Omni-30B-A3B-Instruct") == QWEN_SYSTEM
    assert system_prompt("omnilab/tiny") == QWEN_SYSTEM


def test_the_settings_show_the_organisms_own_system_prompt(app):
    box = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "system")
    assert box.value == "" and "none" in box.info and "trained without" in box.info
    reply = _handler(app, "reply")
    assert reply.fn.__signature__.parameters["system"].default == ""  # scripts get the same default


def test_every_example_clicked_and_sent_with_the_defaults_gets_its_answer(app, tmp_path):
    """Each example as a browser sends it: the click handler fills the inputs, every other input keeps
    the value the page starts with (speech on, the default system prompt, greedy), then /reply."""
    answers = {row["text"]: row["answer"] for row in examples(tmp_path)}
    dataset, click = _example_click(app)
    reply = _handler(app, "reply")
    assert len(dataset.samples) == len(answers)
    wrong = []
    for index in range(len(dataset.samples)):
        values = {block._id: block.value for block in reply.inputs}
        values[reply.inputs[-1]._id] = None  # the session State: a new browser session
        for block, update in zip(click.outputs, click.fn(dataset.preprocess(index)), strict=True):
            values[block._id] = update.get("value")
        text, wav, _, session = reply.fn(*(values[block._id] for block in reply.inputs))
        assert session.last.conversation[0]["role"] == "user"  # no system message
        assert wav is not None and session.last.reply.codes is not None  # spoken: speech was on
        question = values[reply.inputs[0]._id]
        if text.strip() != answers[question]:
            wrong.append((question, text, answers[question]))
    assert not wrong
