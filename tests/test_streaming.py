"""lab.stream: pipelined thinker → talker → code predictor → code2wav, frame by frame, on the tiny preset.

The reference for every equality is `lab.generate` (transformers' own generate), greedy.
"""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch

import omnilab
from omnilab.errors import ConversationError
from omnilab.streaming import (
    SpeechDecoder,
    StreamEvent,
    Timings,
    exact_left_context,
    format_timings,
    model_lock,
    stream,
)

TOKENS, FRAMES = 8, 6  # max_speech_frames=6 speaks exactly 6 frames
HELLO = [{"role": "user", "content": [{"type": "text", "text": "Hello there, how are you?"}]}]
OTHER = [{"role": "user", "content": [{"type": "text", "text": "Name three rivers."}]}]


def _run(lab, conversation, *args, **options) -> list[StreamEvent]:
    return list(lab.stream(conversation, *args, **options))


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _full_decode(lab, codes: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return lab.model.code2wav(torch.from_numpy(codes.T[None])).reshape(-1).float().numpy()


@pytest.fixture(scope="module")
def reference(tiny):
    return tiny.generate(HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, trace=True)


@pytest.fixture(scope="module")
def events(tiny):
    return _run(tiny, HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, chunk_frames=1, trace=True)


@pytest.fixture(scope="module")
def done(events) -> StreamEvent:
    return events[-1]


# -- equivalence with generate ------------------------------------------------------------------------
def test_streamed_tokens_and_codes_equal_generate(done, reference):
    assert done.kind == "done"
    assert done.reply.token_ids == reference.token_ids
    assert np.array_equal(done.reply.codes, reference.codes)
    assert done.reply.codes.shape == (FRAMES, 16)


def test_text_deltas_add_up_to_the_reply(events, done, reference):
    deltas = [e.text for e in events if e.kind == "text"]
    assert len(deltas) > 1
    assert "".join(deltas) == done.reply.text == reference.text


def test_audio_chunks_add_up_to_a_full_decode_of_the_codes(tiny, events, done):
    chunks = [e for e in events if e.kind == "audio"]
    assert len(chunks) == FRAMES  # one frame per chunk
    assert [c.sample_offset for c in chunks] == list(np.cumsum([0] + [len(c.audio) for c in chunks[:-1]]))
    audio = np.concatenate([c.audio for c in chunks])
    assert audio.dtype == np.float32
    assert np.array_equal(audio, done.reply.audio)
    full = _full_decode(tiny, done.reply.codes)
    assert len(audio) == len(full)
    assert _relative_error(audio, full) <= 1e-5


def test_media_conversation_streams_the_same_tokens_and_codes(tiny, all_media_conversation):
    reference = tiny.generate(all_media_conversation, max_new_tokens=4, max_speech_frames=4)
    reply = _run(tiny, all_media_conversation, max_new_tokens=4, max_speech_frames=4, trace=False)[-1].reply
    assert reply.token_ids == reference.token_ids
    assert np.array_equal(reply.codes, reference.codes)


def test_text_only_stream_equals_generate_without_audio(tiny):
    reference = tiny.generate(HELLO, max_new_tokens=5, return_audio=False)
    events = _run(tiny, HELLO, max_new_tokens=5, return_audio=False, trace=False)
    assert {e.kind for e in events} == {"text", "done"}
    assert events[-1].reply.token_ids == reference.token_ids
    assert events[-1].reply.audio is None and events[-1].reply.codes is None


# -- pipelining -----------------------------------------------------------------------------------------
def test_talker_starts_after_the_first_reply_token_not_after_the_last(events):
    traces = [(e.component, e.phase) for e in events if e.kind == "trace"]
    assert traces[:2] == [("thinker", "prefill"), ("talker", "prefill")]


def test_first_audio_leaves_before_the_thinker_has_finished(events):
    kinds = [e.kind for e in events]
    first_audio = kinds.index("audio")
    last_text = len(kinds) - 1 - kinds[::-1].index("text")
    assert first_audio < last_text
    thinker_steps_before = sum(
        1 for e in events[:first_audio] if e.kind == "trace" and e.component == "thinker"
    )
    assert thinker_steps_before == 1  # only the prefill: frame 0 needs no text beyond the first token


# -- trace and timings ------------------------------------------------------------------------------------
def test_trace_events_carry_the_newest_rows_routing(tiny, events):
    config = tiny.model.config.thinker_config.text_config
    decode = next(e for e in events if e.kind == "trace" and e.component == "thinker" and e.phase == "decode")
    assert len(decode.positions) == 1
    assert len(decode.routing) == config.num_hidden_layers * config.num_experts_per_tok
    assert set(decode.routing["pos"]) == set(decode.positions["pos"])
    talker = [e for e in events if e.kind == "trace" and e.component == "talker" and e.phase == "decode"]
    assert [e.frame for e in talker] == list(range(FRAMES))


def test_done_trace_has_tokens_routing_codes_and_timings(done):
    trace = done.trace
    assert done.reply.trace is trace
    assert set(trace.routing["component"]) == {"thinker", "talker"}
    assert len(trace.codes) == FRAMES * 16
    assert list(trace.timings["stage"]) == [
        "preprocessing",
        "thinker_prefill",
        "thinker_decode",
        "talker_prefill",
        "talker_decode",
        "code_predictor",
        "code2wav",
    ]
    speech = trace.tokens[trace.tokens["modality"] == "speech"]
    assert list(speech["frame"]) == list(range(FRAMES))
    assert trace.meta["latency"]["first_packet_latency"] == done.timings.first_packet_latency
    # The same metadata as a traced generate: the analyses read the routing shape from it.
    assert set(trace.meta["components"]) == {"thinker", "talker"}
    assert (
        trace.meta["components"]["talker"]["top_k"]
        == int(trace.routing.query("component == 'talker'")["rank"].max()) + 1
    )


@pytest.mark.parametrize("table", ["tokens", "routing", "router_stats", "codes", "spans"])
def test_done_trace_tables_equal_the_tracers_record_of_generate(done, reference, table):
    keys = {
        "tokens": ["component", "pos"],
        "routing": ["component", "layer", "pos", "rank"],
        "router_stats": ["component", "layer", "pos"],
        "codes": ["frame", "codebook"],
        "spans": ["component", "start"],
    }[table]
    streamed = done.trace.table(table).sort_values(keys).reset_index(drop=True)
    generated = reference.trace.table(table).sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(streamed, generated)


def test_done_trace_saves_and_loads_with_its_latency(done, tmp_path):
    from omnilab.trace import Trace

    loaded = Trace.load(done.trace.save(tmp_path / "streamed"))
    assert loaded.meta["latency"]["frames"] == FRAMES
    assert len(loaded.routing) == len(done.trace.routing)


def test_latency_breakdown_is_complete_and_consistent(done):
    t = done.timings
    assert isinstance(t, Timings)
    for name in (
        "preprocessing",
        "thinker_ttft",
        "talker_ttft",
        "code_predictor_per_frame",
        "code2wav_per_chunk",
    ):
        assert 0 < getattr(t, name) < t.full_reply_latency, name
    assert t.thinker_ttft + t.talker_ttft < t.first_packet_latency < t.full_reply_latency
    assert t.frames == FRAMES and t.chunks == FRAMES and t.thinker_tokens == TOKENS
    assert t.real_time_factor == pytest.approx(t.full_reply_latency / t.speech_seconds)
    text = format_timings(t)
    for label in (
        "thinker TTFT",
        "talker TTFT",
        "code predictor / frame",
        "code2wav / chunk",
        "first-packet latency",
        "real-time factor",
        "234.0 ms",
    ):
        assert label in text


# -- lifecycle ------------------------------------------------------------------------------------------
def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.timeout(120)
def test_closing_early_stops_and_leaves_the_model_as_it_was(tiny, reference):
    hooks, threads = _hook_count(tiny.model), threading.active_count()
    sampling = tiny.model.talker.code_predictor.generation_config.do_sample
    events = tiny.stream(HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, trace=True)
    kinds = []
    for event in events:
        kinds.append(event.kind)
        if event.kind == "audio":
            break
    forwards = []  # what close() runs of the model: nothing (it stops, it does not finish the reply)
    counters = [
        m.register_forward_pre_hook(lambda *args: forwards.append(1))
        for m in (tiny.model.thinker, tiny.model.talker, tiny.model.code2wav)
    ]
    try:
        events.close()
    finally:
        for handle in counters:
            handle.remove()
    assert forwards == []
    free = []  # the model's lock is let go: another thread takes it at once

    def take():
        lock = model_lock(tiny.model)
        free.append(lock.acquire(blocking=False))
        if free[-1]:
            lock.release()

    taker = threading.Thread(target=take)
    taker.start()
    taker.join()
    assert free == [True]
    assert "done" not in kinds
    assert threading.active_count() == threads
    assert _hook_count(tiny.model) == hooks
    assert tiny.model.talker.code_predictor.generation_config.do_sample == sampling
    again = tiny.generate(HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES)
    assert again.token_ids == reference.token_ids and np.array_equal(again.codes, reference.codes)


@pytest.mark.timeout(120)
def test_an_error_inside_the_pipeline_reaches_the_caller(tiny):
    hooks = _hook_count(tiny.model)

    def broken(module, args, output):
        raise RuntimeError("code2wav broke")

    handle = tiny.model.code2wav.register_forward_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="code2wav broke"):
            _run(tiny, HELLO, max_new_tokens=4, max_speech_frames=4, trace=True)
    finally:
        handle.remove()
    assert _hook_count(tiny.model) == hooks


