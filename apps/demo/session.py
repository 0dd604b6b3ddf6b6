"""A turn's inputs, checked, and one browser session's state (kept in `gr.State`: sessions never
see each other's conversation or traces).

Inputs arrive as a browser or a script sends them (text, file paths, numbers, maybe garbage): every
value is checked, and every refusal is an `OmnilabError` naming the input, the reason and the way
out. `error_text` turns any exception into text that is safe to show.
"""

from __future__ import annotations

import html
import math
import os
import shutil
import tempfile
import threading
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omnilab import analysis, media
from omnilab.errors import ConversationError, MediaError, OmnilabError
from omnilab.instrument.budget import MEMORY_BUDGET_BYTES
from omnilab.options import GenerationOptions
from omnilab.reply import Reply

from .serve import MAX_UPLOAD_MB

MAX_MESSAGE_CHARS = 10_000
MAX_SYSTEM_CHARS = 4_000
MAX_TURNS = 16
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024**2
MAX_ERROR_CHARS = 600
RANGES = {  # the numbers a turn's settings accept (the sliders show the same); the defaults: GenerationOptions'
    "max_new_tokens": (1, 1_024),
    "max_speech_frames": (1, 4_096),  # 5.5 min of speech at 12.5 frames/s
    "temperature": (0.01, 2.0),
    "top_p": (0.01, 1.0),
    "top_k": (1, 1_000),
}


# --- errors, as a person should see them -----------------------------------------------------------


def error_text(exc: BaseException, *, escape: bool = True) -> str:
    """What to show for `exc`: its message for omnilab's own errors, a short note otherwise.

    At most MAX_ERROR_CHARS long, on one line, and HTML-escaped unless `escape=False` (the app
    escapes for browsers only, so an input echoed in a message, a file name or a speaker, never
    becomes markup there, and scripts read plain text). Unexpected errors name their type only
    (the server log has the traceback).
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
    return html.escape(text, quote=True) if escape else text


def show(value, limit: int = 40) -> str:
    """A short repr of a hostile value, for messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the settings of a turn ------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The checked settings of one turn: how it is generated, and what the app records besides."""

    generation: GenerationOptions
    attention: bool = True  # record attention maps of the thinker's first and last layers


def _bool(value, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConversationError(f"{name} is {show(value)}; pass true or false")


def number(value, name: str, low: float, high: float, *, whole: bool) -> float | int:
    """`value` as a browser sends a number (maybe as text), checked to lie in [low, high]."""
    kind = "a whole number" if whole else "a number"
    given = value
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass  # refused just below, as itself
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConversationError(f"{name} is {show(value)}; pass {kind} from {low:g} to {high:g}")
    value = float(value)
    if not math.isfinite(value) or not low <= value <= high or (whole and value != int(value)):
        raise ConversationError(f"{name} is {show(given)}; pass {kind} from {low:g} to {high:g}")
    return int(value) if whole else value


_GIVEN = GenerationOptions()


def settings(
    lab,
    *,
    speaker=_GIVEN.speaker,
    speak=True,
    max_new_tokens=32,
    max_speech_frames=24,
    do_sample=_GIVEN.do_sample,
    temperature=_GIVEN.temperature,
    top_p=_GIVEN.top_p,
    top_k=_GIVEN.top_k,
    seed=_GIVEN.seed,
    use_audio_in_video=_GIVEN.use_audio_in_video,
    attention=True,
) -> Settings:
    """Check a turn's settings as a browser or a script sends them; a bad one gets a clear error.

    The speaker must be one of `lab.speakers` (when the model has a talker), and speech needs one.
    """
    speaker = speaker.strip().capitalize() if isinstance(speaker, str) else speaker
    if lab.has_talker:
        lab.speaker_id(speaker)  # an unknown voice gets the lab's own error, naming the known ones
    speak = _bool(speak, "speak")
    if speak and not lab.has_talker:
        raise ConversationError(
            f"model '{lab.model_id}' has no talker, so it cannot speak; turn off 'speak the reply'"
        )
    seed_value = None
    if seed is not None and not (isinstance(seed, str) and not seed.strip()):
        if not (isinstance(seed, float) and math.isnan(seed)):
            seed_value = number(seed, "seed", 0, 2**31 - 1, whole=True)
    generation = GenerationOptions(
        speaker=speaker,
        return_audio=speak,
        max_new_tokens=number(max_new_tokens, "max_new_tokens", *RANGES["max_new_tokens"], whole=True),
        max_speech_frames=number(
            max_speech_frames, "max_speech_frames", *RANGES["max_speech_frames"], whole=True
        ),
        do_sample=_bool(do_sample, "do_sample"),
        temperature=number(temperature, "temperature", *RANGES["temperature"], whole=False),
        top_p=number(top_p, "top_p", *RANGES["top_p"], whole=False),
        top_k=number(top_k, "top_k", *RANGES["top_k"], whole=True),
        seed=seed_value,
        use_audio_in_video=_bool(use_audio_in_video, "use the video's audio"),
    )
    return Settings(generation, attention=_bool(attention, "record attention"))


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
    kind = media.sniff(resolved, name=name, expect=slot)
    if kind not in _SLOT_KINDS[slot]:
        article = {"audio": "audio", "image": "an image", "video": "a video"}
        raise MediaError(f"{name} is {article[kind]}, not {article[slot]}; put it in the {kind} box instead")
    return str(resolved)


def upload_folder() -> Path:
    """Gradio's folder of uploaded files (as `gradio.utils.get_upload_folder` finds it), resolved."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def upload_paths(*payloads) -> list[str]:
    """The server paths of the uploads among `payloads` that lie in Gradio's upload folder and are not
    the app's own files (`keep`); others: none."""
    folder, out = upload_folder(), []
    for payload in payloads:
        try:
            path = upload_path(payload)
        except MediaError:
            continue  # refused when the message is checked
        if path is None:
            continue
        resolved = Path(path).resolve()
        if resolved.is_relative_to(folder) and str(resolved) not in _KEPT:
            out.append(str(resolved))
    return out


