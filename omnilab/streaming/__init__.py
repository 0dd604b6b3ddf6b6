"""Streaming speech the way Qwen3-Omni was designed to run: thinker and talker pipelined, frame by frame.

    for event in lab.stream(conversation, speaker="Chelsie"):
        event.kind   # "text" | "audio" | "trace" | "done"

One generator interleaves four stages, each advanced one step at a time:

    thinker  ── reply token i ──► trailing text entry i-1 ─┐
                                                           ▼
    talker   ── codebook 0 of frame k ──► code predictor ──► codebooks 1-15 ──► code2wav ──► audio
                 (step k+1 consumes trailing entry k)

The talker starts as soon as the thinker has its first reply token (its prompt is built from the
thinker's prefill and that token, with the model's own `_get_talker_user_parts` /
`_get_talker_assistant_parts`), and before each forward it waits for the text entry that step
consumes, running thinker steps meanwhile. Audio leaves as soon as a frame's 16 codes exist: the code
predictor runs first, code2wav decodes the new frames with causal left context, and only samples not
yet sent are emitted (the causal transposed convolutions hold the last few hundred back until the
next frame arrives, so samples are counted, never sliced by frames). By default each chunk after the
first frame is as long as all the audio already sent (1, 2, 4 ... 32 frames): the exact left context
(143 frames on the presets) is then paid a few times per reply, not once per frame, and the audio
already playing covers the wait for the next chunk whenever codes come faster than real time.

Each model is stepped with transformers' own generation machinery. Its `generate` prepares the
decoding state (generation config, logits processors, stopping criteria, cache, position ids,
media encodings) and hands it to a capture function instead of decoding; the steps then run the loop
body of `GenerationMixin._sample`: `prepare_inputs_for_generation` (which, for the talker, runs the
code predictor), the forward, `_update_model_kwargs_for_generation`, the logits processors, argmax or
sampling, the stopping criteria. With greedy decoding the text and codes are those of
`model.generate`. One detail differs in floating point: `generate` projects the whole reply's text
embeddings in one `text_projection` call once the thinker has finished, a stream projects each token
as it comes, and a matrix product's rounding depends on its batch shape (≲1e-7 relative on CPU).
Codes stay identical unless two codec logits tie to that precision.

No threads: closing the generator stops at the step it is in and leaves the model as it was; an
error raises from `next()`. Module state the steps touch (hooks, the code predictor's `do_sample`,
the decode-time experts implementation) is set and restored inside each step under a per-model lock,
so two streams, interleaved or in two threads, never see each other's text, audio or trace.

The parts: `events` (StreamEvent, Timings, the published figures), `pipeline` (the generator),
`steps` (one model's decoding loop and the talker's prompt; transformers' private steps are called
through omnilab.hf_private); the speech decoder lives beside the codec, in
omnilab.instrument.speech_decoder. What a stream records goes through the recording engine
(omnilab.instrument.record), as a Tracer's does.
"""

# ruff: noqa: F401  (re-exports: the public names of this package)

from ..instrument.speech_decoder import GROW_CAP_FRAMES, SpeechDecoder, exact_left_context
from .events import EVENT_KINDS, PUBLISHED, StreamEvent, Timings, format_timings
from .pipeline import STREAM_CAPTURES, stream
from .steps import model_lock
