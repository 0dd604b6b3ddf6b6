"""The Qwen chat format: validate a conversation, gather its media in order, and turn it into model inputs.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str | [item, ...]}`
where an item is `{"type": "text", "text": ...}`, `{"type": "audio", "audio": path | array | (array, sr)}`
(optional `"sampling_rate"`), `{"type": "image", "image": path | PIL image | array}` or
`{"type": "video", "video": path}`.

`prepare_inputs` is the one path from a conversation to the processor's model inputs (`lab.prepare`,
`generate`, `forward`, `stream` and the store all use it); `batch_inputs` puts several prepared
inputs into one right-padded batch (the store's batched collection and the organism's training).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import media
from .errors import ConversationError

ROLES = ("system", "user", "assistant")
VIDEO_FPS = 2.0  # frames sampled per second of video, as in Qwen's cookbooks
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


def prepare_inputs(
    processor,
    conversation,
    *,
    use_audio_in_video: bool = False,
    add_generation_prompt: bool = True,
    video_size: dict | None = None,
    device=None,
):
    """The model inputs of `conversation` (the processor's BatchFeature, on `device`) and its
    gathered media (`Gathered`: the items a trace names). `video_size`: the processor's video size
    (a preset's small frames); None keeps the processor's own.
    """
    gathered = gather(conversation, use_audio_in_video=use_audio_in_video, video_fps=VIDEO_FPS)
    rates = sorted({video.fps for video in gathered.videos})
    if len(rates) > 1:  # the processor takes one rate for all videos: sample them all at the lowest
        gathered = gather(conversation, use_audio_in_video=use_audio_in_video, video_fps=rates[0])
    # a video slower than VIDEO_FPS is sampled at its own rate; the processor must know it, or its
    # TM-RoPE times (temporal_patch_size / fps seconds a grid) come out too short
    fps = min(rates, default=VIDEO_FPS)
    text = processor.apply_chat_template(
        gathered.messages, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    kwargs: dict = {"return_tensors": "pt", "padding": True}
    if gathered.images:
        kwargs["images"] = gathered.images
    if gathered.videos:
        kwargs["videos"] = [v.frames for v in gathered.videos]
        # cap_pixels_per_frame=True: qwen-vl-utils' per-frame share of a whole-video pixel budget,
        # the reference preprocessing Qwen trained with and transformers' coming default (a long or
        # densely sampled video costs what it costs there; short videos' token counts are unchanged).
        # Passing it also settles the processor's notice that it is unset.
        videos_kwargs = {"fps": fps, "do_sample_frames": False, "cap_pixels_per_frame": True}
        if video_size is not None:
            videos_kwargs["size"] = video_size
        kwargs["videos_kwargs"] = videos_kwargs
    if gathered.audio:
        kwargs["audio"] = gathered.audio
    if use_audio_in_video and gathered.videos:
        kwargs["load_audio_from_video"] = True
        kwargs["audio_from_video_indices"] = gathered.audio_from_video
    inputs = processor(text=text, **kwargs)
    return (inputs.to(device) if device is not None else inputs), gathered


def batch_inputs(inputs: list[dict], pad_id: int) -> dict:
    """Prepared inputs of several conversations as one batch: ids and masks right padded to the
    longest, audio features padded to the longest and stacked with their masks, image and video
    patches, grids and seconds per grid concatenated in row order (what the thinker's towers and
    `get_rope_index` expect of a batch)."""
    length = max(int(x["input_ids"].shape[1]) for x in inputs)
    first = inputs[0]["input_ids"]
    ids = torch.full((len(inputs), length), pad_id, dtype=first.dtype, device=first.device)
    mask = torch.zeros((len(inputs), length), dtype=inputs[0]["attention_mask"].dtype, device=first.device)
    for row, x in enumerate(inputs):
        n = int(x["input_ids"].shape[1])
        ids[row, :n] = x["input_ids"][0]
        mask[row, :n] = x["attention_mask"][0]
    out = {"input_ids": ids, "attention_mask": mask}
    audio = [x for x in inputs if x.get("input_features") is not None]
    if audio:
        frames = max(int(x["input_features"].shape[-1]) for x in audio)
        for key in ("input_features", "feature_attention_mask"):  # zeros past each item's own frames
            out[key] = torch.cat([_pad_to(x[key], frames) for x in audio])
    known = {"input_ids", "attention_mask", "input_features", "feature_attention_mask"}
    for key in dict.fromkeys(k for x in inputs for k in x.keys() if k not in known):
        parts = [x[key] for x in inputs if x.get(key) is not None]
        out[key] = torch.cat(parts)
    return out


def _pad_to(tensor: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, frames - int(tensor.shape[-1])))
