"""Manifests: the samples a collection runs over.

A manifest is JSONL, one sample a line:

    {"id": "img-003", "conversation": [{"role": "user", "content": [{"type": "image", "image": "image.png"},
                                        {"type": "text", "text": "What shapes are there?"}]}],
     "use_audio_in_video": false}

`id` is unique and becomes the store's `sample_id`; `conversation` is the Qwen chat format
(`omnilab.conversation`); `use_audio_in_video` (default false) feeds each video's audio track too.
Any other keys are kept, as JSON, in the store's `samples.extra` (labels, sources). Relative media
paths are relative to the manifest's folder. A `datasets` dataset saved with `save_to_disk` (a
folder) works too, with the same columns (`conversation` as a list or a JSON string).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConversationError, OmnilabError

MEDIA_TYPES = ("audio", "image", "video")
KEYS = ("id", "conversation", "use_audio_in_video")


@dataclass(frozen=True)
class Sample:
    """One manifest entry: its id, its conversation as written, and where its media paths start."""

    sample_id: str
    conversation: object
    use_audio_in_video: bool = False
    line: int = 0
    base: str = "."
    extra: dict = field(default_factory=dict)

    def resolved(self):
        """The conversation with relative media paths made absolute (relative to the manifest's folder)."""
        return _resolve(self.conversation, Path(self.base))

    def media_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(MEDIA_TYPES, 0)
        for message in self.conversation if isinstance(self.conversation, list) else []:
            content = message.get("content") if isinstance(message, dict) else None
            for item in content if isinstance(content, list) else []:
                if isinstance(item, dict) and item.get("type") in counts:
                    counts[item["type"]] += 1
        return counts


def read_manifest(path: str | os.PathLike) -> list[Sample]:
    """The samples of a JSONL manifest or a saved `datasets` dataset, checked for ids; a bad line is named."""
    path = Path(path)
    if not path.exists():
        raise ConversationError(
            f'manifest \'{path}\' does not exist; pass a JSONL file (one {{"id", "conversation"}} a line) '
            "or a datasets folder saved with save_to_disk"
        )
    rows = _dataset_rows(path) if path.is_dir() else _jsonl_rows(path)
    base = str(path.resolve() if path.is_dir() else path.resolve().parent)
    samples, seen = [], {}
    for line, row in rows:
        where = f"manifest '{path}' {'row' if path.is_dir() else 'line'} {line}"
        if not isinstance(row, dict):
            raise ConversationError(f'{where}: each sample is a JSON object with "id" and "conversation"')
        sample_id = row.get("id")
        if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)) or str(sample_id) == "":
            raise ConversationError(f'{where}: "id" must be a non-empty string or integer; got {sample_id!r}')
        sample_id = str(sample_id)
        if sample_id in seen:
            raise ConversationError(
                f"{where}: id {sample_id!r} is already used on line {seen[sample_id]}; ids must be unique"
            )
        seen[sample_id] = line
        if "conversation" not in row:
            raise ConversationError(f'{where} (id {sample_id!r}): "conversation" is missing')
        conversation = row["conversation"]
        if isinstance(conversation, str) and path.is_dir():
            try:
                conversation = json.loads(conversation)
            except json.JSONDecodeError as exc:
                raise ConversationError(
                    f"{where} (id {sample_id!r}): conversation is not valid JSON ({exc})"
                ) from None
        use_audio_in_video = row.get("use_audio_in_video", False)
        if use_audio_in_video is None:
            use_audio_in_video = False
        if not isinstance(use_audio_in_video, bool):
            raise ConversationError(f'{where} (id {sample_id!r}): "use_audio_in_video" must be true or false')
        extra = {k: v for k, v in row.items() if k not in KEYS}
        samples.append(Sample(sample_id, conversation, use_audio_in_video, line, base, extra))
    if not samples:
        raise ConversationError(f"manifest '{path}' holds no samples")
    return samples


def _jsonl_rows(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConversationError(f"manifest '{path}' cannot be read as UTF-8 text ({exc})") from None
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((number, json.loads(raw)))
        except json.JSONDecodeError as exc:
            raise ConversationError(
                f"manifest '{path}' line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                'each line is one JSON object {"id": ..., "conversation": [...]}'
            ) from None
    return rows


def _dataset_rows(path: Path):
    try:
        import datasets
    except ImportError:
        raise OmnilabError(
            f"'{path}' is a folder, read as a datasets dataset saved with save_to_disk, but the datasets "
            "package is not installed; pip install datasets, or write the manifest as JSONL"
        ) from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise ConversationError(f"'{path}' is not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise ConversationError(
            f"'{path}' holds the splits {', '.join(dataset)}; pass one split's folder (e.g. '{path}/{next(iter(dataset))}')"
        )
    return [(index, row) for index, row in enumerate(dataset)]


def _resolve(conversation, base: Path):
    if not isinstance(conversation, list):
        return conversation
    out = []
    for message in conversation:
        if not isinstance(message, dict) or not isinstance(message.get("content"), list):
            out.append(message)
            continue
        content = []
        for item in message["content"]:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind in MEDIA_TYPES and isinstance(item.get(kind), str) and _is_path(item[kind]):
                local = os.path.expanduser(item[kind])
                item = {**item, kind: local if os.path.isabs(local) else str(base / local)}
            content.append(item)
        out.append({**message, "content": content})
    return out


def _is_path(text: str) -> bool:
    return "://" not in text and not text.startswith("data:")
