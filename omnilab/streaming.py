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
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .errors import ConversationError
from .reply import SAMPLE_RATE, Reply
from .trace import Trace

log = logging.getLogger(__name__)

EVENT_KINDS = ("text", "audio", "trace", "done")

# Qwen3-Omni technical report, 30B-A3B, one request: the first-packet breakdown a GPU run can be held
# against (seconds).
PUBLISHED = {
    "thinker_ttft": 0.088,
    "talker_ttft": 0.057,
    "code_predictor_per_frame": 0.014,
    "code2wav_per_chunk": 0.003,
    "first_packet_latency": 0.234,
}


# -- what a stream hands out ------------------------------------------------------------------------
@dataclass(frozen=True)
class Timings:
    """Where the time of one streamed reply went (seconds), named as in Qwen3-Omni's latency table.

    preprocessing: chat template and media features (the processor); thinker_ttft: from the model
    inputs to the first reply token (media encoders, prefill, first token); talker_ttft: from that
    token to the talker's first codebook-0 token (its prompt, its prefill); code_predictor_per_frame:
    mean time for a frame's residual codebooks 1-15; code2wav_per_chunk: mean time of one causal
    decode (`chunk_frames` new frames plus left context); first_packet_latency: from the first `next()` to the
    first audio chunk; full_reply_latency: from the first `next()` to the end; real_time_factor:
    full_reply_latency / seconds of speech (below 1: faster than real time). `stages` holds the
    trace's timings rows: (stage, seconds, calls).
    """

    preprocessing: float
    thinker_ttft: float
    talker_ttft: float
    code_predictor_per_frame: float
    code2wav_per_chunk: float
    first_packet_latency: float
    full_reply_latency: float
    real_time_factor: float
    thinker_tokens: int
    frames: int
    chunks: int
    speech_seconds: float
    device: str = "cpu"
    stages: tuple = ()

    def as_dict(self) -> dict:
        """The figures as a plain dict (stages as {stage: {"seconds", "calls"}})."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "stages"}
        out["stages"] = {stage: {"seconds": s, "calls": c} for stage, s, c in self.stages}
        return out


@dataclass(frozen=True)
class StreamEvent:
    """One thing a stream hands out.

    kind "text": `text` is the new piece of the reply. kind "audio": `audio` is float32 mono at
    `sample_rate`, the samples after the `sample_offset` already sent; `frame` is the last frame it
    covers. kind "trace": `component`, `phase`, `step` of one forward, `routing` (trace routing
    columns) and `positions` (pos, token_id, t, h, w) of the rows it added; `frame` for a talker
    step that consumed that frame's codes. kind "done": `reply` (an omnilab Reply, its trace
    attached), `trace` and `timings`. `seconds`: time since the stream started (its first `next()`).
    """

    kind: str
    seconds: float = 0.0
    text: str = ""
    audio: np.ndarray | None = None
    sample_rate: int = SAMPLE_RATE
    sample_offset: int = 0
    component: str = ""
    phase: str = ""
    step: int = -1
    frame: int = -1
    routing: pd.DataFrame | None = None
    positions: pd.DataFrame | None = None
    reply: Reply | None = None
    trace: Trace | None = None
    timings: Timings | None = None


# -- the entry point --------------------------------------------------------------------------------
def stream(
    lab,
    conversation,
    *,
    speaker: str = "Ethan",
    return_audio: bool | None = None,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    max_speech_frames: int | None = None,
    speech_do_sample: bool | None = None,
    use_audio_in_video: bool = False,
    seed: int | None = None,
    trace: bool = True,
    chunk_frames: int | str = "grow",
    left_context: int | None = None,
) -> Iterator[StreamEvent]:
    """Stream one assistant turn: text deltas, audio chunks and trace events as they are made.

    The options are those of `OmniLab.generate` (greedy by default; the same text and codes), plus:
    `trace` (emit "trace" events with each forward's routing and positions, and attach routing to
    the final Trace), `chunk_frames` (frames per code2wav decode after the first, which always
    decodes the first frame alone for the soonest packet; more amortize the left context; "grow"
    makes each as long as all the audio sent before it (1, 2, 4, 8 ... up to `GROW_CAP_FRAMES`), so
    that the audio already sent covers the wait for the next chunk whenever the codes come at least
    as fast as real time) and
    `left_context` (frames of causal context per decode; default `exact_left_context`, the
    receptive field of code2wav, which keeps the audio equal to a full decode's to rounding).
    Returns a generator; nothing runs until the first `next()`, and `close()` stops it.
    """
    return_audio = lab.has_talker if return_audio is None else return_audio
    if return_audio and not lab.has_talker:
        raise ConversationError(
            f"model '{lab.model_id}' has no talker (a Thinking or Captioner checkpoint, or loaded with "
            "talker=False), so it cannot speak; pass return_audio=False"
        )
    if return_audio:
        lab.speaker_id(speaker)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConversationError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    if chunk_frames != "grow" and (not isinstance(chunk_frames, int) or chunk_frames < 1):
        raise ConversationError(f"chunk_frames must be a positive int or 'grow'; got {chunk_frames!r}")
    if left_context is not None and (not isinstance(left_context, int) or left_context < 1):
        raise ConversationError(f"left_context must be a positive number of frames; got {left_context!r}")
    options = dict(
        speaker=speaker,
        return_audio=return_audio,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_speech_frames=max_speech_frames,
        speech_do_sample=speech_do_sample,
        use_audio_in_video=use_audio_in_video,
    )
    return _Stream(
        lab,
        conversation,
        options,
        seed=seed,
        trace=trace,
        chunk_frames=chunk_frames,
        left_context=left_context,
    ).events()


def format_timings(timings: Timings) -> str:
    """The latency breakdown as a readable table, next to Qwen3-Omni's published GPU figures."""
    ms = lambda s: "—" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s * 1e3:9.1f} ms"  # noqa: E731
    rows = [
        ("preprocessing", timings.preprocessing, None),
        ("thinker TTFT", timings.thinker_ttft, "thinker_ttft"),
        ("talker TTFT", timings.talker_ttft, "talker_ttft"),
        ("code predictor / frame", timings.code_predictor_per_frame, "code_predictor_per_frame"),
        ("code2wav / chunk", timings.code2wav_per_chunk, "code2wav_per_chunk"),
        ("first-packet latency", timings.first_packet_latency, "first_packet_latency"),
        ("full-reply latency", timings.full_reply_latency, None),
    ]
    lines = [f"latency breakdown ({timings.device})", f"{'stage':<24}{'this run':>12}{'published':>13}"]
    for name, value, key in rows:
        lines.append(f"{name:<24}{ms(value):>12}{ms(PUBLISHED.get(key)) if key else '':>13}")
    rtf = timings.real_time_factor
    lines.append(f"{'real-time factor':<24}{'—' if math.isnan(rtf) else f'{rtf:9.3f}':>12}")
    lines.append(
        f"{timings.thinker_tokens} tokens, {timings.frames} frames ({timings.speech_seconds:.2f} s of speech) "
        f"in {timings.chunks} chunks; published: Qwen3-Omni-30B-A3B on GPU, one request"
    )
    return "\n".join(lines)


