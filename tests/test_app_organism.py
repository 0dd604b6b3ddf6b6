"""The app on the organism (what `make demo` opens): its banner says what it knows, and one held-out
example of each task sits one click away, each answered correctly by the model behind the app."""

from __future__ import annotations

import gradio as gr
import pytest

import omnilab
from apps.demo import panels
from apps.demo.layout import build_app
from omnilab.organism.examples import examples


@pytest.fixture(scope="module")
def organism():
    return omnilab.load("organism")


def test_the_banner_says_what_the_organism_knows(organism):
    text = panels.banner(organism)
    assert "organism" in text and "What is in the picture?" in text and "random weights" not in text


def test_the_app_offers_an_example_of_each_task(organism):
    app = build_app(organism)
    datasets = [b for b in app.blocks.values() if isinstance(b, gr.Dataset)]
    assert len(datasets) == 1 and len(datasets[0].samples) == 5


def test_each_example_gets_its_answer(organism, tmp_path):
    for row in examples(tmp_path):
        content = [{"type": kind, kind: row[kind]} for kind in ("image", "audio", "video") if row[kind]]
        content.append({"type": "text", "text": row["text"]})
        reply = organism.generate(
            [{"role": "user", "content": content}],
            max_new_tokens=6,
            return_audio=False,
            use_audio_in_video=row["use_audio_in_video"],
        )
        assert reply.text.strip() == row["answer"], (row["task"], reply.text)
