"""The stream: thinker, talker, code predictor and code2wav stepped in one generator (see the package)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from ..conversation import prepare_inputs
from ..errors import ConversationError, InterventionError
from ..generation import quiet_talker_penalty_notice, split_kwargs
from ..instrument.record import CodesRecorder, Recording, TimingsRecorder, Turn
from ..instrument.speech_decoder import SpeechDecoder
from ..instrument.tracer import assemble_trace, capture_spec, recorders_for
from ..options import GenerationOptions, with_option_keywords
from ..reply import SAMPLE_RATE, Reply
from .events import StreamEvent, Timings
from .steps import Decoder, capture, code_predictor_sampling, model_lock, sync, talker_prompt

log = logging.getLogger(__name__)

STREAM_CAPTURES = ("routing", "positions", "codes", "timings", "logits")


@with_option_keywords
def stream(
    lab,
    conversation,
    options: GenerationOptions | None = None,
    *,
    trace=False,
    chunk_frames: int | str = "grow",
    left_context: int | None = None,
    **changes,
) -> Iterator[StreamEvent]:
    """Stream one assistant turn: text deltas, audio chunks and trace events as they are made.

    The options are those of `OmniLab.generate` (greedy by default; the same text and codes), and
    so is `trace`: False (default) records nothing (`done.trace` and `reply.trace` are None), True
    the default capture, a capture spec those captures of STREAM_CAPTURES; when recording, "trace"
    events carry each forward's routing and positions. Plus: `chunk_frames` (frames per code2wav
    decode after the first, which always decodes the first frame alone for the soonest packet; more
    amortize the left context; "grow" makes each as long as all the audio sent before it (1, 2, 4,
    8 ... up to `GROW_CAP_FRAMES`), so that the audio already sent covers the wait for the next
    chunk whenever the codes come at least as fast as real time) and `left_context` (frames of
    causal context per decode; default `exact_left_context`, the receptive field of code2wav, which
    keeps the audio equal to a full decode's to rounding).
    Returns a generator; nothing runs until the first `next()`, and `close()` stops it.
    """
    options = lab.options(options, **changes)
    if chunk_frames != "grow" and (
        isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1
    ):
        raise ConversationError(f"chunk_frames must be a positive int or 'grow'; got {chunk_frames!r}")
    if left_context is not None and (not isinstance(left_context, int) or left_context < 1):
        raise ConversationError(f"left_context must be a positive number of frames; got {left_context!r}")
    spec = capture_spec(None if trace is True else trace) if trace else ()
    unsupported = sorted(set(spec) - set(STREAM_CAPTURES))
    if unsupported:
        raise InterventionError(
            f"a stream cannot capture {unsupported}; it records {', '.join(STREAM_CAPTURES)}; "
            "use lab.generate(..., trace=...) for the others"
        )
    return _Stream(lab, conversation, options, spec, chunk_frames, left_context).events()


class _Stream:
    """The state of one streamed reply; `events()` is the generator `stream` returns."""

    def __init__(self, lab, conversation, options: GenerationOptions, spec, chunk_frames, left_context):
        self.lab = lab
        self.model = lab.model
        self.thinker = lab.thinker
        self.conversation = conversation
        self.options = options
        self.seed = options.seed
        self.capture = spec
        self.trace = bool(spec)
        self.chunk_frames = chunk_frames
        self.speech = options.return_audio
        self.lock = model_lock(self.model)
        self.device = lab.device
        self.left_context = left_context

    # -- the generator ----------------------------------------------------------------------------------
    def events(self) -> Iterator[StreamEvent]:
        # The capture's recorders; a stream adds the codes and stage times it has itself (hooks=False).
        recording = self.recording = (
            Recording(self.model, recorders_for(self.model, self.capture, hooks=False))
            if self.trace
            else None
        )
        recorder = recording.recorder if recording else lambda kind: None
        self.timings = recorder("timings") or TimingsRecorder(hooks=False)
        self.codes = recorder("codes") or CodesRecorder(hooks=False)
        self.tokens, self.routing = recorder("positions"), recorder("routing")
        self.frames = self.codes.frames
        self.started = time.perf_counter()
        self.rng = None
        self.text_sent = ""
        self.audio: list[np.ndarray] = []
        if self.speech:
            self.speech_decoder = SpeechDecoder(
                self.model.code2wav, left_context=self.left_context, chunk_frames=self.chunk_frames
            )
        self.first_packet = None
        self.ttft = {}
        self._in_step = False

        inputs, gathered = prepare_inputs(
            self.lab.processor,
            self.conversation,
            use_audio_in_video=self.options.use_audio_in_video,
            video_size=self.lab.video_size,
            device=self.device,
        )
        self.timings.add("preprocessing", self.now())
        self.prompt_ids = inputs["input_ids"]
        self.prompt_mask = inputs.get("attention_mask")
        kwargs = self.lab.generation_kwargs(inputs, self.options)
        thinker_kwargs, talker_kwargs = split_kwargs(self.model, kwargs, self.speech)

        # Thinker: prepared by its own generate, then prefill → first reply token.
        started = time.perf_counter()
        with self._step():
            self.thinker_decoder = Decoder(
                self.thinker, self.thinker.generate(custom_generate=capture, **thinker_kwargs)
            )
            with self._recorded():
                self.thinker_decoder.prefill()
            sync(self.device)
        self.timings.add("thinker_prefill", time.perf_counter() - started)
        self.ttft["thinker"] = time.perf_counter() - started
        yield from self._thinker_events()

        talker = None
        if self.speech and not self._empty_reply():
            started = time.perf_counter()
            with self._step():
                talker = self._start_talker(talker_kwargs)
                sync(self.device)
            self.timings.add("talker_prefill", time.perf_counter() - started)
            self.ttft["talker"] = time.perf_counter() - started
            yield from self._trace_event("talker")

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

    def _empty_reply(self) -> bool:
        """The thinker's first token ended its reply: no text to speak (`generate` gives empty speech too)."""
        ids = self.thinker_decoder.generated.tolist()
        return self.thinker_decoder.done and ids == [self.model.config.im_end_token_id]

    def now(self) -> float:
        """Seconds since the stream started (its first `next()`)."""
        return time.perf_counter() - self.started

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
    def _recorded(self):
        """Record the forwards run inside (the hooks live only for them, and see only this thread)."""
        if self.recording is None:
            yield
            return
        self.recording.thread = self.recording.tracker.thread = threading.get_ident()
        with self.recording:
            yield

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
    def _thinker_step(self) -> Iterator[StreamEvent]:
        decoder = self.thinker_decoder
        started = time.perf_counter()
        with self._step():
            inputs = decoder.prepare()
            with self._recorded():
                decoder.forward(inputs)
            sync(self.device)
        self.timings.add("thinker_decode", time.perf_counter() - started)
        yield from self._thinker_events()

    def _thinker_events(self) -> Iterator[StreamEvent]:
        yield from self._trace_event("thinker")
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
            yield StreamEvent("text", self.now(), text=delta)

    # -- talker ---------------------------------------------------------------------------------------
    def _start_talker(self, talker_kwargs: dict) -> Decoder:
        """The talker's prompt from the thinker's prefill and first token, exactly as `generate` builds it."""
        model, talker, thinker = self.model, self.model.talker, self.thinker
        decoder = self.thinker_decoder
        hidden = decoder.outputs.hidden_states
        prompt_length = decoder.prompt_length
        first = decoder.generated[:1].view(1, 1)
        embed = thinker.get_input_embeddings()
        thinker_embed = torch.cat([hidden[0][:, :prompt_length], embed(first)], dim=1)
        thinker_hidden = hidden[model.config.talker_config.accept_hidden_layer][:, :prompt_length]
        prompt = talker_prompt(
            model,
            self.prompt_ids,
            self.prompt_mask,
            thinker_embed,
            thinker_hidden,
            self.lab.speaker_id(self.options.speaker),
        )
        self.tts_pad, self.tts_eos = prompt["tts_pad"], prompt["tts_eos"]
        # -0.0 is the exact additive identity: the code predictor runs before the thinker has the text
        # this step consumes, and the text entry is added to the summed codec embeddings afterwards.
        self.no_text = torch.full_like(self.tts_pad, -0.0)
        self.entries: list[torch.Tensor] = []
        self.entries_final = False
        self._consume_thinker_tokens()
        quiet_talker_penalty_notice()
        with code_predictor_sampling(talker, talker_kwargs["do_sample"]):
            prepared = talker.generate(
                inputs_embeds=prompt["inputs_embeds"],
                trailing_text_hidden=self.no_text,
                tts_pad_embed=self.tts_pad,
                talker_input_ids=prompt["input_ids"],
                attention_mask=prompt["attention_mask"],
                custom_generate=capture,
                **talker_kwargs,
            )
        self.talker_do_sample = talker_kwargs["do_sample"]
        talker_decoder = Decoder(talker, prepared)
        with self._recorded():
            talker_decoder.prefill()
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

    def _entry_ready(self, talker: Decoder) -> bool:
        self._consume_thinker_tokens()
        step = talker.kwargs["generation_step"]  # the trailing entry the next forward consumes
        return self.entries_final or step < len(self.entries)

    def _talker_prepare(self, talker: Decoder) -> Iterator[StreamEvent]:
        """Run the code predictor for the newest codebook-0 token: the frame is complete, decode it."""
        started = time.perf_counter()
        with self._step(), code_predictor_sampling(self.model.talker, self.talker_do_sample):
            step = talker.kwargs["generation_step"]
            inputs = talker.prepare(trailing_text_hidden=self.no_text.expand(-1, step + 1, -1))
            codes = inputs["residual_codes"][0].to("cpu", torch.int64).numpy()
            sync(self.device)
        self.timings.add("code_predictor", time.perf_counter() - started)
        self.codes.add(codes)
        yield from self._decode_audio()
        return inputs

    def _talker_forward(self, talker: Decoder, inputs: dict) -> Iterator[StreamEvent]:
        step = talker.kwargs["generation_step"]
        entry = self.entries[step] if step < len(self.entries) else self.tts_pad
        started = time.perf_counter()
        with self._step():
            embeds = inputs["inputs_embeds"]
            inputs = dict(inputs, inputs_embeds=embeds + entry.to(embeds.device))
            with self._recorded():
                talker.forward(inputs)
            sync(self.device)
        self.timings.add("talker_decode", time.perf_counter() - started)
        yield from self._trace_event("talker", frame=len(self.frames) - 1)

    # -- audio ----------------------------------------------------------------------------------------
    def _decode_audio(self, final: bool = False) -> Iterator[StreamEvent]:
        """Hand the newest frame to code2wav (or flush at the end); emit the samples that came out."""
        speech = self.speech_decoder
        with self._step():
            chunk = speech.flush() if final else speech.push(self.frames[-1])
        if chunk is None or len(chunk) == 0:
            return
        self.timings.add("code2wav", speech.last_seconds)
        event = StreamEvent(
            "audio",
            self.now(),
            audio=chunk,
            sample_offset=speech.samples_sent - len(chunk),
            frame=speech.frames_decoded - 1,
        )
        self.audio.append(chunk)
        if self.first_packet is None:
            self.first_packet = event.seconds
        yield event

    # -- trace ----------------------------------------------------------------------------------------
    def _trace_event(self, component: str, frame: int = -1) -> Iterator[StreamEvent]:
        """The newest forward of `component`: its place, routing rows and token rows."""
        if self.recording is None:
            return
        positions = self.tokens.last_frame(component)
        yield StreamEvent(
            "trace",
            self.now(),
            component=component,
            phase=str(positions["phase"].iloc[0]),
            step=int(positions["step"].iloc[0]),
            frame=frame,
            routing=self.routing.last_frame() if self.routing else pd.DataFrame(),
            positions=positions,
        )

    # -- done -----------------------------------------------------------------------------------------
    def _done(self, gathered) -> StreamEvent:
        full = self.now()
        token_ids = self.thinker_decoder.generated.tolist()
        text = self.lab.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        audio = (
            np.concatenate(self.audio) if self.audio else (np.zeros(0, np.float32) if self.speech else None)
        )
        codes = self.codes.codes(self.lab.num_codebooks) if self.speech else None
        speech_seconds = 0.0 if audio is None else len(audio) / SAMPLE_RATE
        times, calls = self.timings.times, self.timings.calls
        per = lambda stage: times[stage] / calls[stage] if calls.get(stage) else math.nan  # noqa: E731
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
            stages=self.timings.stages(),
        )
        trace = None
        if self.recording is not None:
            turn = Turn(
                self.lab.processor.tokenizer,
                prompt_length=self.thinker_decoder.prompt_length,
                token_ids=tuple(token_ids),
            )
            trace = assemble_trace(
                self.lab,
                self.recording,
                turn,
                capture=self.capture,
                text=text,
                items=gathered.items,
                use_audio_in_video=self.options.use_audio_in_video,
                audio=audio,
                spoke=bool(self.speech),
                streamed=True,
                latency=timings.as_dict(),
            )
        reply = Reply(
            text, token_ids, audio, SAMPLE_RATE, codes, self.lab.model_id, self.lab.random_weights, trace
        )
        return StreamEvent("done", full, text=text, reply=reply, trace=trace, timings=timings)
