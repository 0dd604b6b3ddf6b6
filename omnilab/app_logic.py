"""The demo app's work as plain functions: check a turn's inputs, run the turn, feed the panels.

`apps/demo.py` is layout and wiring; everything it calls lives here and runs without Gradio or a
browser. Inputs arrive as a browser or a script sends them (text, file paths, numbers, maybe
garbage), so nothing is trusted: every value is checked, and every refusal is an `OmnilabError`
whose message names the input, the reason and the way out. `error_text` turns any exception into
text that is safe to show (HTML-escaped, bounded, never a stack trace).

State: one `Session` per browser session (the app keeps it in `gr.State`, so sessions never see
each other's conversation or traces); one lock per `OmniLab`, so model jobs run one at a time
(the tracer and interventions install hooks on the shared model).
"""

from __future__ import annotations

import contextlib
import html
import logging
import math
import os
import shutil
import tempfile
import threading
import uuid
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from . import analysis, media, plots
from .errors import ConversationError, InterventionError, MediaError, OmnilabError
from .lab import DEFAULT_SYSTEM, RANDOM_WEIGHTS_NOTE, OmniLab, Reply

log = logging.getLogger(__name__)

VOICES = ("Ethan", "Chelsie", "Aiden")
COMPONENTS = ("thinker", "talker")
MAX_MESSAGE_CHARS = 10_000
MAX_SYSTEM_CHARS = 4_000
MAX_NEW_TOKENS = 1_024
MAX_SPEECH_FRAMES = 4_096  # 5.5 min of speech at 12.5 frames/s
MAX_TURNS = 16
MAX_UPLOAD_BYTES = 200 * 1024**2
MAX_ERROR_CHARS = 600
CAPTURE = ("routing", "positions", "codes", "timings")


# --- errors, as a person should see them -----------------------------------------------------------


def error_text(exc: BaseException) -> str:
    """What to show for `exc`: its message for omnilab's own errors, a short note otherwise.

    HTML-escaped and at most MAX_ERROR_CHARS long, so an input echoed in a message (a file name,
    a speaker) can never become markup. Unexpected errors name their type only (the server log
    has the traceback).
    """
    if isinstance(exc, OmnilabError):
        text = str(exc)
    else:
        text = (
            f"the app hit an unexpected {type(exc).__name__} and skipped this request; "
            "it keeps serving; the server log has the details"
        )
    text = " ".join(text.split())
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 1] + "…"
    return html.escape(text, quote=True)


def _show(value, limit: int = 40) -> str:
    """A short repr of a hostile value, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- options of a turn ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The settings of one turn, checked."""

    speaker: str = "Ethan"
    speak: bool = True
    max_new_tokens: int = 32
    max_speech_frames: int = 24
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    seed: int | None = None
    use_audio_in_video: bool = False
    attention: bool = True  # record attention maps of the thinker's first and last layers

    def generate_kwargs(self) -> dict:
        """Keyword arguments of `OmniLab.generate` (without trace)."""
        return dict(
            speaker=self.speaker,
            return_audio=self.speak,
            max_new_tokens=self.max_new_tokens,
            max_speech_frames=self.max_speech_frames,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            use_audio_in_video=self.use_audio_in_video,
        )


