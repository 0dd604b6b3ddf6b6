"""`omnilab bench stream`: how soon speech starts, on `small`, a reply of at least 5 s of speech, in one run.

first-packet latency / full-reply latency for `lab.stream` (target <= 0.15) and for
`generate(return_audio=True)` (1.0 by construction: its audio exists only when everything is done);
the real-time factor of both; the stream's stage breakdown (thinker TTFT, talker TTFT, code predictor
per frame, code2wav per chunk), next to Qwen3-Omni's published GPU figures; and whether the streamed
tokens and codes are generate's. The stream uses the default chunks (each as long as the audio
already sent); the same turn decoded frame by frame (chunk_frames=1) shows what that saves.

Both paths run untraced (as `generate` does by default), in turns, `repeats` times: the whole-reply
ratio stream/generate is reported per turn (min / median / max; target <= 1.10), the first packet
beside it. One traced stream afterwards gives the stage breakdown (routing recorded at every step).
"""

from __future__ import annotations

import time

import numpy as np

from ..reply import SAMPLE_RATE, SAMPLES_PER_FRAME
from ._common import load_lab

TARGET = 0.15
WHOLE_TARGET = 1.10  # stream's whole reply against generate's
MIN_SPEECH_SECONDS = 5.0
QUESTION = "Tell me, in a few sentences, how a river finds its way to the sea."


def run(
    model: str = "small",
    device: str | None = None,
    speech_frames: int = 76,
    max_new_tokens: int = 24,
    chunk_frames: int | str = "grow",
    left_context: int | None = None,
    repeats: int = 3,
) -> dict:
    """Run generate and stream in turns on the same greedy turn, `repeats` times (after a short
    warm-up of both), then one traced stream for the stages."""
    from ..streaming import PUBLISHED

    lab = load_lab(model, device)
    conversation = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    options = dict(max_new_tokens=max_new_tokens, max_speech_frames=speech_frames)
    # Warm-up: the first call of each path pays one-time costs (allocator, kernels, lazy imports).
    lab.generate(conversation, max_new_tokens=2, max_speech_frames=3)
    for _ in lab.stream(conversation, max_new_tokens=2, max_speech_frames=3, trace=False):
        pass

    generate_times, stream_times, first_packets, untraced = [], [], [], None
    for _ in range(repeats):  # in turns: load on a shared machine falls on both alike
        started = time.perf_counter()
        reference = lab.generate(conversation, **options)
        generate_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        for event in lab.stream(
            conversation, chunk_frames=chunk_frames, left_context=left_context, trace=False, **options
        ):
            if event.kind == "done":
                untraced = event
        stream_times.append(time.perf_counter() - started)
        first_packets.append(untraced.timings.first_packet_latency)
    ratios = [s / g for s, g in zip(stream_times, generate_times, strict=True)]
    generate_s = float(np.median(generate_times))

    done = None
    # Traced (routing recorded at every step): the stage breakdown.
    for event in lab.stream(
        conversation, chunk_frames=chunk_frames, left_context=left_context, trace=True, **options
    ):
        if event.kind == "done":
            done = event
    t = done.timings
    speech_s = len(done.reply.audio) / SAMPLE_RATE
    figures = {
        "model": lab.model_id,
        "device": t.device,
        "speech_seconds": speech_s,
        "frames": t.frames,
        "thinker_tokens": t.thinker_tokens,
        "chunk_frames": chunk_frames,
        "repeats": repeats,
        "stream_whole_over_generate": float(np.median(ratios)),
        "stream_whole_over_generate_spread": _spread(ratios),
        "whole_target": WHOLE_TARGET,
        "whole_pass": float(np.median(ratios)) <= WHOLE_TARGET,
        "stream_untraced_full_reply_s": _spread(stream_times),
        "stream_untraced_first_packet_s": _spread(first_packets),
        "generate_full_reply_spread_s": _spread(generate_times),
        "untraced_tokens_identical": untraced.reply.token_ids == reference.token_ids,
        "stream_first_packet_s": t.first_packet_latency,
        "stream_full_reply_s": t.full_reply_latency,
        "stream_first_over_full": t.first_packet_latency / t.full_reply_latency,
        "generate_first_packet_s": generate_s,
        "generate_full_reply_s": generate_s,
        "generate_first_over_full": 1.0,
        "first_packet_speedup": generate_s / float(np.median(first_packets)),  # untraced, both
        "stream_real_time_factor": t.real_time_factor,
        "generate_real_time_factor": generate_s / (len(reference.audio) / SAMPLE_RATE),
        "target": TARGET,
        "pass": t.first_packet_latency / t.full_reply_latency <= TARGET and speech_s >= MIN_SPEECH_SECONDS,
        "breakdown_ms": {
            "preprocessing": t.preprocessing * 1e3,
            "thinker_ttft": t.thinker_ttft * 1e3,
            "talker_ttft": t.talker_ttft * 1e3,
            "code_predictor_per_frame": t.code_predictor_per_frame * 1e3,
            "code2wav_per_chunk": t.code2wav_per_chunk * 1e3,
            "first_packet_latency": t.first_packet_latency * 1e3,
        },
        "published_ms": {name: seconds * 1e3 for name, seconds in PUBLISHED.items()},
        "stages_s": {stage: seconds for stage, seconds, _ in t.stages},
        "tokens_identical": done.reply.token_ids == reference.token_ids,
        "codes_identical": bool(np.array_equal(done.reply.codes, reference.codes)),
        "audio_samples": len(done.reply.audio),
        "expected_samples_upper_bound": t.frames * SAMPLES_PER_FRAME,
    }
    # The same turn decoded frame by frame (chunk_frames=1): what the growing chunks save.
    single = None
    for event in lab.stream(conversation, chunk_frames=1, left_context=left_context, trace=True, **options):
        if event.kind == "done":
            single = event
    f = single.timings
    figures.update(
        {
            "per_frame_first_packet_s": f.first_packet_latency,
            "per_frame_real_time_factor": f.real_time_factor,
            "per_frame_code2wav_chunks": f.chunks,
            "per_frame_code2wav_s": dict((stage, seconds) for stage, seconds, _ in f.stages).get(
                "code2wav", 0.0
            ),
            "per_frame_audio_max_abs_diff": float(np.abs(single.reply.audio - done.reply.audio).max()),
            "audio_peak": float(np.abs(done.reply.audio).max()),
        }
    )
    figures["traced_stream_over_untraced"] = t.full_reply_latency / float(np.median(stream_times))
    if speech_s < MIN_SPEECH_SECONDS:
        figures["note"] = (
            f"only {speech_s:.2f} s of speech (the talker stopped early); raise speech_frames for >= "
            f"{MIN_SPEECH_SECONDS:.0f} s"
        )
    return figures


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": float(np.median(values)), "max": max(values)}
