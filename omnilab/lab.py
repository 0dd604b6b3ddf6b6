"""OmniLab: the one object a user holds — prepare, generate, trace, intervene, stream."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import BatchFeature, StoppingCriteria, StoppingCriteriaList

from . import conversation as conv
from .conversation import VIDEO_FPS  # noqa: F401  (re-exported)
from .errors import ConversationError
from .generation import last_logits_only, quiet_talker_penalty_notice, thinker_only_kwargs
from .models.loading import Loaded, load_model
from .models.loading import save as save_checkpoint
from .options import GenerationOptions, options_from, with_option_keywords
from .reply import SAMPLE_RATE, SAMPLES_PER_FRAME, Reply  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


PRESET_SPEECH_FRAMES = 48  # random-weight talkers never emit EOS: cap their speech (3.84 s)
DEFAULT_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
    "auditory and visual inputs, as well as generating text and speech."
)
RANDOM_WEIGHTS_NOTE = (
    "random-weight model of the real Qwen3-Omni architecture: its text and speech are noise; "
    "load real weights with omnilab.load('Qwen/Qwen3-Omni-30B-A3B-Instruct')"
)


class EmptyReply(Exception):
    """The thinker's first token ended its reply: `sequences` are the prompt and that token."""

    def __init__(self, sequences: torch.Tensor):
        super().__init__("empty reply")
        self.sequences = sequences


class StopAtEmptyReply(StoppingCriteria):
    """A stopping criterion that raises EmptyReply when the first generated token is `end_id`;
    `sequences` holds the thinker's sequences as it last saw them (the whole reply, once it ends)."""

    def __init__(self, prompt_length: int, end_id: int):
        self.prompt_length, self.end_id = prompt_length, int(end_id)
        self.sequences: torch.Tensor | None = None

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.sequences = input_ids
        if input_ids.shape[1] == self.prompt_length + 1 and int(input_ids[0, -1]) == self.end_id:
            raise EmptyReply(input_ids)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class NoSpeech(Exception):
    """The talker's first code ended its speech: the reply has no frame to decode."""