def _bool(value, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConversationError(f"{name} is {_show(value)}; pass true or false")


def _number(value, name: str, low: float, high: float, *, whole: bool) -> float | int:
    kind = "a whole number" if whole else "a number"
    given = value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass  # refused just below, as itself
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConversationError(f"{name} is {_show(value)}; pass {kind} from {low:g} to {high:g}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high or (whole and value != int(value)):
        raise ConversationError(f"{name} is {_show(given)}; pass {kind} from {low:g} to {high:g}")
    return int(value) if whole else value


def options(
    *,
    speaker="Ethan",
    speak=True,
    max_new_tokens=32,
    max_speech_frames=24,
    do_sample=False,
    temperature=0.7,
    top_p=0.8,
    top_k=20,
    seed=None,
    use_audio_in_video=False,
    attention=True,
    lab: OmniLab | None = None,
) -> Options:
    """Check a turn's settings as a browser or a script sends them; a bad one gets a clear error.

    With `lab`, speech is checked against what the model can do (a talker, the speaker's voice).
    """
    if not isinstance(speaker, str) or speaker.strip().lower() not in {v.lower() for v in VOICES}:
        raise ConversationError(f"unknown speaker {_show(speaker)}; choose one of {', '.join(VOICES)}")
    speaker = speaker.strip().capitalize()
    speak = _bool(speak, "speak")
    if speak and lab is not None:
        if not lab.has_talker:
            raise ConversationError(
                f"model '{lab.model_id}' has no talker, so it cannot speak; turn off 'speak the reply'"
            )
        lab.speaker_id(speaker)
    seed_value = None
    if seed is not None and not (isinstance(seed, str) and not seed.strip()):
        if isinstance(seed, float) and math.isnan(seed):
            seed_value = None
        else:
            seed_value = int(_number(seed, "seed", 0, 2**31 - 1, whole=True))
    return Options(
        speaker=speaker,
        speak=speak,
        max_new_tokens=int(_number(max_new_tokens, "max_new_tokens", 1, MAX_NEW_TOKENS, whole=True)),
        max_speech_frames=int(
            _number(max_speech_frames, "max_speech_frames", 1, MAX_SPEECH_FRAMES, whole=True)
        ),
        do_sample=_bool(do_sample, "do_sample"),
        temperature=float(_number(temperature, "temperature", 0.01, 2.0, whole=False)),
        top_p=float(_number(top_p, "top_p", 0.01, 1.0, whole=False)),
        top_k=int(_number(top_k, "top_k", 1, 1000, whole=True)),
        seed=seed_value,
        use_audio_in_video=_bool(use_audio_in_video, "use the video's audio"),
        attention=_bool(attention, "record attention"),
    )


# --- the user's message -------------------------------------------------------------------------------


def upload_path(payload) -> str | None:
    """The server-side path of an upload as Gradio hands it over unprocessed, or None.

    Accepts None, a path, a FileData dict ({"path": ...}) or a video payload ({"video": {...}}).
    """
    if payload is None or payload == "":
        return None
    if isinstance(payload, (str, os.PathLike)):
        return os.fspath(payload)
    if isinstance(payload, dict):
        if "video" in payload and "path" not in payload:
            return upload_path(payload["video"])
        path = payload.get("path")
        if isinstance(path, str) and path:
            return path
        if payload.get("url") or payload.get("path") is None:
            raise MediaError(
                "the upload has no file on the server (a URL is not accepted); upload the file itself"
            )
    raise MediaError(f"an upload must be a file; got {type(payload).__name__}")


# Which content each slot accepts: the audio slot also takes a video's sound track.
_SLOT_KINDS = {"audio": ("audio", "video"), "image": ("image",), "video": ("video",)}


def _check_upload(path: str, slot: str, max_bytes: int) -> str:
    name = f"the {slot} '{Path(path).name}'"
    resolved = media.check_file(path, max_bytes=max_bytes, name=name)
    kind = media.sniff(resolved, name=name)
    if kind not in _SLOT_KINDS[slot]:
        article = {"audio": "audio", "image": "an image", "video": "a video"}
        raise MediaError(f"{name} is {article[kind]}, not {article[slot]}; put it in the {kind} box instead")
    return str(resolved)


def user_message(text=None, *, audio=None, image=None, video=None, max_bytes: int = MAX_UPLOAD_BYTES) -> dict:
    """One user message in the Qwen chat format: the media first, then the text.

    Each upload is checked by content (its real media type, not its name) and size before any
    decoding; the full checks (duration, pixels, frames) run when the model job decodes it.
    """
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise ConversationError(f"the message must be text; got {type(text).__name__}")
    if len(text) > MAX_MESSAGE_CHARS:
        raise ConversationError(
            f"the message is {len(text):,} characters long; the limit is {MAX_MESSAGE_CHARS:,}; shorten it"
        )
    content = []
    for slot, payload in (("audio", audio), ("image", image), ("video", video)):
        path = upload_path(payload)
        if path is not None:
            content.append({"type": slot, slot: _check_upload(path, slot, max_bytes)})
    if text.strip():
        content.append({"type": "text", "text": text})
    if not content:
        raise ConversationError("the message is empty: write something or attach audio, an image or a video")
    return {"role": "user", "content": content}


def _system_message(system) -> dict | None:
    if system is None or (isinstance(system, str) and not system.strip()):
        return None
    if not isinstance(system, str):
        raise ConversationError(f"the system prompt must be text; got {type(system).__name__}")
    if len(system) > MAX_SYSTEM_CHARS:
        raise ConversationError(
            f"the system prompt is {len(system):,} characters long; the limit is {MAX_SYSTEM_CHARS:,}"
        )
    return {"role": "system", "content": [{"type": "text", "text": system}]}


# --- one browser session --------------------------------------------------------------------------------


@dataclass
class Turn:
    """One finished turn: the conversation it answered, its settings, its reply (with trace)."""

    conversation: list[dict]
    options: Options
    reply: Reply
    ablate: dict | None = None
    timings: object | None = None  # omnilab.streaming.Timings of a streamed turn


@dataclass
class Session:
    """What one browser session has: its conversation so far and the turns the panels show."""

    messages: list[dict] = field(default_factory=list)  # user and assistant messages, Qwen format
    chat: list[dict] = field(default_factory=list)  # what the chat box shows
    last: Turn | None = None
    ablated: Turn | None = None
    attribution: analysis.Attribution | None = None  # of the last reply, once asked for
    folder: str | None = None  # this session's downloads

    def conversation(self, system, message: dict) -> list[dict]:
        if len(self.messages) // 2 >= MAX_TURNS:
            raise ConversationError(
                f"this conversation has {MAX_TURNS} turns, the most the demo keeps; press Clear to start anew"
            )
        head = [m for m in [_system_message(system)] if m is not None]
        return head + self.messages + [message]

    def record(self, message: dict, turn: Turn) -> None:
        self.messages += [
            message,
            {"role": "assistant", "content": [{"type": "text", "text": turn.reply.text}]},
        ]
        self.chat += [
            {"role": "user", "content": chat_text(message)},
            {"role": "assistant", "content": turn.reply.text or "(no text)"},
        ]
        self.last, self.ablated, self.attribution = turn, None, None

    def output_folder(self) -> Path:
        """A folder of this session's own, for the files it downloads (created on first use)."""
        if self.folder is None or not Path(self.folder).is_dir():
            root = Path(tempfile.gettempdir()) / "omnilab-app"
            root.mkdir(parents=True, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix=f"session-{uuid.uuid4().hex[:8]}-", dir=root)
        return Path(self.folder)

    def close(self) -> None:
        """Remove this session's files."""
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def close_session(session) -> None:
    """Gradio's delete callback for a session's state."""
    if isinstance(session, Session):
        session.close()


def chat_text(message: dict) -> str:
    """How the chat box shows a user message: its text, and its uploads by name."""
    parts = []
    for item in message["content"]:
        if item["type"] == "text":
            parts.append(item["text"])
        else:
            name = Path(item[item["type"]]).name.replace("`", "'")
            parts.append(f"[{item['type']}: `{name}`]")
    return "\n".join(parts)


# --- running turns ------------------------------------------------------------------------------------------

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(lab: OmniLab) -> threading.Lock:
    """The lock that keeps jobs on `lab` one at a time (hooks are installed on the shared model)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(lab)
        if lock is None:
            lock = _LOCKS[lab] = threading.Lock()
        return lock


def _capture(lab: OmniLab, opts: Options, capture: tuple[str, ...] = CAPTURE):
    """The tracer of one model job: `capture`, plus attention of the thinker's first and last layers."""
    if opts.attention:
        return lab.trace(
            capture=(*capture, "attention"), attention_layers={"thinker": _attention_layers(lab)}
        )
    return lab.trace(capture=capture) if capture else contextlib.nullcontext()


@contextlib.contextmanager
def _upload_errors(conversation: list[dict]) -> Iterator[None]:
    """Media errors raised while the model job decodes: named as the person knows the upload."""
    try:
        yield
    except MediaError as exc:
        raise MediaError(_upload_names(str(exc), conversation)) from None


def _generate(lab: OmniLab, conversation: list[dict], opts: Options) -> Reply:
    """One traced generation (call with the model lock held)."""
    with _upload_errors(conversation), _capture(lab, opts) as tracer:
        reply = lab.generate(conversation, **opts.generate_kwargs())
    return replace(reply, trace=tracer.trace)


def _upload_names(text: str, conversation: list[dict]) -> str:
    """`text` with each upload's server path replaced by how the person knows it ("the image 'cat.png'")."""
    for message in conversation:
        for item in message["content"]:
            kind = item["type"]
            if kind != "text" and isinstance(item[kind], str):
                text = text.replace(item[kind], f"the {kind} '{Path(item[kind]).name}'")
    return text


def _attention_layers(lab: OmniLab) -> list[int]:
    """The thinker's first and last decoder layers, from the site registry."""
    sites = lab.sites()
    layers = sites.loc[(sites["kind"] == "attention") & (sites["component"] == "thinker"), "layer"]
    return sorted({int(layers.min()), int(layers.max())})


def run_turn(lab: OmniLab, session: Session, message: dict, opts: Options, system=DEFAULT_SYSTEM) -> Turn:
    """Answer `message` after the session's conversation (not streamed); the session records the turn."""
    conversation = session.conversation(system, message)
    with model_lock(lab):
        reply = _generate(lab, conversation, opts)
    turn = Turn(conversation, opts, reply)
    session.record(message, turn)
    return turn


@dataclass(frozen=True)
class Update:
    """One step of a streamed turn: the reply text so far, new speech samples, the turn when done."""

    text: str
    audio: np.ndarray | None = None  # float32 at 24 kHz: the samples new since the last update
    turn: Turn | None = None


def stream_turn(
    lab: OmniLab, session: Session, message: dict, opts: Options, system=DEFAULT_SYSTEM
) -> Iterator[Update]:
    """Answer `message` through `OmniLab.stream`, yielding text and speech as they are made.

    The last update carries the Turn; its trace is the stream's own (routing, positions, codes, the
    latency breakdown), with attention added when asked for. The model lock is held until the
    stream ends or is closed (a browser that goes away closes it).
    """
    conversation = session.conversation(system, message)
    text, done = "", None
    events = lab.stream(conversation, **opts.generate_kwargs(), trace=True)
    with (
        model_lock(lab),
        _upload_errors(conversation),
        _capture(lab, opts, capture=()) as tracer,
        contextlib.closing(events),
    ):
        for event in events:
            if event.kind == "text":
                text += event.text
                yield Update(text)
            elif event.kind == "audio" and event.audio is not None and len(event.audio):
                yield Update(text, audio=event.audio)
            elif event.kind == "done":
                done = event
    if done is None or done.reply is None:
        raise ConversationError("the stream ended without a reply; send the message again")
    trace = done.trace if done.trace is not None else done.reply.trace
    if tracer is not None and trace is not None:
        capture = [*trace.meta.get("capture", []), "attention"]
        attention = tracer.trace.tables["attention"]
        trace = replace(
            trace, tables={**trace.tables, "attention": attention}, meta={**trace.meta, "capture": capture}
        )
    turn = Turn(conversation, opts, replace(done.reply, trace=trace), timings=done.timings)
    session.record(message, turn)
    yield Update(turn.reply.text, turn=turn)


def write_wav(reply: Reply, folder: Path, stem: str = "reply") -> Path | None:
    """The reply's speech as a 16-bit WAV in `folder`, or None when it has none."""
    import soundfile

    if reply.audio is None or len(reply.audio) == 0:
        return None
    path = folder / f"{stem}-{uuid.uuid4().hex[:8]}.wav"
    soundfile.write(path, np.clip(reply.audio, -1.0, 1.0), reply.sample_rate, subtype="PCM_16")
    return path


def pcm16(audio: np.ndarray, *, amplify: bool = False) -> np.ndarray:
    """Float speech in [-1, 1] as 16-bit samples (what a browser plays without conversion).

    amplify: scale the audio to a 0.5 peak first. Random-weight talkers speak at about 1e-6, which
    16 bits round to silence; the app amplifies the players of the presets (saved WAVs stay raw).
    """
    audio = np.asarray(audio, dtype=np.float32)
    if amplify and audio.size:
        peak = float(np.abs(audio).max())
        if peak > 0:
            audio = audio * (0.5 / peak)
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def clear(session: Session) -> Session:
    """A fresh conversation; this session's files go."""
    session.close()
    return Session()


def banner(lab: OmniLab) -> str:
    """Markdown naming the model; for random-weight presets, what that means and how to load real weights."""
    name = html.escape(lab.model_id)
    talker = "thinker + talker (speaks)" if lab.has_talker else "thinker only (text)"
    text = f"### omnilab · Qwen3-Omni workbench\n**Model:** `{name}` — {talker}"
    if lab.random_weights:
        text += (
            f"\n\n⚠️ This is a {html.escape(RANDOM_WEIGHTS_NOTE)}. Its speech is near-silent "
            "(peak about 1e-6); the players here amplify it so you can hear it (downloads stay raw)."
        )
    return text


# --- interventions -----------------------------------------------------------------------------------------


def parse_ablation(spec, component: str, layers: int) -> dict:
    """'2: 3, 7; 0: 1' -> {component: {2: [3, 7], 0: [1]}}; '*: 5' ablates expert 5 in every layer.

    Ranges are checked by the intervention itself; this checks the shape of the text.
    """
    if component not in COMPONENTS:
        raise InterventionError(f"unknown component {_show(component)}; choose thinker or talker")
    if not isinstance(spec, str) or not spec.strip():
        raise InterventionError(
            "say which experts to ablate as 'layer: expert, expert; ...' (e.g. '0: 3, 7' or '*: 5' for every layer)"
        )
    if len(spec) > 2_000:
        raise InterventionError(
            "the ablation is longer than 2,000 characters; ablate fewer experts at a time"
        )
    out: dict[int, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        layer_text, sep, experts_text = part.partition(":")
        if not sep:
            raise InterventionError(f"{_show(part)} is not 'layer: experts'; write e.g. '0: 3, 7'")
        try:
            targets = range(layers) if layer_text.strip() == "*" else [int(layer_text)]
            experts = [int(e) for e in experts_text.replace(" ", ",").split(",") if e.strip()]
        except ValueError:
            raise InterventionError(
                f"{_show(part)}: layers and experts are whole numbers (or '*' for every layer)"
            ) from None
        if not experts:
            raise InterventionError(f"{_show(part)} names no experts; write e.g. '0: 3, 7'")
        for layer in targets:
            out.setdefault(layer, [])
            out[layer] += [e for e in experts if e not in out[layer]]
    if not out:
        raise InterventionError("the ablation names no layers; write e.g. '0: 3, 7'")
    return {component: out}


def ablate_turn(lab: OmniLab, session: Session, component: str, spec) -> tuple[Turn, Turn]:
    """Rerun the session's last turn with experts ablated; returns (original, ablated)."""
    if session.last is None:
        raise ConversationError("there is no turn to rerun yet; send a message first")
    last = session.last
    layers = _layers(last.reply.trace, component)
    ablate = parse_ablation(spec, component, layers)
    with model_lock(lab), lab.intervene(ablate=ablate):
        reply = _generate(lab, last.conversation, last.options)
    session.ablated = Turn(last.conversation, last.options, reply, ablate=ablate)
    return last, session.ablated


def _layers(trace, component: str) -> int:
    """How many router layers `component` has: from the trace's meta, else from its routing rows."""
    info = (getattr(trace, "meta", None) or {}).get("components", {}).get(component)
    if info:
        return int(info["layers"])
    layers = trace.routing.loc[trace.routing["component"] == component, "layer"] if trace is not None else []
    return int(layers.max()) + 1 if len(layers) else 0


def _experts(trace, component: str) -> int | None:
    """How many experts each `component` layer has, when the trace's meta says (None: unknown)."""
    info = (trace.meta or {}).get("components", {}).get(component)
    return int(info["num_experts"]) if info else None


# --- panels: what the last turn's trace shows -----------------------------------------------------------------


def _trace(session: Session):
    return session.last.reply.trace if session.last is not None else None


def _note(text: str, title: str = "") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=html.escape(text), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, height=320)
    return fig


NO_TURN = "send a message: this panel shows the last turn"


def layer_choices(session: Session, component: str) -> int:
    """How many layers `component` has in the last turn's trace (0 before any turn)."""
    trace = _trace(session)
    return _layers(trace, component) if trace is not None else 0


def _component(component) -> str:
    if component not in COMPONENTS:
        raise ConversationError(f"unknown component {_show(component)}; choose thinker or talker")
    return component


def routing_figures(session: Session, component="thinker", layer=0) -> tuple[go.Figure, go.Figure, go.Figure]:
    """(routing heatmap, expert load, modality specialization) of `component` at `layer`."""
    component = _component(component)
    layer = int(_number(layer, "layer", 0, 10_000, whole=True))
    titles = ("routing", "expert load", "modality specialization")
    trace = _trace(session)
    if trace is None:
        return tuple(_note(NO_TURN, t) for t in titles)
    if not (trace.routing["component"] == component).any():
        return tuple(_note(f"no {component} routing in this turn", t) for t in titles)
    layers = _layers(trace, component)
    if layer >= layers:
        raise ConversationError(f"layer {layer} is out of range: the {component} has layers 0..{layers - 1}")
    where = dict(component=component, layer=layer)
    paths = analysis.token_paths(trace, **where, ranks=None)
    return (
        plots.routing_heatmap(paths, layer=layer, num_experts=_experts(trace, component)),
        plots.expert_load_bars(analysis.expert_load(trace, **where), **where),
        plots.specialization_heatmap(analysis.modality_specialization(trace, **where), **where),
    )


def position_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(TM-RoPE positions in 3-D, the tokens on TM-RoPE's time axis with audio/video alignment)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "positions"), _note(NO_TURN, "timeline")
    layout = analysis.position_layout(trace, component="thinker")
    alignment = analysis.av_alignment(trace, component="thinker")
    return plots.positions_3d(layout), plots.seconds_timeline(layout, alignment=alignment)


def speech_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(codebook grid: the code of each frame and codebook; the reply's waveform over its spectrogram)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "codebooks"), _note(NO_TURN, "spectrogram")
    grid = analysis.codebook_grid(trace)
    mel = analysis.mel_spectrogram(trace)
    return (
        plots.codebook_heatmap(grid) if len(grid) else _note("no speech in this turn", "codebooks"),
        plots.spectrogram(mel, analysis.waveform_envelope(trace))
        if len(mel)
        else _note("no speech in this turn", "spectrogram"),
    )


def residual_speech(lab: OmniLab, session: Session, keep=4) -> np.ndarray:
    """The last reply's speech re-synthesized from codebooks 0..keep-1 only (float32 at 24 kHz).

    Codebook 0 carries the coarse content and each later codebook a finer residual; listening to
    the first few shows what each adds. code2wav runs on the model, so this is a model job.
    """
    if session.last is None:
        raise ConversationError("there is no speech to re-synthesize yet; send a message first")
    reply = session.last.reply
    if reply.codes is None or len(reply.codes) == 0:
        raise ConversationError(
            "the last reply has no speech; tick 'speak the reply' and send a message, then listen"
        )
    codebooks = int(np.asarray(reply.codes).shape[1])
    keep = int(_number(keep, "codebooks to keep", 1, codebooks, whole=True))
    with model_lock(lab):
        return analysis.residual_audio(lab, reply, keep=keep)


def token_choices(session: Session) -> list[tuple[str, int]]:
    """The last reply's generated thinker tokens as (label, pos) for a picker."""
    trace = _trace(session)
    if trace is None:
        return []
    tokens = trace.tokens
    out = tokens[(tokens["component"] == "thinker") & (tokens["phase"] == "decode")].drop_duplicates("pos")
    return [(f"{int(r.pos)}: {r.text!r}", int(r.pos)) for r in out.itertuples()]


def attention_figures(session: Session, pos=None) -> tuple[go.Figure, go.Figure]:
    """(the last recorded thinker layer's attention map, heads averaged; where the thinker looked while
    producing output token `pos`: the attention row of the query at pos - 1, the step that chose it)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "attention"), _note(NO_TURN, "attention of a token")
    if trace.attention.empty:
        note = "attention was not recorded for this turn (tick 'record attention')"
        return _note(note, "attention"), _note(note, "attention of a token")
    layers = sorted(int(x) for x in trace.attention["layer"].unique())
    rows = analysis.attention_map(trace, component="thinker", average_heads=True)
    heatmap = plots.attention_heatmap(rows, layer=layers[-1], head=-1)
    choices = [p for _, p in token_choices(session)]
    if pos is None or pos == "":
        if not choices:
            return heatmap, _note("the reply has no generated tokens", "attention of a token")
        pos = choices[0]
    pos = int(_number(pos, "token", 0, 10**7, whole=True))
    picked = rows[rows["query_pos"] == pos - 1]
    if picked.empty:
        return heatmap, _note(f"no attention recorded for the token at pos {pos}", "attention of a token")
    line = go.Figure()
    for layer, group in picked.groupby("layer"):
        line.add_trace(
            go.Scatter(
                x=group["key_pos"],
                y=group["weight"],
                mode="lines",
                name=f"layer {layer}",
                customdata=np.stack(
                    [group["key_modality"].astype(str), group["key_text"].astype(str)], axis=-1
                ),
                hovertemplate="key pos %{x} · %{customdata[0]}<br>%{customdata[1]}<br>weight %{y:.4f}",
            )
        )
    label = trace.tokens.loc[(trace.tokens["component"] == "thinker") & (trace.tokens["pos"] == pos), "text"]
    line.update_layout(
        title=f"attention while producing token {pos} ({(label.iloc[-1] if len(label) else '')!r}), heads averaged",
        xaxis_title="key pos",
        yaxis_title="weight",
        template="plotly_white",
    )
    return heatmap, line


def attention_figure(session: Session, pos=None) -> go.Figure:
    """Where the thinker looked while producing output token `pos` (see attention_figures)."""
    return attention_figures(session, pos)[1]


ATTRIBUTION_METHODS = {"integrated_gradients": "Integrated Gradients", "feature_ablation": "feature ablation"}
MAX_ATTRIBUTION_STEPS = 128


def output_tokens(lab: OmniLab, session: Session) -> list[tuple[str, int]]:
    """The last reply's generated thinker tokens as (label, index into the reply) for a picker."""
    if session.last is None:
        return []
    decode = lab.processor.tokenizer.decode
    return [(f"{i}: {decode([int(t)])!r}", i) for i, t in enumerate(session.last.reply.token_ids)]


def attribute_turn(
    lab: OmniLab, session: Session, target=None, method="integrated_gradients", steps=32
) -> analysis.Attribution:
    """Attribute output token `target` (an index into the last reply) to every input token.

    Runs `omnilab.analysis.attribute` on the last turn's conversation, explaining the reply it gave
    (not a new one); the session keeps the result for the panels and the figures download.
    """
    if session.last is None:
        raise ConversationError("there is no reply to explain yet; send a message first")
    if method not in ATTRIBUTION_METHODS:
        raise ConversationError(
            f"unknown attribution method {_show(method)}; choose {' or '.join(ATTRIBUTION_METHODS)}"
        )
    steps = int(_number(steps, "steps", 2, MAX_ATTRIBUTION_STEPS, whole=True))
    last = session.last
    count = len(last.reply.token_ids)
    if count == 0:
        raise ConversationError("the last reply has no generated tokens to explain; send a message")
    if target is None or (isinstance(target, str) and not target.strip()):
        target = 0
    target = _number(target, "output token", 0, count - 1, whole=True)
    with model_lock(lab), _upload_errors(last.conversation):
        result = analysis.attribute(
            lab,
            last.conversation,
            target=int(target),
            method=method,
            steps=steps,
            use_audio_in_video=last.options.use_audio_in_video,
            reply=last.reply,
        )
    session.attribution = result
    return result


def attribution_text(session: Session) -> str:
    """One line on the attribution shown: its method, target token and convergence ("" before one)."""
    result = session.attribution
    if result is None:
        return ""
    target = result.target
    method = ATTRIBUTION_METHODS.get(result.method, str(result.method))
    text = (
        f"{method} of output token {target['index']} {target['piece']!r} "
        f"(log-probability {float(target['logprob']):.3f}); attributions sum to {float(result.total):.4f}"
    )
    delta = result.delta
    if delta is None or not math.isfinite(float(delta)):
        return text + "; no convergence delta for this method"
    return text + (
        f"; convergence delta {float(delta):.4f} (the sum's gap to the change in log-probability "
        "from the baseline: raise the steps if it is large)"
    )


def attribution_figures(session: Session) -> tuple[go.Figure, go.Figure]:
    """(attribution over the input tokens, attribution summed by modality) of the last attribution."""
    titles = ("attribution over tokens", "attribution by modality")
    if session.last is None:
        return tuple(_note(NO_TURN, t) for t in titles)
    if session.attribution is None:
        note = "pick an output token and a method, then press Explain"
        return tuple(_note(note, t) for t in titles)
    result = session.attribution
    return (
        plots.attribution_tokens(result.tokens),
        plots.attribution_modality(analysis.attribution_by_modality(result)),
    )


def latency_figure(session: Session) -> go.Figure:
    """Seconds spent in each stage of the last turn (preprocessing, thinker, talker, code predictor, code2wav)."""
    trace = _trace(session)
    if trace is None:
        return _note(NO_TURN, "latency")
    timings = trace.timings
    if timings.empty:
        return _note("no timings recorded", "latency")
    fig = go.Figure(
        go.Bar(
            x=timings["seconds"],
            y=timings["stage"],
            orientation="h",
            text=timings["calls"],
            texttemplate="%{x:.3f} s · %{text} calls",
            textposition="auto",
        )
    )
    fig.update_layout(
        title="latency by stage",
        xaxis_title="seconds",
        yaxis={"autorange": "reversed"},
        template="plotly_white",
    )
    return fig


def latency_text(session: Session) -> str:
    """The streamed turn's latency breakdown next to Qwen3-Omni's published figures ("" otherwise)."""
    if session.last is None or session.last.timings is None:
        return ""
    from .streaming import format_timings

    return format_timings(session.last.timings)


def comparison_figures(session: Session, component="thinker") -> tuple[go.Figure, go.Figure, go.Figure]:
    """(original expert load, ablated expert load) at the first ablated layer, and their routing agreement."""
    component = _component(component)
    if session.last is None or session.ablated is None:
        note = "ablate experts and rerun to compare"
        return _note(note, "original"), _note(note, "ablated"), _note(note, "routing agreement")
    ablated_layers = sorted(session.ablated.ablate.get(component, {})) if session.ablated.ablate else []
    layer = ablated_layers[0] if ablated_layers else 0
    figures = []
    for name, turn in (("original", session.last), ("ablated", session.ablated)):
        trace = turn.reply.trace
        if not (trace.routing["component"] == component).any():
            figures.append(_note(f"no {component} routing", name))
            continue
        load = analysis.expert_load(trace, component=component, layer=layer)
        figures.append(
            plots.expert_load_bars(
                load,
                layer=layer,
                component=component,
                title=f"{name}: {component} expert load, layer {layer}",
            )
        )
    agreement = analysis.routing_agreement(
        session.last.reply.trace, session.ablated.reply.trace, component=component
    )
    figures.append(plots.agreement_lines(agreement, title=f"{component} routing: original vs ablated"))
    return tuple(figures)


def all_figures(session: Session, component="thinker", layer=0, pos=None) -> dict[str, go.Figure]:
    """Every panel's figures for the last turn, by name."""
    heatmap, load, specialization = routing_figures(session, component, layer)
    scatter, timeline = position_figures(session)
    grid, spectrogram = speech_figures(session)
    attention_map, attention_row = attention_figures(session, pos)
    original, ablated, agreement = comparison_figures(session, component)
    over_tokens, by_modality = attribution_figures(session)
    return {
        "routing": heatmap,
        "expert_load": load,
        "modality_specialization": specialization,
        "positions": scatter,
        "timeline": timeline,
        "codebooks": grid,
        "spectrogram": spectrogram,
        "attention_map": attention_map,
        "attention": attention_row,
        "attribution_tokens": over_tokens,
        "attribution_modality": by_modality,
        "latency": latency_figure(session),
        "ablation_original": original,
        "ablation_ablated": ablated,
        "ablation_agreement": agreement,
    }


# --- downloads ----------------------------------------------------------------------------------------------


def trace_zip(session: Session) -> Path:
    """The last turn's trace as a zip of its Parquet files (with meta.json and the speech)."""
    if session.last is None or session.last.reply.trace is None:
        raise ConversationError("there is no trace to download yet; send a message first")
    folder = session.output_folder()
    directory = Path(tempfile.mkdtemp(prefix="trace-", dir=folder))
    session.last.reply.trace.save(directory)
    path = folder / f"trace-{uuid.uuid4().hex[:8]}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(directory.iterdir()):
            archive.write(file, arcname=f"trace/{file.name}")
    shutil.rmtree(directory, ignore_errors=True)
    return path


def figures_html(session: Session, component="thinker", layer=0, pos=None) -> Path:
    """Every figure of the last turn in one self-contained HTML file (plotly.js embedded once)."""
    if session.last is None:
        raise ConversationError("there are no figures to download yet; send a message first")
    figures = all_figures(session, component, layer, pos)
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%")
        for i, fig in enumerate(figures.values())
    ]
    reply = html.escape(session.last.reply.text)
    model = html.escape(session.last.reply.model_id)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>omnilab turn figures</title></head><body>"
        f"<h2>omnilab · {model}</h2><p>Reply: {reply}</p>" + "".join(parts) + "</body></html>"
    )
    path = session.output_folder() / f"figures-{uuid.uuid4().hex[:8]}.html"
    path.write_text(page, encoding="utf-8")
    return path
