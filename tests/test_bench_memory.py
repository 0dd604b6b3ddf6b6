"""`omnilab bench memory` at a small size: what must hold at any speed."""

from __future__ import annotations

import pytest

from omnilab.bench import memory


def test_bench_memory_measures_each_turn_in_its_own_process():
    figures = memory.run(model="tiny", sizes=(64, 256), limit_gb=6)
    assert not [k for k in figures if "error" in k], figures
    for size in (64, 256):
        assert 200 < figures[f"bare_mb_{size}"] < 6 * 1024
        ratio = figures[f"traced_mb_{size}"] / figures[f"bare_mb_{size}"]
        assert figures[f"traced_over_bare_{size}"] == pytest.approx(ratio, rel=1e-3)
        assert figures[f"attention_rows_{size}"] > 0
    assert figures["tokens_256"] > figures["tokens_64"]
    assert isinstance(figures["pass_ratio"], bool) and "extra_growth_exponent" in figures
    assert "traced/bare" in figures["verdict"] and "tokens^" in figures["verdict"]


def test_a_turn_over_the_limit_is_killed_and_reported():
    figures = memory.run(model="tiny", sizes=(64,), limit_gb=0.2)
    assert figures["bare_error_64"] == "killed over the 0.2 GB limit"
    assert figures["pass_ratio"] is False


def test_generate_computes_the_thinkers_logits_for_the_last_position_only(tiny):
    """At prefill the thinker's head would make [L, 151,936] float32 logits (6 GB at 10k tokens)."""
    conversation = [{"role": "user", "content": [{"type": "text", "text": "count the words " * 20}]}]
    shapes = []
    handle = tiny.thinker.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        reply = tiny.generate(conversation, max_new_tokens=3, return_audio=False)
        assert shapes and all(shape[1] == 1 for shape in shapes)  # prefill included
        shapes.clear()
        logits = tiny.forward(conversation)  # a forward still gives every position's logits
    finally:
        handle.remove()
    length = tiny.prepare(conversation)["input_ids"].shape[1]
    assert logits.shape[1] == length and shapes == [tuple(logits.shape)]
    assert int(logits[0, -1].argmax()) == reply.token_ids[0]
    assert not tiny.thinker.lm_head._forward_pre_hooks


def test_a_stream_computes_the_thinkers_logits_for_the_last_position_only(tiny):
    conversation = [{"role": "user", "content": [{"type": "text", "text": "count the words " * 20}]}]
    shapes = []
    handle = tiny.thinker.lm_head.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        events = list(tiny.stream(conversation, max_new_tokens=3, return_audio=False))
    finally:
        handle.remove()
    assert events and shapes and all(shape[1] == 1 for shape in shapes)
    assert not tiny.thinker.lm_head._forward_pre_hooks