# -- shared-state discipline ---------------------------------------------------------------------------
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _sync(device: torch.device) -> None:
    # GPU work is asynchronous: stage times mean something only once the device has caught up.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
    """A `custom_generate` that decodes nothing: it returns the state `generate` prepared."""
    return _Prepared(input_ids, logits_processor, stopping_criteria, generation_config, model_kwargs)


@dataclass
class _Prepared:
    input_ids: torch.Tensor
    logits_processor: object
    stopping_criteria: object
    generation_config: object
    model_kwargs: dict


class _Decoder:
    """One model's decoding loop (the body of `GenerationMixin._sample`), advanced a step per call.

    `prepare()` gives the next forward's inputs (the decode branch of the model's own
    `prepare_inputs_for_generation`); `forward(inputs)` runs it and picks the next token.
    """

    def __init__(self, model, prepared: _Prepared):
        self.model = model
        self.input_ids = prepared.input_ids
        self.logits_processor = prepared.logits_processor
        self.stopping_criteria = prepared.stopping_criteria
        self.config = prepared.generation_config
        self.kwargs = prepared.model_kwargs
        self.prompt_length = prepared.input_ids.shape[1]
        self.unfinished = torch.ones(self.input_ids.shape[0], dtype=torch.long, device=self.input_ids.device)
        self.outputs = None
        self.steps = 0  # forwards run, the prefill included
        self.done = False

    @property
    def generated(self) -> torch.Tensor:
        return self.input_ids[0, self.prompt_length :]

    def prefill(self) -> torch.Tensor:
        outputs = self.model._prefill(self.input_ids, self.config, self.kwargs, is_first_iteration=True)
        return self._select(outputs)

    def prepare(self, **updates) -> dict:
        self.kwargs.update(updates)
        next_length = 1 if self.kwargs["use_cache"] else None
        return self.model.prepare_inputs_for_generation(
            self.input_ids, next_sequence_length=next_length, **self.kwargs
        )

    def forward(self, inputs: dict) -> torch.Tensor:
        with self.model._optimize_model_for_decode():
            outputs = self.model(**inputs, return_dict=True)
        return self._select(outputs)

    def _select(self, outputs) -> torch.Tensor:
        self.kwargs = self.model._update_model_kwargs_for_generation(
            outputs, self.kwargs, is_encoder_decoder=self.model.config.is_encoder_decoder
        )
        logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=self.input_ids.device)
        scores = self.logits_processor(self.input_ids, logits)
        if self.config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        # One sequence, stopped as soon as it finishes: _sample's padding of finished rows never applies.
        self.input_ids = torch.cat([self.input_ids, tokens[:, None]], dim=-1)
        self.unfinished = self.unfinished & ~self.stopping_criteria(self.input_ids, scores)
        self.done = bool(self.unfinished.max() == 0)
        self.outputs = outputs
        self.steps += 1
        return tokens


