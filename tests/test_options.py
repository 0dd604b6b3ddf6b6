"""GenerationOptions: one declaration of a turn's settings, taken alike by generate, stream and collect."""

from __future__ import annotations

import importlib
import inspect

import pytest

from omnilab.errors import ConversationError
from omnilab.options import NAMES, GenerationOptions

HELLO = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]


def test_lab_options_resolve_speech_and_check_the_speaker_once(tiny):
    assert tiny.options().return_audio is True  # the tiny preset has a talker
    assert tiny.options(return_audio=False).return_audio is False
    with pytest.raises(ConversationError, match="unknown speaker 'Nobody'"):
        tiny.options(speaker="Nobody")
    with pytest.raises(ConversationError, match="unknown generation option"):
        tiny.options(max_tokens=3)
    with pytest.raises(ConversationError, match="options must be a GenerationOptions"):
        tiny.options({"max_new_tokens": 3})


def test_generation_kwargs_come_from_the_options(tiny):
    inputs = tiny.prepare(HELLO)
    options = GenerationOptions(max_new_tokens=5, do_sample=True, top_k=7, max_speech_frames=9)
    kwargs = tiny.generation_kwargs(inputs, options)
    assert kwargs["thinker_max_new_tokens"] == 5 and kwargs["thinker_top_k"] == 7
    # 9 frames take 10 talker steps: the last codebook-0 token is never completed by the code predictor
    assert kwargs["talker_max_new_tokens"] == 10 and kwargs["talker_do_sample"] is True
    assert tiny.generation_kwargs(inputs, options, speech_do_sample=False)["talker_do_sample"] is False
    assert "speaker" not in tiny.generation_kwargs(inputs, return_audio=False)


def test_collect_runs_each_sample_with_the_options_and_its_own_length(tiny):
    from omnilab.store.manifest import Sample

    collect_module = importlib.import_module("omnilab.store.collect")  # the package exports the function

    parameters = inspect.signature(collect_module.collect).parameters
    assert parameters["options"].default is None
    sample = Sample("s0", HELLO)
    options = GenerationOptions(max_new_tokens=60, return_audio=True)  # generate=3 and the capture win
    result = collect_module.run_sample(
        tiny, sample, capture=("routing", "positions"), generate=3, options=options
    )
    assert result.ok
    reference = tiny.generate(HELLO, max_new_tokens=3, return_audio=False)
    assert result.tables["samples"].column("generated_tokens").to_pylist() == [len(reference.token_ids)]
    assert result.tables["samples"].column("text").to_pylist() == [reference.text]


def test_every_entry_point_lists_every_option(tiny):
    from omnilab.streaming import stream

    for function in (tiny.generate, tiny.stream, stream):
        assert set(NAMES) <= set(inspect.signature(function).parameters)
