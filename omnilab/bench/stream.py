"""`omnilab bench stream`: how soon speech starts, on `small`, a reply of at least 5 s of speech, in one run.

first-packet latency / full-reply latency for `lab.stream` (target <= 0.15) and for
`generate(return_audio=True)` (1.0 by construction: its audio exists only when everything is done);
the real-time factor of both; the stream's stage breakdown (thinker TTFT, talker TTFT, code predictor
per frame, code2wav per chunk), next to Qwen3-Omni's published GPU figures; and whether the streamed
tokens and codes are generate's. The stream uses the default chunks (each as long as the audio
already sent); the same turn decoded frame by frame (chunk_frames=1) shows what that saves.
"""

from __future__ import annotations

import time

import numpy as np

from ..reply import SAMPLE_RATE, SAMPLES_PER_FRAME
from ._common import load_lab

TARGET = 0.15
MIN_SPEECH_SECONDS = 5.0
QUESTION = "Tell me, in a few sentences, how a river finds its way to the sea."


def run(
    model: str = "small",
    device: str | None = None,
    speech_frames: int = 76,
    max_new_tokens: int = 24,
    chunk_frames: int | str = "grow",
    left_context: int | None = None,
) -> dict:
    """Run generate and stream once each on the same greedy turn (after a short warm-up of both)."""
    from ..streaming import PUBLISHED

    lab = load_lab(model, device)
    conversation = [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    options = dict(max_new_tokens=max_new_tokens, max_speech_frames=speech_frames)
    # Warm-up: the first call of each path pays one-time costs (allocator, kernels, lazy imports).
    lab.generate(conversation, max_new_tokens=2, max_speech_frames=3)
    for _ in lab.stream(conversation, max_new_tokens=2, max_speech_frames=3, trace=False):
        pass

    started = time.perf_counter()
    reference = lab.generate(conversation, **options)
    generate_s = time.perf_counter() - started

    done = None
    # Traced as a stream was by default before generate and stream shared trace=False: the first
    # packet is measured with routing recorded at every step.
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
        "stream_first_packet_s": t.first_packet_latency,
        "stream_full_reply_s": t.full_reply_latency,
        "stream_first_over_full": t.first_packet_latency / t.full_reply_latency,
        "generate_first_packet_s": generate_s,
        "generate_full_reply_s": generate_s,
        "generate_first_over_full": 1.0,
        "first_packet_speedup": generate_s / t.first_packet_latency,
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
    if speech_s < MIN_SPEECH_SECONDS:
        figures["note"] = (
            f"only {speech_s:.2f} s of speech (the talker stopped early); raise speech_frames for >= "
            f"{MIN_SPEECH_SECONDS:.0f} s"
        )
    return figures