# -- speech: causal code2wav, frame by frame -------------------------------------------------------------
def exact_left_context(code2wav) -> int:
    """Frames of left context that make a causal code2wav decode equal a full one (to rounding).

    Each of the pre-transformer's sliding-window layers reaches `sliding_window - 1` frames further
    back, so the receptive field is layers × (window − 1) frames, plus a few for the convolutions
    after it (measured on the presets: 143 frames reach rounding level, 3e-7; the window alone, 72,
    leaves 3e-4 to 1e-3 relative error with random weights).
    """
    config = code2wav.config
    layers = sum(1 for kind in config.layer_types[: config.num_hidden_layers] if kind == "sliding_attention")
    if layers < config.num_hidden_layers or not config.sliding_window:
        return int(config.max_position_embeddings)  # a full-attention layer sees everything
    return layers * (int(config.sliding_window) - 1) + _CONV_CONTEXT_FRAMES


_CONV_CONTEXT_FRAMES = 8  # the causal convolutions after the transformer reach back < 8 frames
GROW_CAP_FRAMES = 32  # the largest chunk of chunk_frames="grow" (2.56 s of speech)


class SpeechDecoder:
    """Codec frames in, new audio samples out: code2wav decoded causally, a chunk at a time.

    Each decode covers the new frames plus up to `left_context` frames before them (default
    `exact_left_context`, so the samples equal a full decode's to rounding). A decode of n frames
    yields n × 1,920 samples minus a tail the causal transposed convolutions hold back until the
    next frame comes, so the decoder counts the samples it has sent and emits only those after them.
    The first decode runs as soon as `first_chunk_frames` frames are in, later ones every
    `chunk_frames`, or with `chunk_frames="grow"` after 1, 2, 4, 8 ... new frames (at most
    `GROW_CAP_FRAMES`): each chunk is then as long as all the audio sent before it, and the left
    context is paid about log2(n) + n / 32 times instead of n times.
    """

    def __init__(
        self,
        code2wav,
        *,
        left_context: int | None = None,
        chunk_frames: int | str = 1,
        first_chunk_frames: int = 1,
    ):
        self.code2wav = code2wav
        self.left_context = exact_left_context(code2wav) if left_context is None else int(left_context)
        self.chunk_frames = chunk_frames
        self.first_chunk_frames = first_chunk_frames
        self.samples_per_frame = int(code2wav.total_upsample)
        self.frames: list[np.ndarray] = []
        self.frames_decoded = 0
        self.samples_sent = 0
        self.seconds: list[float] = []  # time of each decode

    @property
    def last_seconds(self) -> float:
        return self.seconds[-1] if self.seconds else 0.0

    def push(self, codes) -> np.ndarray | None:
        """Add one frame's 16 codes; the new samples if a chunk was due, else None."""
        self.frames.append(np.asarray(codes, dtype=np.int64).reshape(-1))
        return self._decode() if len(self.frames) - self.frames_decoded >= self._due() else None

    def _due(self) -> int:
        """New frames the next decode waits for."""
        if self.frames_decoded == 0:
            return self.first_chunk_frames
        if self.chunk_frames == "grow":
            return min(self.frames_decoded, GROW_CAP_FRAMES)  # as long as what was sent so far
        return self.chunk_frames

    def flush(self) -> np.ndarray | None:
        """Decode what is left; after the last frame this includes the tail held back so far."""
        return self._decode() if len(self.frames) > self.frames_decoded else None

    def _decode(self) -> np.ndarray:
        end = len(self.frames)
        first = max(0, self.frames_decoded - self.left_context)
        device = next(self.code2wav.parameters()).device
        codes = torch.from_numpy(np.stack(self.frames[first:end], axis=1)).unsqueeze(0).to(device)
        started = time.perf_counter()
        with torch.inference_mode():
            wav = self.code2wav(codes).reshape(-1).float().cpu().numpy()
        self.seconds.append(time.perf_counter() - started)
        offset = first * self.samples_per_frame  # where wav[0] sits in the whole reply
        chunk = np.ascontiguousarray(wav[self.samples_sent - offset :], dtype=np.float32)
        self.frames_decoded = end
        self.samples_sent += len(chunk)
        return chunk


# -- per-step recording ---------------------------------------------------------------------------------
class _StepRecorder:
    """Routing and positions of one forward of one component, from hooks that live only for that forward."""

    def __init__(self, model, component: str):
        from .instrument.sites import component_module, rotary, routers

        self.routers = routers(model, component)
        self.rotary = rotary(model, component)
        self.component_module = component_module(model, component)

    @contextmanager
    def record(self, enabled: bool) -> Iterator[dict]:
        found: dict = {"routing": {}, "positions": None}
        if not enabled:
            yield found
            return
        owner = threading.get_ident()
        handles = []

        def router_hook(layer):
            def hook(module, args, output):
                if threading.get_ident() != owner:
                    return
                logits, weights, indices = output
                found["routing"][layer] = (logits.detach(), weights.detach(), indices.detach())

            return hook

        def rotary_hook(module, args):
            if threading.get_ident() == owner and len(args) > 1 and args[1] is not None:
                pos = args[1].detach()
                found["positions"] = (pos.unsqueeze(0).expand(3, -1, -1) if pos.dim() == 2 else pos)[:3, 0]

        try:
            for layer, module in self.routers.items():
                handles.append(module.register_forward_hook(router_hook(layer)))
            if self.rotary is not None:
                handles.append(self.rotary.register_forward_pre_hook(rotary_hook))
            yield found
        finally:
            for handle in handles:
                handle.remove()


