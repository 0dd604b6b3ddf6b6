"""Name media items in messages, check files, and tell audio, images and video apart by their content."""

from __future__ import annotations

import mimetypes
import os
import re
import struct
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from omnilab.errors import MediaError

from . import limits

_ARTICLE = {"audio": "audio", "image": "an image", "video": "a video"}
_LOADER = {"audio": "load_audio", "image": "load_image", "video": "load_video"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- naming and small formatting -----------------------------------------------------------------


def label_of(source: Any, name: str | None) -> str:
    """How messages call an item with no kind in front: the given name, or the quoted file name."""
    if name is not None:
        return name
    if isinstance(source, str) and (_SCHEME.match(source) or source.startswith("data:")):
        return f"'{source[:80]}'"
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return f"'{Path(text).name or text}'" if isinstance(text, str) else repr(text)
    return "the source"


def subject_of(kind: str, source: Any, name: str | None) -> str:
    """How messages call an item: the given name, `audio 'talk.mp3'`, or `the audio array`."""
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return f"{kind} {label_of(source, None)}"
    return f"the {kind} array"


def duration_text(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2f} s"


def _size_text(n_bytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


def ffmpeg_reason(error: Exception) -> str:
    """FFmpeg's own words for a decoding error, without PyAV's errno and call site."""
    reason = getattr(error, "strerror", None) or str(error)
    return f"FFmpeg: {reason[:1].lower()}{reason[1:]}"


def _refuse_remote(source: Any, label: str) -> Any:
    """Refuse URLs; turn a `file://` URI into its local path."""
    if not isinstance(source, str):
        return source
    if source.startswith("data:"):
        raise MediaError(
            f"{label} is a data: URI; omnilab reads local files only; decode it and save it to a file first"
        )
    if _SCHEME.match(source):
        parsed = urlparse(source)
        if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
            return unquote(parsed.path)
        raise MediaError(
            f"{label} is a URL ({parsed.scheme}://); omnilab reads local files only; download it first"
        )
    return source


# --- files and content types ---------------------------------------------------------------------


def check_file(
    path: str | os.PathLike, *, max_bytes: int = limits.MAX_FILE_BYTES, name: str | None = None
) -> Path:
    """Resolve `path` to an absolute `Path` of a readable regular file no larger than `max_bytes`.

    Raises `MediaError` for URLs, missing paths, directories, other non-files and files too big.
    """
    label = label_of(path, name)
    return _check_file(path, max_bytes=max_bytes, label=label)


def _check_file(path: Any, *, max_bytes: int | None, label: str) -> Path:
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise MediaError(f"{label} has type {type(path).__name__}; pass a file path (str or pathlib.Path)")
    text = _refuse_remote(os.fspath(path), label)
    if not text.strip():
        raise MediaError(f"{label}: the path is empty; pass the path of a file")
    resolved = Path(text).expanduser().resolve()
    if not resolved.exists():
        raise MediaError(
            f"{label} does not exist (looked for {resolved}); check the path and the working directory"
        )
    if resolved.is_dir():
        raise MediaError(f"{label} is a directory, not a file ({resolved}); pass one file inside it")
    if not resolved.is_file():
        raise MediaError(f"{label} is not a regular file ({resolved}); copy its content to a file first")
    if not os.access(resolved, os.R_OK):
        raise MediaError(f"{label} cannot be read (permission denied: {resolved}); fix its permissions")
    size = resolved.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise MediaError(
            f"{label} is {_size_text(size)}; the limit is {_size_text(max_bytes)} (max_bytes); "
            "shrink or split it, or raise max_bytes"
        )
    return resolved


def _identify(head: bytes) -> tuple[str, str] | None:
    """(kind, format) of a file from its first bytes, or None when the content is not media we know."""
    tag, form = head[:4], head[8:12]
    if tag in (b"RIFF", b"RF64", b"BW64") and form == b"WAVE":
        return "audio", "WAV"
    if tag == b"RIFF" and form == b"AVI ":
        return "video", "AVI"
    if tag == b"RIFF" and form == b"WEBP":
        return "image", "WEBP"
    if tag == b"FORM" and form in (b"AIFF", b"AIFC"):
        return "audio", "AIFF"
    if tag == b"fLaC":
        return "audio", "FLAC"
    if tag == b"OggS":
        return ("video", "Ogg/Theora") if b"\x80theora" in head else ("audio", "OGG")
    if head[:3] == b"ID3":
        return "audio", "MP3"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "image", "PNG"
    if head[:3] == b"\xff\xd8\xff":
        return "image", "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image", "TIFF"
    # "BM" alone is too weak (text can start with it): also want the zero reserved field and a
    # known DIB header size.
    if head[:2] == b"BM" and len(head) >= 18 and head[6:10] == b"\x00" * 4:
        if struct.unpack("<I", head[14:18])[0] in (12, 40, 52, 56, 64, 108, 124):
            return "image", "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"M4P ", b"F4A "):
            return "audio", "M4A"
        if brand in (b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"):
            return "image", "HEIF/AVIF"
        return "video", "MOV" if brand == b"qt  " else "MP4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "video", "MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video", "WebM" if b"webm" in head[:64] else "MKV"
    if head[:4] == b"FLV\x01":
        return "video", "FLV"
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return "video", "MPEG-TS"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        # MPEG audio frame sync; layer bits 00 mean an ADTS (AAC) stream.
        return "audio", "AAC" if head[1] & 0x06 == 0 else "MP3"
    return None


def _describe(head: bytes) -> str:
    """A few words on what non-media content looks like, for error messages."""
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # The read may cut a multi-byte character in two; that is still text.
        text = head[: error.start].decode("utf-8") if error.start >= len(head) - 3 else ""
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    if text and printable >= 0.95 * len(text):
        start = text.lstrip().lower()
        if start.startswith(("<!doctype html", "<html")):
            return "an HTML page (a download that returned a web page instead of the file?)"
        if start.startswith(("{", "[")):
            return "JSON text"
        return "plain text"
    return f"unrecognised binary data (it starts with {head[:8].hex(' ')})"


def _expected_kind(path: Path) -> str | None:
    guessed, _ = mimetypes.guess_type(path.name)
    kind = (guessed or "").split("/")[0]
    return kind if kind in _ARTICLE else None


def _sniff(path: Path, label: str, expect: str | None) -> tuple[str, str]:
    with path.open("rb") as file:
        head = file.read(512)
    if not head:
        raise MediaError(f"{label} is empty (0 bytes); re-export or re-copy it")
    found = _identify(head)
    if found is None:
        expect = expect or _expected_kind(path)
        wanted = _ARTICLE[expect] if expect else "audio, an image or a video"
        raise MediaError(
            f"{label} is not {wanted}: its content is {_describe(head)}; "
            "check that the file is what its name says"
        )
    return found


def _content(kind: str, fmt: str) -> str:
    """'MP3 audio', 'a PNG image', 'an MP4 video'."""
    if kind == "audio":
        return f"{fmt} audio"
    return f"{'an' if fmt[0] in 'AEIOFLMNRSX' else 'a'} {fmt} {kind}"


def check_media(source: Any, label: str, wanted: str, *, also: str | None = None) -> tuple[Path, str]:
    """Check a file to load: no larger than `MAX_FILE_BYTES`, its content `wanted` (or `also`) media.

    Returns the resolved path and the format its content shows ("WAV", "PNG", "MP4", ...).
    """
    path = _check_file(source, max_bytes=limits.MAX_FILE_BYTES, label=label)
    kind, fmt = _sniff(path, label, expect=wanted)
    if kind not in (wanted, also):
        raise MediaError(
            f"{label} is not {_ARTICLE[wanted]}: its content is {_content(kind, fmt)}; use {_LOADER[kind]} for it"
        )
    return path, fmt


def sniff(path: str | os.PathLike, *, name: str | None = None, expect: str | None = None) -> str:
    """The media type of a file judged by its content (magic bytes), not its name.

    Returns "audio", "image" or "video". Knows WAV, FLAC, OGG, AIFF, MP3, AAC (ADTS), M4A, PNG, JPEG,
    GIF, WEBP, BMP, TIFF, HEIF/AVIF, MP4/MOV, MKV/WebM, AVI, FLV and MPEG-TS. Raises `MediaError` for
    missing or empty files and for any other content; that error says the file is not `expect`
    (the kind the caller wanted), or, without it, the kind its name suggests.
    """
    label = label_of(path, name)
    resolved = _check_file(path, max_bytes=None, label=label)
    kind, _ = _sniff(resolved, label, expect=expect)
    return kind