# Uploads held by live sessions: Gradio names an upload by its content, so two sessions that upload the
# same file share one path, and it goes when the last of them ends.
_HELD: Counter = Counter()
_HELD_LOCK = threading.Lock()

# The app's own files in Gradio's upload folder (its examples, which Gradio serves from there): no
# session holds or deletes them. A click on an example hands a session the example's path, and an
# upload of the same content gets the same path (Gradio names files by content).
_KEPT: set[str] = set()


def keep(paths) -> None:
    """Mark `paths` as the app's own: sessions that send them never delete them."""
    with _HELD_LOCK:
        _KEPT.update(str(Path(p).resolve()) for p in paths)


def _release(paths: list[str]) -> None:
    with _HELD_LOCK:
        gone = []
        for path in paths:
            _HELD[path] -= 1
            if _HELD[path] <= 0:
                del _HELD[path]
                if path not in _KEPT:
                    gone.append(Path(path))
    for path in gone:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # Gradio's per-upload folder, when empty
        except OSError:
            pass


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


# --- one browser session --------------------------------------------------------------------------------


@dataclass
class Turn:
    """One finished turn: the conversation it answered, its settings, its reply (with trace)."""

    conversation: list[dict]
    settings: Settings
    reply: Reply
    ablate: dict | None = None
    timings: object | None = None  # omnilab.streaming.Timings of a streamed turn
    notice: str | None = None  # what the turn did not record, and why (e.g. attention over budget)


@dataclass
class Session:
    """What one browser session has: its conversation so far and the turns the panels show."""

    messages: list[dict] = field(default_factory=list)  # user and assistant messages, Qwen format
    chat: list[dict] = field(default_factory=list)  # what the chat box shows
    last: Turn | None = None
    ablated: Turn | None = None
    attribution: analysis.Attribution | None = None  # of the last reply, once asked for
    folder: str | None = None  # this session's downloads
    uploads: list[str] = field(default_factory=list)  # files this session uploaded (deleted when it ends)
    memory_budget: int = MEMORY_BUDGET_BYTES  # what one turn's captures may hold
    # What goes when Gradio drops this session without ending it (evicted at its session capacity,
    # which calls no delete callback): the session's files, kept where a finalizer can reach them.
    _files: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _dropped: object = field(default=None, init=False, repr=False, compare=False)

    def conversation(self, system, message: dict) -> list[dict]:
        """The conversation a new turn answers: the system prompt, the turns so far, `message`."""
        if len(self.messages) // 2 >= MAX_TURNS:
            raise ConversationError(
                f"this conversation has {MAX_TURNS} turns, the most the demo keeps; press Clear to start anew"
            )
        head = [m for m in [_system_message(system)] if m is not None]
        return head + self.messages + [message]

    def record(self, message: dict, turn: Turn) -> None:
        """Keep `turn` as the last one (the panels show it); the ablation and attribution of the previous go."""
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
            root = output_root() / f"pid-{os.getpid()}"
            root.mkdir(parents=True, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix=f"session-{uuid.uuid4().hex[:8]}-", dir=root)
            self._watch()
        return Path(self.folder)

    def _watch(self) -> None:
        """Remove this session's files when it is dropped unclosed (Gradio's eviction at capacity)."""
        self._files.update(folder=self.folder, uploads=self.uploads)
        if self._dropped is None:
            self._dropped = weakref.finalize(self, _remove_files, self._files)

    def hold(self, paths: list[str]) -> None:
        """Keep uploads at `paths` (from `upload_paths`) for this session's life; they go when it ends."""
        with _HELD_LOCK:
            for path in paths:
                if path not in self.uploads:
                    self.uploads.append(path)
                    _HELD[path] += 1
        self._watch()

    def close(self) -> None:
        """Remove this session's files: its downloads and the uploads no other live session holds."""
        self._files.update(folder=self.folder, uploads=self.uploads)
        self.folder, self.uploads = None, []
        _remove_files(self._files)


def _remove_files(files: dict) -> None:
    """Remove a session's download folder and release its uploads (once: `files` is emptied)."""
    folder, uploads = files.pop("folder", None), files.pop("uploads", [])
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    _release(list(uploads))


def output_root() -> Path:
    """Where sessions keep their downloads: one folder per server process (pid-N), one per session in it."""
    return Path(tempfile.gettempdir()) / "omnilab-app"


def remove_stale_outputs() -> list[Path]:
    """Remove the download folders of server processes that have ended (killed ones too); returns them."""
    gone = []
    for folder in output_root().glob("pid-*"):
        pid = folder.name.removeprefix("pid-")
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_session(session) -> None:
    """Gradio's delete callback for a session's state."""
    if isinstance(session, Session):
        session.close()


def clear(session: Session) -> Session:
    """A fresh conversation; this session's files go."""
    session.close()
    return Session()