@pytest.mark.timeout(240)
def test_two_interleaved_streams_do_not_mix(tiny, reference):
    other = tiny.generate(OTHER, max_new_tokens=5, max_speech_frames=4)
    first = tiny.stream(HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, trace=True)
    second = tiny.stream(OTHER, max_new_tokens=5, max_speech_frames=4, trace=True)
    got = {id(first): [], id(second): []}
    live = [first, second]
    while live:
        for gen in list(live):
            event = next(gen, None)
            if event is None:
                live.remove(gen)
            else:
                got[id(gen)].append(event)
    for events, ref in ((got[id(first)], reference), (got[id(second)], other)):
        done = events[-1]
        assert done.reply.token_ids == ref.token_ids
        assert np.array_equal(done.reply.codes, ref.codes)
        assert "".join(e.text for e in events if e.kind == "text") == ref.text
        routing = done.trace.routing
        assert routing.groupby(["component", "layer", "pos"]).size().max() == routing["rank"].max() + 1
        for component in ("thinker", "talker"):
            rows = set(done.trace.tokens[done.trace.tokens["component"] == component]["pos"])
            routed = set(routing[routing["component"] == component]["pos"])
            unfed = 1 if component == "thinker" else 0  # the last reply token is never fed back
            assert routed <= rows and len(rows - routed) == unfed


