"""Steering: analysis.steering_vector and lab.intervene(add=...) during generate and stream (tiny model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import omnilab
from omnilab import analysis

HELLO = "Hello there, how are you?"
RUN = {"max_new_tokens": 6, "max_speech_frames": 3}


def _stream(lab, conversation, **run):
    events = list(lab.stream(conversation, **run))
    assert events[-1].kind == "done"
    return events[-1].reply


@pytest.fixture(scope="module")
def vector(tiny):
    """The mean difference of layer-2 residuals over two prompts' tokens."""
    seen = []
    handle = tiny.thinker.model.language_model.layers[2].register_forward_hook(
        lambda m, a, o: seen.append(o[0])
    )
    try:
        tiny.forward("I love this, it is wonderful.")
        tiny.forward("I hate this, it is terrible.")
    finally:
        handle.remove()
    return analysis.steering_vector(seen[0], seen[1])


def test_the_steering_vector_is_the_difference_of_means():
    a, b = torch.randn(5, 8), torch.randn(7, 8)
    v = analysis.steering_vector(a, b)
    torch.testing.assert_close(v, a.mean(0) - b.mean(0))
    frame_a = pd.DataFrame({"pos": range(5), "activation": list(a.numpy())})
    frame_b = pd.DataFrame({"pos": range(7), "activation": list(b.numpy())})
    torch.testing.assert_close(analysis.steering_vector(frame_a, frame_b), v)
    torch.testing.assert_close(analysis.steering_vector(a.numpy(), b.numpy()), v)


def test_steering_vectors_of_different_widths_are_refused():
    with pytest.raises(omnilab.InterventionError, match="a has width 8 and b width 4"):
        analysis.steering_vector(torch.zeros(3, 8), torch.zeros(3, 4))
    with pytest.raises(omnilab.InterventionError, match="pass column="):
        analysis.steering_vector(pd.DataFrame({"x": [1.0]}), torch.zeros(1, 1))


def test_steering_generate_changes_the_reply_and_zero_is_bit_identical(tiny, vector):
    base = tiny.generate(HELLO, **RUN)
    with tiny.intervene(add={"resid.2": 0.0 * vector}):
        zero = tiny.generate(HELLO, **RUN)
    with tiny.intervene(add={"resid.2": 40.0 * vector}):
        steered = tiny.generate(HELLO, **RUN)
    assert zero.token_ids == base.token_ids
    assert np.array_equal(zero.codes, base.codes) and np.array_equal(zero.audio, base.audio)
    assert steered.token_ids != base.token_ids
    assert steered.codes.shape == base.codes.shape and len(steered.audio) > 0  # it still speaks


def test_steering_stream_changes_the_reply_and_zero_is_bit_identical(tiny, vector):
    base = _stream(tiny, HELLO, **RUN)
    with tiny.intervene(add={"resid.2": 0.0 * vector}):
        zero = _stream(tiny, HELLO, **RUN)
    with tiny.intervene(add={"resid.2": 40.0 * vector}):
        steered = _stream(tiny, HELLO, **RUN)
    assert zero.token_ids == base.token_ids
    assert np.array_equal(zero.codes, base.codes) and np.array_equal(zero.audio, base.audio)
    assert steered.token_ids != base.token_ids
    assert steered.codes.shape == base.codes.shape and len(steered.audio) > 0


def test_a_steered_stream_says_what_a_steered_generate_says(tiny, vector):
    with tiny.intervene(add={"resid.2": 40.0 * vector}):
        generated = tiny.generate(HELLO, **RUN)
        streamed = _stream(tiny, HELLO, **RUN)
    assert streamed.token_ids == generated.token_ids
    assert np.array_equal(streamed.codes, generated.codes)