def _routing_frames(component: str, phase: str, start: int, found: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(routing rows, router_stats rows) in the Trace's columns from one forward's router outputs.

    All layers at once (one softmax, one copy to the host, one DataFrame each), so a 48-layer model
    costs about what a 4-layer one does per step.
    """
    if not found:
        return pd.DataFrame(), pd.DataFrame()
    layers = sorted(found)
    logits = torch.stack([found[layer][0] for layer in layers]).float()  # [L, n, E]
    weights = torch.stack([found[layer][1] for layer in layers])  # [L, n, k]
    indices = torch.stack([found[layer][2] for layer in layers])
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # [L, n]
    mass = probs.gather(-1, indices).sum(-1)
    n_layers, n, k = indices.shape
    layer = np.asarray(layers, dtype=np.int16)
    pos = np.arange(start, start + n, dtype=np.int32)
    routing = pd.DataFrame(
        {
            "component": component,
            "layer": np.repeat(layer, n * k),
            "pos": np.tile(np.repeat(pos, k), n_layers),
            "phase": phase,
            "rank": np.tile(np.arange(k, dtype=np.int8), n_layers * n),
            "expert": indices.to("cpu", torch.int16).numpy().ravel(),
            "weight": weights.to("cpu", torch.float16).numpy().ravel(),
        }
    )
    stats = pd.DataFrame(
        {
            "component": component,
            "layer": np.repeat(layer, n),
            "pos": np.tile(pos, n_layers),
            "phase": phase,
            "entropy": entropy.cpu().numpy().astype(np.float32).ravel(),
            "topk_mass": mass.cpu().numpy().astype(np.float32).ravel(),
        }
    )
    return routing, stats


# -- the stream -----------------------------------------------------------------------------------------
@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    times: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def now(self) -> float:
        return time.perf_counter() - self.start

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds
        self.calls[stage] = self.calls.get(stage, 0) + 1


class _Stream:
    """The state of one streamed reply; `events()` is the generator `stream` returns."""

    def __init__(self, lab, conversation, options: dict, *, seed, trace, chunk_frames, left_context):
        self.lab = lab
        self.model = lab.model
        self.thinker = lab.thinker
        self.conversation = conversation
        self.options = options
        self.seed = seed
        self.trace = trace
        self.chunk_frames = chunk_frames
        self.speech = options["return_audio"]
        self.lock = model_lock(self.model)
        self.device = lab.device
        self.left_context = left_context

    # -- the generator ----------------------------------------------------------------------------------
    def events(self) -> Iterator[StreamEvent]:
        clock = self.clock = _Clock()
        self.rng = None
        self.text_sent = ""
        self.rows = {"routing": [], "router_stats": [], "tokens": []}
        self.frames: list[np.ndarray] = []
        self.audio: list[np.ndarray] = []
        if self.speech:
            self.speech_decoder = SpeechDecoder(
                self.model.code2wav, left_context=self.left_context, chunk_frames=self.chunk_frames
            )
        self.first_packet = None
        self.ttft = {}
        self._in_step = False
        self._thinker_recorder = _StepRecorder(self.model, "thinker")

        inputs, gathered = self.lab._prepare(self.conversation, self.options["use_audio_in_video"])
        clock.add("preprocessing", clock.now())
        self.prompt_ids = inputs["input_ids"]
        self.prompt_mask = inputs.get("attention_mask")
        kwargs = self.lab.generation_kwargs(inputs, **self.options)
        thinker_kwargs, talker_kwargs = _split_kwargs(self.model, kwargs, self.speech)

        # Thinker: prepared by its own generate, then prefill → first reply token.
        started = time.perf_counter()
        with self._step():
            self.thinker_decoder = _Decoder(
                self.thinker, self.thinker.generate(custom_generate=_capture, **thinker_kwargs)
            )
            token, found = self._run_thinker(self.thinker_decoder.prefill)
            _sync(self.device)
        clock.add("thinker_prefill", time.perf_counter() - started)
        self.ttft["thinker"] = time.perf_counter() - started
        yield from self._thinker_events(token, found, phase="prefill")

        talker = None
        if self.speech:
            started = time.perf_counter()
            with self._step():
                talker = self._start_talker(talker_kwargs)
                _sync(self.device)
            clock.add("talker_prefill", time.perf_counter() - started)
            self.ttft["talker"] = time.perf_counter() - started
            yield from self._talker_trace(talker, phase="prefill")

        pending = None  # the talker's next inputs, prepared (frame's codes known) but not yet run
        while not (self.thinker_decoder.done and (talker is None or talker.done)):
            if talker is not None and not talker.done:
                if pending is None:
                    pending = yield from self._talker_prepare(talker)
                if self._entry_ready(talker):
                    yield from self._talker_forward(talker, pending)
                    pending = None
            if not self.thinker_decoder.done:
                yield from self._thinker_step()
        if self.speech:
            yield from self._decode_audio(final=True)
        yield from self._text_events(final=True)
        yield self._done(gathered)

    # -- one step under the model lock, with this stream's RNG ------------------------------------------
    @contextmanager
    def _step(self):
        if self._in_step:  # a step inside a step: the outer one holds the lock and the RNG
            yield
            return
        self._in_step = True
        try:
            with self.lock, torch.inference_mode(), self._stream_rng():
                yield
        finally:
            self._in_step = False

    @contextmanager
    def _stream_rng(self):
        """With a seed, this stream's own RNG state for the step, the caller's restored after it."""
        if self.seed is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.rng is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.rng[0])
                if devices:
                    torch.cuda.set_rng_state(self.rng[1], self.device)
            yield
            self.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if devices else None)

    # -- thinker --------------------------------------------------------------------------------------
    def _run_thinker(self, fn, *args):
        with self._thinker_recorder.record(self.trace) as found:
            token = fn(*args)
        return token, found

    def _thinker_step(self) -> Iterator[StreamEvent]:
        decoder = self.thinker_decoder
        started = time.perf_counter()
        with self._step():
            inputs = decoder.prepare()
            token, found = self._run_thinker(decoder.forward, inputs)
            _sync(self.device)
        self.clock.add("thinker_decode", time.perf_counter() - started)
        yield from self._thinker_events(token, found, phase="decode")

    def _thinker_events(self, token, found, *, phase: str) -> Iterator[StreamEvent]:
        decoder = self.thinker_decoder
        fed = decoder.input_ids[0, :-1]  # the forward just run consumed everything but the new token
        start = 0 if phase == "prefill" else len(fed) - 1
        step = decoder.steps - 1
        self._record_trace("thinker", phase, step, start, fed[start:], found)
        if self.trace:
            yield self._trace_event("thinker", phase, step, start, fed[start:], found)
        yield from self._text_events()

    def _text_events(self, final: bool = False) -> Iterator[StreamEvent]:
        ids = self.thinker_decoder.generated.tolist()
        text = self.lab.processor.tokenizer.decode(ids, skip_special_tokens=True)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its next token
        if not text.startswith(self.text_sent):
            # Detokenization rewrote text already sent (rare); the done event's reply has the true text.
            log.debug("reply text %r no longer starts with the streamed %r", text, self.text_sent)
        elif len(text) > len(self.text_sent):
            delta = text[len(self.text_sent) :]
            self.text_sent = text
            yield StreamEvent("text", self.clock.now(), text=delta)

    # -- talker ---------------------------------------------------------------------------------------
    def _start_talker(self, talker_kwargs: dict) -> _Decoder:
        """The talker's prompt from the thinker's prefill and first token, exactly as `generate` builds it."""
        model, talker, thinker = self.model, self.model.talker, self.thinker
        decoder = self.thinker_decoder
        hidden = decoder.outputs.hidden_states
        prompt_length = decoder.prompt_length
        first = decoder.generated[:1].view(1, 1)
        embed = thinker.get_input_embeddings()
        thinker_embed = torch.cat([hidden[0][:, :prompt_length], embed(first)], dim=1)
        thinker_hidden = hidden[model.config.talker_config.accept_hidden_layer][:, :prompt_length]
        prompt = _talker_prompt(
            model,
            self.prompt_ids,
            self.prompt_mask,
            thinker_embed,
            thinker_hidden,
            self.lab.speaker_id(self.options["speaker"]),
        )
        self.tts_pad, self.tts_eos = prompt["tts_pad"], prompt["tts_eos"]
        # -0.0 is the exact additive identity: the code predictor runs before the thinker has the text
        # this step consumes, and the text entry is added to the summed codec embeddings afterwards.
        self.no_text = torch.full_like(self.tts_pad, -0.0)
        self.entries: list[torch.Tensor] = []
        self.entries_final = False
        self._consume_thinker_tokens()
        with _code_predictor_sampling(talker, talker_kwargs["do_sample"]):
            prepared = talker.generate(
                inputs_embeds=prompt["inputs_embeds"],
                trailing_text_hidden=self.no_text,
                tts_pad_embed=self.tts_pad,
                talker_input_ids=prompt["input_ids"],
                attention_mask=prompt["attention_mask"],
                custom_generate=_capture,
                **talker_kwargs,
            )
        self.talker_do_sample = talker_kwargs["do_sample"]
        talker_decoder = _Decoder(talker, prepared)
        self._talker_recorder = _StepRecorder(self.model, "talker")
        self.talker_prompt_ids = prompt["input_ids"][0]
        with self._talker_recorder.record(self.trace) as found:
            talker_decoder.prefill()
        self._talker_found = found
        return talker_decoder

    def _consume_thinker_tokens(self) -> None:
        """Turn the thinker's new reply tokens into the talker's trailing text entries.

        Entry j holds reply token j+1 (token 0 is in the talker's prompt); the thinker's last token
        is replaced by the end-of-speech marker (tts_eos), as `generate` does, and entries past it
        are tts_pad.
        """
        if self.entries_final:
            return
        generated = self.thinker_decoder.generated
        embed = self.thinker.get_input_embeddings()
        known = len(self.entries) + 1  # tokens already accounted for (token 0 is in the prompt)
        last = len(generated) - 1 if self.thinker_decoder.done else None
        with self._step():
            for index in range(known, len(generated)):
                if index == last:
                    break
                token = generated[index : index + 1].view(1, 1)
                self.entries.append(self.model.talker.text_projection(embed(token)))
        if self.thinker_decoder.done:
            self.entries.append(self.tts_eos)
            self.entries_final = True

    def _entry_ready(self, talker: _Decoder) -> bool:
        self._consume_thinker_tokens()
        step = talker.kwargs["generation_step"]  # the trailing entry the next forward consumes
        return self.entries_final or step < len(self.entries)

    def _talker_prepare(self, talker: _Decoder) -> Iterator[StreamEvent]:
        """Run the code predictor for the newest codebook-0 token: the frame is complete, decode it."""
        started = time.perf_counter()
        with self._step(), _code_predictor_sampling(self.model.talker, self.talker_do_sample):
            step = talker.kwargs["generation_step"]
            inputs = talker.prepare(trailing_text_hidden=self.no_text.expand(-1, step + 1, -1))
            codes = inputs["residual_codes"][0].to("cpu", torch.int64).numpy()
            _sync(self.device)
        self.clock.add("code_predictor", time.perf_counter() - started)
        self.frames.append(codes)
        yield from self._decode_audio()
        return inputs

    def _talker_forward(self, talker: _Decoder, inputs: dict) -> Iterator[StreamEvent]:
        step = talker.kwargs["generation_step"]
        entry = self.entries[step] if step < len(self.entries) else self.tts_pad
        started = time.perf_counter()
        with self._step():
            embeds = inputs["inputs_embeds"]
            inputs = dict(inputs, inputs_embeds=embeds + entry.to(embeds.device))
            with self._talker_recorder.record(self.trace) as found:
                talker.forward(inputs)
            _sync(self.device)
        self.clock.add("talker_decode", time.perf_counter() - started)
        self._talker_found = found
        yield from self._talker_trace(talker, phase="decode", frame=len(self.frames) - 1)

    def _talker_trace(self, talker: _Decoder, *, phase: str, frame: int = -1) -> Iterator[StreamEvent]:
        step = talker.steps - 1
        if phase == "prefill":  # embeddings, keyed by the ids generate hands the talker for its positions
            start, ids = 0, self.talker_prompt_ids
        else:
            start = int(self.talker_prompt_ids.shape[0]) + step - 1
            ids = talker.input_ids[0, -2:-1]  # the codebook-0 token this forward consumed
        self._record_trace("talker", phase, step, start, ids, self._talker_found)
        if self.trace:
            yield self._trace_event("talker", phase, step, start, ids, self._talker_found, frame=frame)

    # -- audio ----------------------------------------------------------------------------------------
    def _decode_audio(self, final: bool = False) -> Iterator[StreamEvent]:
        """Hand the newest frame to code2wav (or flush at the end); emit the samples that came out."""
        speech = self.speech_decoder
        with self._step():
            chunk = speech.flush() if final else speech.push(self.frames[-1])
        if chunk is None or len(chunk) == 0:
            return
        self.clock.add("code2wav", speech.last_seconds)
        event = StreamEvent(
            "audio",
            self.clock.now(),
            audio=chunk,
            sample_offset=speech.samples_sent - len(chunk),
            frame=speech.frames_decoded - 1,
        )
        self.audio.append(chunk)
        if self.first_packet is None:
            self.first_packet = event.seconds
        yield event

    # -- trace ----------------------------------------------------------------------------------------
    def _record_trace(self, component, phase, step, start, ids, found) -> None:
        positions = found.get("positions")
        ids = ids.to("cpu", torch.int64).numpy()
        n = len(ids)
        if positions is None or positions.shape[-1] != n:
            positions = np.tile(np.arange(start, start + n), (3, 1))
        else:
            positions = positions.to("cpu", torch.int64).numpy()
        self.rows["tokens"].append(
            pd.DataFrame(
                {
                    "component": component,
                    "phase": phase,
                    "step": step,
                    "pos": np.arange(start, start + n),
                    "token_id": ids,
                    "t": positions[0],
                    "h": positions[1],
                    "w": positions[2],
                }
            )
        )
        if found.get("routing"):
            routing, stats = _routing_frames(component, phase, start, found["routing"])
            self.rows["routing"].append(routing)
            self.rows["router_stats"].append(stats)
            found["table"] = routing

    def _trace_event(self, component, phase, step, start, ids, found, frame: int = -1) -> StreamEvent:
        return StreamEvent(
            "trace",
            self.clock.now(),
            component=component,
            phase=phase,
            step=step,
            frame=frame,
            routing=found.get("table", pd.DataFrame()),
            positions=self.rows["tokens"][-1],
        )

    def _unfed_token(self) -> pd.DataFrame:
        """The thinker's last token is never fed back, yet belongs in the tokens table (as the Tracer has it)."""
        decoder = self.thinker_decoder
        pos = int(decoder.input_ids.shape[1]) - 1
        thinker_rows = [f for f in self.rows["tokens"] if len(f) and f["component"].iloc[0] == "thinker"]
        last = thinker_rows[-1].iloc[-1]
        shift = pos - int(last["pos"])
        return pd.DataFrame(
            {
                "component": ["thinker"],
                "phase": ["decode"],
                "step": [decoder.steps],
                "pos": [pos],
                "token_id": [int(decoder.input_ids[0, -1])],
                "t": [int(last["t"]) + shift],
                "h": [int(last["h"]) + shift],
                "w": [int(last["w"]) + shift],
            }
        )

    # -- done -----------------------------------------------------------------------------------------
    def _done(self, gathered) -> StreamEvent:
        from .instrument.tracer import STAGES, _annotate, _pps, _spans, concat_columns, trace_meta

        clock = self.clock
        full = clock.now()
        token_ids = self.thinker_decoder.generated.tolist()
        text = self.lab.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        audio = (
            np.concatenate(self.audio) if self.audio else (np.zeros(0, np.float32) if self.speech else None)
        )
        num_books = self.lab.num_codebooks
        codes = (
            np.stack(self.frames)
            if self.frames
            else (np.zeros((0, num_books), np.int64) if self.speech else None)
        )
        speech_seconds = 0.0 if audio is None else len(audio) / SAMPLE_RATE
        times, calls = clock.times, clock.calls
        per = lambda stage: times[stage] / calls[stage] if calls.get(stage) else math.nan  # noqa: E731
        stages = tuple((s, times[s], calls[s]) for s in ("preprocessing", *STAGES) if s in times)
        timings = Timings(
            preprocessing=times.get("preprocessing", 0.0),
            thinker_ttft=self.ttft.get("thinker", math.nan),
            talker_ttft=self.ttft.get("talker", math.nan),
            code_predictor_per_frame=per("code_predictor"),
            code2wav_per_chunk=per("code2wav"),
            first_packet_latency=math.nan if self.first_packet is None else self.first_packet,
            full_reply_latency=full,
            real_time_factor=full / speech_seconds if speech_seconds else math.nan,
            thinker_tokens=len(token_ids),
            frames=0 if codes is None else len(codes),
            chunks=calls.get("code2wav", 0),
            speech_seconds=speech_seconds,
            device=str(self.device),
            stages=stages,
        )
        tables = {}
        tokenizer, pps = self.lab.processor.tokenizer, _pps(self.model)
        tokens = [f for f in self.rows["tokens"] if len(f)] + [self._unfed_token()]
        if tokens:
            frame = pd.concat(tokens, ignore_index=True)
            tables["tokens"] = concat_columns(
                [
                    _annotate({c: part[c].to_numpy() for c in part.columns}, component, tokenizer, pps)
                    for component, part in frame.groupby("component", sort=False)
                ]
            )
            tables["spans"] = _spans(tables["tokens"])
        for name in ("routing", "router_stats"):
            parts = [f for f in self.rows[name] if len(f)]
            if parts:
                tables[name] = pd.concat(parts, ignore_index=True)
        if codes is not None and len(codes):
            frames, books = np.meshgrid(np.arange(codes.shape[0]), np.arange(codes.shape[1]), indexing="ij")
            tables["codes"] = pd.DataFrame(
                {"frame": frames.ravel(), "codebook": books.ravel(), "code": codes.ravel()}
            )
        tables["timings"] = pd.DataFrame(list(stages), columns=["stage", "seconds", "calls"])
        meta = trace_meta(
            self.lab,
            capture=["routing", "positions", "codes", "timings"]
            if self.trace
            else ["positions", "codes", "timings"],
            text=text,
            items=gathered.items,
            use_audio_in_video=self.options["use_audio_in_video"],
            streamed=True,
            latency=timings.as_dict(),
        )
        trace = Trace.build(audio=audio, sample_rate=SAMPLE_RATE, meta=meta, **tables)
        reply = Reply(
            text, token_ids, audio, SAMPLE_RATE, codes, self.lab.model_id, self.lab.random_weights, trace
        )
        return StreamEvent("done", full, text=text, reply=reply, trace=trace, timings=timings)


# -- what generate does before decoding, for a stream ---------------------------------------------------
def _split_kwargs(model, kwargs: dict, speech: bool) -> tuple[dict, dict]:
    """The thinker's and the talker's `generate` arguments, split as `model.generate` splits them."""
    if not hasattr(model, "thinker"):  # a thinker-only checkpoint: its generate takes them unprefixed
        thinker = {
            k.removeprefix("thinker_"): v
            for k, v in kwargs.items()
            if not k.startswith(("talker_", "token2wav_")) and k not in ("return_audio", "speaker")
        }
        return thinker, {}
    bound = inspect.signature(type(model).generate).bind(model, **kwargs)
    bound.apply_defaults()
    named, extra = bound.arguments, bound.arguments.get("kwargs", {})
    config = model.config.talker_config
    shared = {"use_audio_in_video": named["use_audio_in_video"]}
    thinker = {
        "max_new_tokens": named["thinker_max_new_tokens"],
        "eos_token_id": named["thinker_eos_token_id"],
    }
    talker = {}
    if speech:
        vocab = config.text_config.vocab_size
        talker = {
            "max_new_tokens": named["talker_max_new_tokens"],
            "do_sample": named["talker_do_sample"],
            "top_k": named["talker_top_k"],
            "top_p": named["talker_top_p"],
            "temperature": named["talker_temperature"],
            "eos_token_id": config.codec_eos_token_id,
            "repetition_penalty": named["talker_repetition_penalty"],
            "suppress_tokens": [i for i in range(vocab - 1024, vocab) if i != config.codec_eos_token_id],
            "output_hidden_states": True,
            "return_dict_in_generate": True,
        }
    for key, value in extra.items():
        if key.startswith("thinker_"):
            thinker[key[len("thinker_") :]] = value
        elif key.startswith("talker_"):
            talker[key[len("talker_") :]] = value
        elif key.startswith("token2wav_"):
            continue
        elif key == "feature_attention_mask":
            thinker[key] = value
            talker["audio_feature_lengths"] = torch.sum(value, dim=1)
        elif key in ("input_features", "attention_mask"):
            thinker[key] = value
        else:
            shared[key] = value
    for key, value in shared.items():
        thinker.setdefault(key, value)
        if key in ("image_grid_thw", "video_grid_thw", "video_second_per_grid"):
            talker.setdefault(key, value)
    thinker["input_ids"] = named["input_ids"]
    if speech:
        thinker.update(output_hidden_states=True, return_dict_in_generate=True)
    return thinker, talker


def _talker_prompt(model, input_ids, attention_mask, thinker_embed, thinker_hidden, speaker_id: int) -> dict:
    """The talker's prefill, built by the lines of `generate` that build it, from the prompt and first token.

    `thinker_embed` covers the prompt and the first reply token, `thinker_hidden` (the
    `accept_hidden_layer` states) the prompt. Returns inputs_embeds, input_ids and attention_mask for
    the talker, and the projected tts_pad / tts_eos embeddings.
    """
    config = model.config
    thinker_config = config.thinker_config
    multimodal_mask = (
        (input_ids == thinker_config.audio_token_id)
        | (input_ids == thinker_config.image_token_id)
        | (input_ids == thinker_config.video_token_id)
    )
    mask = (
        input_ids.new_ones(input_ids.shape) if attention_mask is None else attention_mask.to(input_ids.device)
    )
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    im_starts = torch.where(input_ids == config.im_start_token_id, positions, positions.new_full((), -1))
    previous_im_start = torch.cummax(im_starts, dim=-1).values.clamp_min(0)
    roles = input_ids.gather(1, (previous_im_start + 1).clamp_max(length - 1))
    user_mask = (roles == config.user_token_id) & mask.bool()
    user_lengths = user_mask.sum(dim=-1)
    max_user = int(user_lengths.max().item())
    if max_user == 0:
        raise ConversationError("the conversation has no user turn; the talker speaks a reply to one")
    user_indices = torch.where(user_mask, length + positions, positions).argsort(dim=-1)[:, -max_user:]
    full_user = model._get_talker_user_parts(0, length, multimodal_mask, thinker_hidden, thinker_embed)
    user_embeds = full_user.gather(1, user_indices.unsqueeze(-1).expand(-1, -1, full_user.shape[-1]))
    user_ids = input_ids.gather(1, user_indices)
    user_attention = (
        torch.arange(max_user, device=input_ids.device).unsqueeze(0) >= (max_user - user_lengths).unsqueeze(1)
    ).to(mask.dtype)
    starts = (input_ids[:, :-1] == config.im_start_token_id) & (input_ids[:, 1:] == config.assistant_token_id)
    assistant_start = torch.nonzero(starts[0], as_tuple=False).flatten()[-1].item()
    special = torch.tensor(
        [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
        device=model.thinker.device,
        dtype=input_ids.dtype,
    )
    tts_bos, tts_eos, tts_pad = (
        model.talker.text_projection(model.thinker.get_input_embeddings()(special))
        .to(input_ids.device)
        .chunk(3, dim=1)
    )
    assistant_embeds, assistant_ids, _ = model._get_talker_assistant_parts(
        assistant_start, thinker_embed.shape[1], speaker_id, thinker_embed, tts_pad, tts_bos, tts_eos
    )
    return {
        "inputs_embeds": torch.cat((user_embeds, assistant_embeds), dim=1),
        "input_ids": torch.cat((user_ids, assistant_ids), dim=1),
        "attention_mask": torch.cat((user_attention, mask.new_ones((1, assistant_embeds.shape[1]))), dim=1),
        "tts_pad": tts_pad,
        "tts_eos": tts_eos,
    }


@contextmanager
def _code_predictor_sampling(talker, do_sample: bool) -> Iterator[None]:
    """The talker reads its code predictor's `do_sample` every step (generate sets it): set it, then restore."""
    config = talker.code_predictor.generation_config
    saved = config.do_sample
    config.do_sample = do_sample
    try:
        yield
    finally:
        config.do_sample = saved