@pytest.mark.timeout(240)
def test_two_streams_in_two_threads_do_not_mix(tiny):
    results, errors = {}, []

    def consume(name, conversation):
        try:
            results[name] = _run(tiny, conversation, max_new_tokens=4, max_speech_frames=3, trace=False)[
                -1
            ].reply
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(n, c)) for n, c in (("hello", HELLO), ("other", OTHER))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    assert not errors
    for name, conversation in (("hello", HELLO), ("other", OTHER)):
        alone = tiny.generate(conversation, max_new_tokens=4, max_speech_frames=3)
        assert results[name].token_ids == alone.token_ids
        assert np.array_equal(results[name].codes, alone.codes)


def test_sampled_stream_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(tiny):
    state = torch.get_rng_state()
    options = dict(max_new_tokens=4, max_speech_frames=3, do_sample=True, seed=3, trace=False)
    a = _run(tiny, HELLO, **options)[-1].reply
    b = _run(tiny, HELLO, **options)[-1].reply
    assert a.token_ids == b.token_ids and np.array_equal(a.codes, b.codes)
    assert torch.equal(torch.get_rng_state(), state)


# -- options ----------------------------------------------------------------------------------------------
def test_stream_and_generate_show_every_option_and_share_the_trace_default(tiny):
    import inspect

    from omnilab.options import NAMES, GenerationOptions

    for function in (tiny.stream, tiny.generate, stream):
        parameters = inspect.signature(function).parameters
        assert set(NAMES) <= set(parameters), function
        assert parameters["trace"].default is False
        assert "changes" not in parameters
    assert {"chunk_frames", "left_context"} <= set(inspect.signature(tiny.stream).parameters)
    options = GenerationOptions(max_new_tokens=3, return_audio=False)
    by_value = _run(tiny, HELLO, options)[-1].reply
    assert by_value.trace is None and len(by_value.token_ids) == 3
    assert by_value.token_ids == tiny.generate(HELLO, options).token_ids
    assert tiny.generate(HELLO, options, max_new_tokens=2).token_ids == by_value.token_ids[:2]