class StopAtNoSpeech(StoppingCriteria):
    """A talker stopping criterion that raises NoSpeech when its first generated code is `end_id`.

    A talker may end its speech at once (the organism's does when its reply's text is over), and
    upstream generate then stacks the codes of no frames: "stack expects a non-empty TensorList".
    """

    def __init__(self, end_id: int):
        self.end_id = int(end_id)

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        # The talker is prompted with embeddings only: its input_ids are the codes it generated.
        if input_ids.shape[1] == 1 and bool((input_ids[:, 0] == self.end_id).all()):
            raise NoSpeech()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class OmniLab:
    """A Qwen3-Omni model with its processor, and the instruments around it."""

    def __init__(self, loaded: Loaded):
        self._loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.model_id = loaded.model_id
        self.random_weights = loaded.random_weights
        self.video_size = loaded.video_size  # the processor's video frame size (None: its own)

    def __repr__(self) -> str:
        note = " (random weights)" if self.random_weights else ""
        return f"OmniLab({self.model_id!r}{note}, talker={self.has_talker})"

    # -- what the model is -------------------------------------------------------------------
    @property
    def has_talker(self) -> bool:
        return bool(getattr(self.model, "has_talker", False))

    @property
    def thinker(self) -> torch.nn.Module:
        return self.model.thinker if hasattr(self.model, "thinker") else self.model

    @property
    def device(self) -> torch.device:
        return self.thinker.get_input_embeddings().weight.device

    @property
    def speakers(self) -> list[str]:
        if not self.has_talker:
            return []
        return sorted(name.capitalize() for name in self.model.config.talker_config.speaker_id)

    def card(self):
        """The architecture card of this model (a DataFrame)."""
        from .models.card import card

        return card(self.model)

    def save(self, directory: str | Path) -> Path:
        """Save model and processor so that `omnilab.load(directory)` gives this model back."""
        return save_checkpoint(self._loaded, directory)

    # -- inputs ----------------------------------------------------------------------------------
    def prepare(
        self, conversation, *, use_audio_in_video: bool = False, add_generation_prompt: bool = True
    ) -> BatchFeature:
        """The exact model inputs (a BatchFeature) that `generate` uses for `conversation`."""
        return self._prepare(conversation, use_audio_in_video, add_generation_prompt)[0]

    def _prepare(self, conversation, use_audio_in_video: bool, add_generation_prompt: bool = True):
        return conv.prepare_inputs(
            self.processor,
            conversation,
            use_audio_in_video=use_audio_in_video,
            add_generation_prompt=add_generation_prompt,
            video_size=self.video_size,
            device=self.device,
        )

    def forward(
        self, conversation, *, use_audio_in_video: bool = False, add_generation_prompt: bool = True
    ) -> torch.Tensor:
        """One forward of the thinker over the prompt, generating nothing: its logits [1, L, vocab].

        Inside `lab.trace()` this records the prompt's routing and positions with the same metadata
        (media items, use_audio_in_video) that `generate` records.
        """
        inputs, gathered = self._prepare(conversation, use_audio_in_video, add_generation_prompt)
        from .instrument.context import model_lock
        from .instrument.tracer import active_tracer

        tracer = active_tracer(self)
        if tracer is not None:
            tracer.begin(
                inputs,
                gathered,
                prompt_length=inputs["input_ids"].shape[1],
                use_audio_in_video=use_audio_in_video,
                speaks=False,
            )
        with model_lock(self.model), torch.inference_mode():
            output = self.thinker(**inputs, use_audio_in_video=use_audio_in_video)
        return output.logits

    # -- generation ------------------------------------------------------------------------------
    def options(self, options: GenerationOptions | None = None, **changes) -> GenerationOptions:
        """`options` (or the defaults) with `changes`, checked against this model: return_audio
        resolved (None speaks when the model has a talker), the talker and the speaker known."""
        options = options_from(options, changes)
        return_audio = self.has_talker if options.return_audio is None else options.return_audio
        if return_audio and not self.has_talker:
            raise ConversationError(
                f"model '{self.model_id}' has no talker (a Thinking or Captioner checkpoint, or loaded "
                "with talker=False), so it cannot speak; pass return_audio=False"
            )
        if return_audio:
            self.speaker_id(options.speaker)
        return options.replace(return_audio=return_audio)

    @with_option_keywords
    def generate(
        self, conversation, options: GenerationOptions | None = None, *, trace=False, **changes
    ) -> Reply:
        """Generate one assistant turn for `conversation` (text, and speech unless return_audio=False).

        `options` (a GenerationOptions) and/or its fields as keywords; greedy by default, text and
        speech alike (reproducible). `trace`: False (default) records nothing, True the default
        capture, a capture spec those captures (see Tracer); the Trace is then `reply.trace`.
        """
        options = self.options(options, **changes)
        if not trace:
            return self._generate(conversation, options)
        with self.trace(capture=None if trace is True else trace) as tracer:
            reply = self._generate(conversation, options)
        return replace(reply, trace=tracer.trace)

    def _generate(self, conversation, options: GenerationOptions) -> Reply:
        from .instrument.context import model_lock
        from .instrument.record import CodesRecorder, Recording
        from .instrument.tracer import active_tracer

        inputs, gathered = self._prepare(conversation, options.use_audio_in_video)
        kwargs = self.generation_kwargs(inputs, options)
        prompt_length = inputs["input_ids"].shape[1]
        codes = CodesRecorder(hooks=options.return_audio)
        with (
            model_lock(self.model),  # one run of the model at a time (streams and the app hold it too)
            self._seeded(options.seed),
            Recording(self.model, [codes]),
            last_logits_only(self.thinker),
            torch.inference_mode(),
        ):
            tracer = active_tracer(self)
            if tracer is not None:
                tracer.begin(
                    inputs,
                    gathered,
                    prompt_length=prompt_length,
                    use_audio_in_video=options.use_audio_in_video,
                    max_new_tokens=options.max_new_tokens,
                    speech_frames=kwargs.get("talker_max_new_tokens", 1) - 1 if options.return_audio else 0,
                    speaks=bool(options.return_audio),
                )
            if options.return_audio:
                quiet_talker_penalty_notice()
                # An empty reply (the first token ends it) leaves the talker nothing to speak, and
                # upstream generate fails building its prompt: stop there and give empty speech.
                stop = StopAtEmptyReply(prompt_length, self.model.config.im_end_token_id)
                kwargs["thinker_stopping_criteria"] = StoppingCriteriaList([stop])
                # A talker that ends its speech at once: upstream fails stacking no frames; the reply
                # is the thinker's, with empty speech (as lab.stream gives it).
                end_code = self.model.config.talker_config.codec_eos_token_id
                kwargs["talker_stopping_criteria"] = StoppingCriteriaList([StopAtNoSpeech(end_code)])
            try:
                result = (
                    self.model.generate(**kwargs)
                    if hasattr(self.model, "thinker")
                    else self.model.generate(**thinker_only_kwargs(kwargs))
                )
            except EmptyReply as empty:
                result = (empty.sequences, torch.zeros(0))
            except NoSpeech:
                result = (stop.sequences, torch.zeros(0))
        if options.return_audio:
            sequences, waveform = result
            audio = waveform.reshape(-1).float().cpu().numpy().astype(np.float32)
            frames = codes.codes(self.num_codebooks)
        else:
            sequences = result.sequences if hasattr(result, "sequences") else result
            audio, frames = None, None
        token_ids = sequences[0, prompt_length:].tolist()
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        reply = Reply(text, token_ids, audio, SAMPLE_RATE, frames, self.model_id, self.random_weights)
        if tracer is not None:
            tracer.end(reply)
        return reply

    def generation_kwargs(self, inputs, options: GenerationOptions | None = None, **changes) -> dict:
        """The keyword arguments of `model.generate` for these inputs and options (return_audio
        None counts as True here: pass options checked by `lab.options` for the model's default)."""
        options = options_from(options, changes)
        return_audio = options.return_audio is not False
        kwargs = dict(inputs)
        kwargs.update(
            thinker_max_new_tokens=options.max_new_tokens,
            thinker_do_sample=options.do_sample,
            use_audio_in_video=options.use_audio_in_video,
            return_audio=return_audio,
        )
        if options.do_sample:
            kwargs.update(
                thinker_temperature=options.temperature,
                thinker_top_p=options.top_p,
                thinker_top_k=options.top_k,
            )
        if return_audio:
            frames = options.max_speech_frames or (PRESET_SPEECH_FRAMES if self.random_weights else 4096)
            speech_do_sample = options.speech_do_sample
            talker_do_sample = options.do_sample if speech_do_sample is None else speech_do_sample
            if not talker_do_sample:
                # Upstream passes its sampling temperature (0.9) to a greedy talker too, and
                # transformers then warns that the flag is ignored; greedy ignores it either way.
                kwargs["talker_temperature"] = 1.0
            kwargs.update(
                speaker=options.speaker,
                # The talker's last codebook-0 token is never fed back, so the code predictor never
                # completes its frame: N + 1 talker tokens give N frames.
                talker_max_new_tokens=int(frames) + 1,
                talker_do_sample=talker_do_sample,
            )
        return kwargs

    @property
    def num_codebooks(self) -> int:
        return int(self.model.config.talker_config.num_code_groups) if self.has_talker else 0

    def speaker_id(self, speaker: str) -> int:
        """The talker's id of `speaker` (Ethan, Chelsie, Aiden), or a clear error."""
        speakers = self.model.config.talker_config.speaker_id if self.has_talker else {}
        if not isinstance(speaker, str) or speaker.lower() not in speakers:
            raise ConversationError(
                f"unknown speaker {speaker!r}; this model speaks as {', '.join(self.speakers) or 'nobody'}"
            )
        return int(speakers[speaker.lower()])

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        if seed is None:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield

    # -- instruments (defined in omnilab.instrument) ------------------------------------------------
    def trace(self, capture=None, **options):
        """A Tracer: a context that records what the model does inside every forward it runs; its
        `.trace` (a Trace) after exit. `generate(trace=...)` and `stream(trace=...)` take the same
        capture (see Tracer)."""
        from .instrument.tracer import Tracer

        return Tracer(self, capture=capture, **options)

    def intervene(self, **spec):
        """A context that changes the model while it is open, in forward, generate and stream alike.

        ablate= / force= / replay= (routing), positions= (a TM-RoPE transform), set= / add= ({site:
        tensor}: patch or steer a site's output; at= prompt positions, modality= a modality's tokens);
        see omnilab.instrument.interventions and omnilab.instrument.patch. Contexts nest.
        edit= ({site: fn(values, rows)}: a function of the site's values) and heads (attn.L.z) and
        experts (expert.L.E) as sites: omnilab.instrument.edits and omnilab.instrument.units.
        """
        from .instrument.interventions import Intervention

        return Intervention(self, **spec)

    def gradients(self, conversation, metric, *, sites="resid.*", answer=None, use_audio_in_video=False):
        """A metric's gradient at thinker sites from one forward (graph kept) and one backward: a
        Gradients (metric, activations, grads; see omnilab.instrument.grad)."""
        from .instrument.grad import gradients

        return gradients(
            self, conversation, metric, sites=sites, answer=answer, use_audio_in_video=use_audio_in_video
        )

    def sites(self):
        """The registry of named hook sites of this model (a DataFrame)."""
        from .instrument.sites import find_sites, sites_frame

        return sites_frame(find_sites(self.model))

    @with_option_keywords
    def stream(
        self,
        conversation,
        options: GenerationOptions | None = None,
        *,
        trace=False,
        chunk_frames: int | str = "grow",
        left_context: int | None = None,
        **changes,
    ):
        """Stream a reply: text deltas, audio chunks and trace events as they are made (see
        omnilab.streaming.stream); the options and `trace` are those of `generate`."""
        from .streaming import stream

        return stream(
            self,
            conversation,
            options,
            trace=trace,
            chunk_frames=chunk_frames,
            left_context=left_context,
            **changes,
        )


def load(
    name: str = "tiny",
    *,
    seed: int = 0,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    talker: bool = True,
) -> OmniLab:
    """Load a preset ("tiny", "small": random weights, offline) or a checkpoint (hub id or local path).

    `dtype`, `device_map`, `attn_implementation` and `experts_implementation` go to `from_pretrained`
    (the experts implementation defaults to the fastest the device supports); `talker=False` skips
    the talker and code2wav to save memory.
    """
    loaded = load_model(
        name,
        seed=seed,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation,
        experts_implementation=experts_implementation,
        talker=talker,
    )
    return OmniLab(loaded)
