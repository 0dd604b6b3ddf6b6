"""The talker never crashes on what the thinker says: a talker that ends its speech at once (the
organism's, on a picture of a red circle, which crashed /reply), replies of special tokens only, and
the same through the app's turn. (An empty reply: tests/test_foundation.py.)"""

from __future__ import annotations

import contextlib

import pytest
from conftest_app import shared_lab, shared_organism
from PIL import Image, ImageDraw

from apps.demo import jobs, panels
from apps.demo import session as sessions

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = pytest.mark.usefixtures("app_env")

SHORT = dict(max_new_tokens=3, max_speech_frames=2)
LONGER = dict(max_new_tokens=6, max_speech_frames=2)


@pytest.fixture(scope="module")
def red_circle(tmp_path_factory):
    """The picture that crashed /reply with speech on: a red circle on white."""
    image = Image.new("RGB", (224, 224), "white")
    ImageDraw.Draw(image).ellipse((50, 50, 174, 174), fill="red")
    path = tmp_path_factory.mktemp("talker") / "red-circle.png"
    image.save(path)
    return path


def _picture_question(path) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(path)},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]


def _streamed(lab, conversation, **options):
    return next(e for e in lab.stream(conversation, **options) if e.kind == "done").reply


@contextlib.contextmanager
def talker_ends_at_once(lab):
    """Make the talker's end code its first choice (a hook on its codec head, removed after)."""
    end = lab.model.config.talker_config.codec_eos_token_id

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., end] = 1e4
        return logits

    handle = lab.model.talker.codec_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def thinker_says(lab, ids: list[int]):
    """Make the thinker generate `ids` (then repeat the last), whatever it would have said."""
    calls = []

    def hook(module, args, logits):
        logits = logits.clone()
        logits[..., ids[min(len(calls), len(ids) - 1)]] = 1e4
        calls.append(1)
        return logits

    handle = lab.thinker.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_a_talker_that_ends_at_once_gives_the_reply_with_empty_speech_in_generate_and_stream():
    lab = shared_lab()
    silent = lab.generate("Hello", return_audio=False, **SHORT)
    with talker_ends_at_once(lab):
        spoken, streamed = lab.generate("Hello", **SHORT), _streamed(lab, "Hello", **SHORT)
    for reply in (spoken, streamed):
        assert reply.token_ids == silent.token_ids and reply.text == silent.text
        assert len(reply.audio) == 0 and reply.codes.shape == (0, lab.num_codebooks)


def test_a_reply_of_special_tokens_only_is_spoken_without_crashing():
    lab = shared_lab()
    ids = [
        151643,
        151655,
        151669,
        151675,
        151645,
    ]  # <|endoftext|> <|image_pad|> <|audio_start|> <|audio_pad|>, end
    replies = []
    for run in (lambda: lab.generate("Hello", **LONGER), lambda: _streamed(lab, "Hello", **LONGER)):
        with thinker_says(lab, ids):
            replies.append(run())
    for reply in replies:
        assert reply.text == "" and reply.token_ids == ids
        assert reply.audio is not None and len(reply.codes) == len(replies[0].codes)


def test_the_organism_answers_a_red_circle_with_speech_on(red_circle):
    """The exact input that raised "stack expects a non-empty TensorList" in /reply."""
    organism = shared_organism()
    conversation = _picture_question(red_circle)
    text = organism.generate(conversation, return_audio=False, max_new_tokens=6).text
    spoken = organism.generate(conversation, max_new_tokens=6)
    streamed = _streamed(organism, conversation, max_new_tokens=6)
    assert spoken.text == streamed.text == text and text.strip()
    assert len(spoken.codes) == len(streamed.codes)
    assert (len(spoken.audio) == 0) == (len(spoken.codes) == 0)


def test_the_apps_turn_on_a_red_circle_with_speech_on_answers_and_its_panels_show(red_circle):
    organism = shared_organism()
    session = sessions.Session()
    message = sessions.user_message("What is in the picture?", image=red_circle)
    turn = jobs.run_turn(
        organism, session, message, sessions.settings(organism, speak=True, max_new_tokens=6)
    )
    assert turn.reply.text.strip() and turn.reply.audio is not None
    figures = panels.all_figures(session)
    assert set(figures) == set(panels.FIGURES)
    wav = panels.write_wav(turn.reply, session.output_folder())
    assert (wav is None) == (len(turn.reply.audio) == 0)
    session.close()