def test_stream_trace_takes_a_capture_spec_as_generate_does(tiny):
    done = _run(tiny, HELLO, max_new_tokens=3, max_speech_frames=3, trace=("positions",))[-1]
    assert done.trace.meta["capture"] == ["positions"]
    assert done.trace.rows("tokens") > 0 and done.trace.rows("routing") == 0
    with pytest.raises(omnilab.InterventionError, match="cannot capture"):
        stream(tiny, HELLO, trace=("attention",))


def test_bad_options_fail_at_the_call_with_the_way_out(tiny):
    with pytest.raises(ConversationError, match="unknown speaker 'Nobody'"):
        stream(tiny, HELLO, speaker="Nobody")
    with pytest.raises(ConversationError, match="chunk_frames"):
        stream(tiny, HELLO, chunk_frames=0)
    with pytest.raises(ConversationError, match="a positive int or 'grow'"):
        stream(tiny, HELLO, chunk_frames="fast")
    with pytest.raises(ConversationError, match="max_new_tokens"):
        stream(tiny, HELLO, max_new_tokens=0)


def test_larger_chunks_after_the_first_frame_keep_the_audio(tiny, done):
    events = _run(tiny, HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, chunk_frames=3, trace=False)
    chunks = [e for e in events if e.kind == "audio"]
    assert [c.frame for c in chunks] == [0, 3, FRAMES - 1]  # frame 0 alone, then every 3, then the rest
    assert np.array_equal(events[-1].reply.codes, done.reply.codes)
    assert _relative_error(np.concatenate([c.audio for c in chunks]), done.reply.audio) <= 1e-5
    grown = _run(tiny, HELLO, max_new_tokens=TOKENS, max_speech_frames=FRAMES, trace=False)  # the default
    chunks = [e for e in grown if e.kind == "audio"]
    assert [c.frame for c in chunks] == [
        0,
        1,
        3,
        FRAMES - 1,
    ]  # 1, 1, 2 frames (each as long as all before), the rest
    assert _relative_error(np.concatenate([c.audio for c in chunks]), done.reply.audio) <= 1e-5


# -- the speech decoder alone -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_window_code2wav(tiny):
    """A narrow code2wav whose sliding window (2 frames) a 24-frame reply outgrows many times over."""
    base = tiny.model.code2wav.config
    config = type(base)(**{**base.to_dict(), "sliding_window": 2, "decoder_dim": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = type(tiny.model.code2wav)._from_config(config)
    return model.eval()


def _decode_both_ways(code2wav, **options) -> tuple[np.ndarray, np.ndarray]:
    codes = np.random.default_rng(0).integers(0, 2048, size=(24, 16))
    with torch.inference_mode():
        full = code2wav(torch.from_numpy(codes.T[None])).reshape(-1).numpy()
    decoder = SpeechDecoder(code2wav, **options)
    chunks = [decoder.push(frame) for frame in codes] + [decoder.flush()]
    return np.concatenate([c for c in chunks if c is not None]), full


def test_speech_decoder_with_the_receptive_field_as_context_equals_a_full_decode(short_window_code2wav):
    assert exact_left_context(short_window_code2wav) == 2 * 1 + 8
    audio, full = _decode_both_ways(short_window_code2wav, chunk_frames=3)
    assert len(audio) == len(full)
    assert _relative_error(audio, full) <= 1e-5


def test_growing_chunks_double_until_the_cap_and_keep_the_audio(short_window_code2wav, monkeypatch):
    import omnilab.instrument.speech_decoder as speech_decoder

    monkeypatch.setattr(speech_decoder, "GROW_CAP_FRAMES", 4)
    codes = np.random.default_rng(0).integers(0, 2048, size=(24, 16))
    decoder = SpeechDecoder(short_window_code2wav, chunk_frames="grow")
    decoded_after = [i for i, frame in enumerate(codes) if decoder.push(frame) is not None]
    # each chunk as long as everything sent before it: 1, 1, 2, then the cap of 4
    assert decoded_after == [0, 1, 3, 7, 11, 15, 19, 23]
    audio, full = _decode_both_ways(short_window_code2wav, chunk_frames="grow")
    assert len(audio) == len(full) and _relative_error(audio, full) <= 1e-5


def test_speech_decoder_with_only_the_sliding_window_as_context_drifts(short_window_code2wav):
    audio, full = _decode_both_ways(short_window_code2wav, left_context=2, chunk_frames=3)
    assert len(audio) == len(full)
    assert _relative_error(audio, full) > 1e-5
