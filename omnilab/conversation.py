"""The Qwen chat format: validate a conversation and gather its media, in order.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str | [item, ...]}`
where an item is `{"type": "text", "text": ...}`, `{"type": "audio", "audio": path | array | (array, sr)}`
(optional `"sampling_rate"`), `{"type": "image", "image": path | PIL image | array}` or
`{"type": "video", "video": path}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import media
from .errors import ConversationError

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = ("audio", "image", "video")


@dataclass
class Gathered:
    """The media of a conversation, loaded and validated, in the order the processor wants."""

    messages: list[dict]  # the conversation with media replaced by their names (for the template)
    audio: list[np.ndarray] = field(default_factory=list)  # standalone audio and video tracks, in order
    audio_from_video: list[int | None] = field(default_factory=list)  # per audio slot: video index or None
    images: list = field(default_factory=list)
    videos: list[media.Video] = field(default_factory=list)
    items: list[dict] = field(default_factory=list)  # one per media item: modality, index, name


def normalize(conversation) -> list[dict]:
    """Check the Qwen chat format; return it with string content turned into a text item."""
    if isinstance(conversation, str):
        conversation = [{"role": "user", "content": conversation}]
    if isinstance(conversation, dict):
        conversation = [conversation]
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ConversationError(
            "a conversation is a non-empty list of {'role': ..., 'content': [...]} messages "
            f"(the Qwen chat format); got {type(conversation).__name__}"
        )
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ConversationError(f"message {i} must be a dict with 'role' and 'content'")
        role = message["role"]
        if role not in ROLES:
            raise ConversationError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, (list, tuple)):
            raise ConversationError(f"message {i}: content must be a string or a list of items")
        items = []
        for j, item in enumerate(content):
            if not isinstance(item, dict) or item.get("type") not in ("text", *MEDIA_TYPES):
                raise ConversationError(
                    f"message {i} item {j}: each item is a dict with 'type' text, audio, image or video"
                )
            kind = item["type"]
            if kind not in item:
                raise ConversationError(f"message {i} item {j}: a {kind} item needs a '{kind}' key")
            if kind == "text" and not isinstance(item["text"], str):
                raise ConversationError(f"message {i} item {j}: text must be a string")
            items.append(item)
        out.append({"role": role, "content": items})
    if not any(item["type"] != "text" or item["text"].strip() for m in out for item in m["content"]):
        raise ConversationError(
            "the conversation is empty: write a message or attach audio, an image or a video"
        )
    return out


def gather(conversation, *, use_audio_in_video: bool = False, video_fps: float = 2.0) -> Gathered:
    """Load and validate every media item of `conversation`, in order of appearance."""
    messages = normalize(conversation)
    gathered = Gathered(messages=[])
    counts = dict.fromkeys(MEDIA_TYPES, 0)
    for message in messages:
        content = []
        for item in message["content"]:
            kind = item["type"]
            if kind == "text":
                content.append(item)
                continue
            source = item[kind]
            name = _name(source, kind, counts[kind])
            if kind == "audio":
                audio = media.load_audio(source, sample_rate=item.get("sampling_rate"), name=name)
                media.check_model_audio(audio, source, name=name)
                gathered.audio.append(audio)
                gathered.audio_from_video.append(None)
                gathered.items.append({"modality": "audio", "index": counts["audio"], "name": name})
            elif kind == "image":
                gathered.images.append(media.load_image(source, name=name))
                gathered.items.append({"modality": "image", "index": counts["image"], "name": name})
            else:
                video = media.load_video(source, fps=video_fps, with_audio=use_audio_in_video, name=name)
                if use_audio_in_video:
                    media.check_model_audio(video.audio, source, name=name, kind="video")
                    gathered.audio.append(video.audio)
                    gathered.audio_from_video.append(counts["video"])
                gathered.videos.append(video)
                gathered.items.append({"modality": "video", "index": counts["video"], "name": name})
            counts[kind] += 1
            content.append({"type": kind, kind: name})
        gathered.messages.append({"role": message["role"], "content": content})
    return gathered


def _name(source, kind: str, index: int) -> str:
    if isinstance(source, (str,)) or hasattr(source, "__fspath__"):
        return str(source)
    return f"{kind} item {index}"
