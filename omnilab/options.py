"""GenerationOptions: the settings of one generated turn, declared once.

`OmniLab.generate`, `OmniLab.stream`, `collect` and the app all take these; `generate` and `stream`
also accept each field as a keyword (their signatures list them, built from this class).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import MISSING, dataclass, fields, replace

from .errors import ConversationError


@dataclass(frozen=True)
class GenerationOptions:
    """How one assistant turn is generated. Greedy by default, text and speech alike (reproducible).

    speaker: the talker's voice (Ethan, Chelsie, Aiden).
    return_audio: speak the reply; None speaks when the model has a talker.
    max_new_tokens: most reply tokens of the thinker.
    do_sample, temperature, top_p, top_k: the thinker's sampling (temperature/top_p/top_k apply
        only when do_sample).
    max_speech_frames: most talker frames (80 ms each); None: the model's own cap (random-weight
        talkers never stop, so presets are capped at 48 frames, 3.84 s).
    speech_do_sample: the talker's sampling; None follows do_sample.
    use_audio_in_video: feed a video's audio track with its frames, interleaved in time (TM-RoPE).
    seed: seeds torch for this turn only (sampling is then reproducible); None leaves it as it is.
    """

    speaker: str = "Ethan"
    return_audio: bool | None = None
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    max_speech_frames: int | None = None
    speech_do_sample: bool | None = None
    use_audio_in_video: bool = False
    seed: int | None = None

    def __post_init__(self):
        def whole(value, name, low=1, allow_none=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConversationError(f"{name} must be a whole number ≥ {low}; got {value!r}")

        whole(self.max_new_tokens, "max_new_tokens")
        whole(self.max_speech_frames, "max_speech_frames", allow_none=True)
        whole(self.top_k, "top_k")
        whole(self.seed, "seed", low=0, allow_none=True)
        for name in ("do_sample", "use_audio_in_video"):
            if not isinstance(getattr(self, name), bool):
                raise ConversationError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("return_audio", "speech_do_sample"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ConversationError(f"{name} must be True, False or None; got {getattr(self, name)!r}")
        if not isinstance(self.speaker, str):
            raise ConversationError(f"speaker must be a voice's name; got {self.speaker!r}")
        for name, low, high in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value > low and (high is None or value <= high))
            ):
                bound = f"in ({low:g}, {high:g}]" if high is not None else f"> {low:g}"
                raise ConversationError(f"{name} must be a number {bound}; got {value!r}")

    def replace(self, **changes) -> GenerationOptions:
        """A copy with `changes`; an unknown name gets a clear error listing the known ones."""
        unknown = sorted(set(changes) - set(NAMES))
        if unknown:
            raise ConversationError(
                f"unknown generation option(s) {', '.join(unknown)}; the options are {', '.join(NAMES)}"
            )
        return replace(self, **changes) if changes else self


NAMES = tuple(f.name for f in fields(GenerationOptions))


def options_from(options: GenerationOptions | None, changes: dict) -> GenerationOptions:
    """`options` (or the defaults) with keyword `changes` applied."""
    if options is not None and not isinstance(options, GenerationOptions):
        raise ConversationError(f"options must be a GenerationOptions; got {type(options).__name__}")
    return (options or GenerationOptions()).replace(**changes)


def with_option_keywords(function):
    """Show GenerationOptions' fields as keyword parameters in `function`'s signature.

    `function` takes `options: GenerationOptions | None` and `**changes`; help(), Jupyter and IDEs
    then list every option with its default, although the options are declared only once.
    """
    signature = inspect.signature(function)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f in fields(GenerationOptions):
        default = f.default if f.default is not MISSING else inspect.Parameter.empty
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type)
        )

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params)
    return wrapper
