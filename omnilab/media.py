"""Read and validate the audio, images and videos that go into Qwen3-Omni.

Every loader takes a local file (or an in-memory array), checks it before doing expensive work
(size, real content type, duration and pixel count from the header), decodes it and hands back
what the model's processor expects:

- `load_audio`: float32 mono at 16 kHz in [-1, 1];
- `load_image`: an RGB `PIL.Image.Image`;
- `load_video`: a `Video` of uint8 frames [T, H, W, 3] sampled at `fps`, with an even frame count
  (Qwen's temporal patch is 2), and the audio track when asked for.

Anything unusable raises `MediaError` naming the item, the reason and the way out. Nothing is
fetched from the network. Limits are module-level constants, read at call time.
"""

from __future__ import annotations

import logging
import math
import mimetypes
import os
import re
import struct
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import av
import numpy as np
import soundfile
import soxr
from PIL import Image, ImageOps

from omnilab.errors import MediaError

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Rate of every waveform omnilab returns (Qwen3-Omni's audio encoder runs at 16 kHz)."""
MAX_AUDIO_SECONDS = 40 * 60
MIN_AUDIO_SAMPLES = 201
"""Shortest audio accepted, in samples at 16 kHz (12.6 ms): the Whisper feature extractor's STFT
reflect-pads n_fft // 2 = 200 samples on each side, which needs more input than that."""
"""Longest audio accepted: 40 min, about what fits Qwen3-Omni's context."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest image accepted, in pixels, checked from the header before any pixel is decoded."""
MAX_VIDEO_FRAMES = 768
"""Most frames a video may give after sampling at `fps`."""
MAX_VIDEO_SECONDS = 40 * 60
"""Longest video accepted: 40 min."""
MAX_FILE_BYTES = 2 * 1024**3
"""Largest file `check_file` accepts by default: 2 GiB."""

# Audio at most this far over full scale is clipped (decoders overshoot a little); beyond it the
# samples are almost surely on the wrong scale (int16 values stored as floats) and are refused.
_MAX_AUDIO_PEAK = 2.0
# A 2-D audio array's channel axis is the short one, and no longer than this.
_MAX_CHANNELS = 32
_SOUNDFILE_FORMATS = {"WAV", "FLAC", "OGG", "AIFF"}
_ARTICLE = {"audio": "audio", "image": "an image", "video": "a video"}
_LOADER = {"audio": "load_audio", "image": "load_image", "video": "load_video"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- naming and small formatting -----------------------------------------------------------------


def _label(source: Any, name: str | None) -> str:
    """How messages call an item with no kind in front: the given name, or the quoted file name."""
    if name is not None:
        return name
    if isinstance(source, str) and (_SCHEME.match(source) or source.startswith("data:")):
        return f"'{source[:80]}'"
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        return f"'{Path(text).name or text}'" if isinstance(text, str) else repr(text)
    return "the source"


def _subject(kind: str, source: Any, name: str | None) -> str:
    """How messages call an item: the given name, `audio 'talk.mp3'`, or `the audio array`."""
    if name is not None:
        return name
    if isinstance(source, (str, os.PathLike)):
        return f"{kind} {_label(source, None)}"
    return f"the {kind} array"


def _duration_text(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 120 else f"{seconds:.2f} s"


def _size_text(n_bytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{int(n_bytes)} bytes"


def _ffmpeg_reason(error: Exception) -> str:
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


def check_file(path: str | os.PathLike, *, max_bytes: int = MAX_FILE_BYTES, name: str | None = None) -> Path:
    """Resolve `path` to an absolute `Path` of a readable regular file no larger than `max_bytes`.

    Raises `MediaError` for URLs, missing paths, directories, other non-files and files too big.
    """
    label = _label(path, name)
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


def _refuse_other_kind(kind: str, fmt: str, wanted: str, label: str) -> None:
    raise MediaError(
        f"{label} is not {_ARTICLE[wanted]}: its content is {_content(kind, fmt)}; use {_LOADER[kind]} for it"
    )


def sniff(path: str | os.PathLike, *, name: str | None = None, expect: str | None = None) -> str:
    """The media type of a file judged by its content (magic bytes), not its name.

    Returns "audio", "image" or "video". Knows WAV, FLAC, OGG, AIFF, MP3, AAC (ADTS), M4A, PNG, JPEG,
    GIF, WEBP, BMP, TIFF, HEIF/AVIF, MP4/MOV, MKV/WebM, AVI, FLV and MPEG-TS. Raises `MediaError` for
    missing or empty files and for any other content; that error says the file is not `expect`
    (the kind the caller wanted), or, without it, the kind its name suggests.
    """
    label = _label(path, name)
    resolved = _check_file(path, max_bytes=None, label=label)
    kind, _ = _sniff(resolved, label, expect=expect)
    return kind


# --- audio ---------------------------------------------------------------------------------------


def load_audio(source: Any, *, sample_rate: int | None = None, name: str | None = None) -> np.ndarray:
    """Load audio as float32 mono at `SAMPLE_RATE` (16 kHz), with samples in [-1, 1].

    `source` is one of:
    - a file path (str or Path): WAV, FLAC, OGG and AIFF are read with soundfile, anything else
      (MP3, M4A, the audio track of a video, or a file soundfile refuses) with PyAV;
    - an array with its rate: `(array, sample_rate)`, `{"array": ..., "sampling_rate": ...}`
      (the Hugging Face datasets form) or `array` with `sample_rate=`.
      Arrays may be 1-D, or 2-D channels-first or channels-last (the channel axis is the short
      one); channels are averaged. Integer arrays are scaled to [-1, 1].
    `name` is how error messages call the item (e.g. "audio item 2"). Returns shape [n_samples].
    """
    if isinstance(source, (str, os.PathLike)):
        if sample_rate is not None:
            raise MediaError(
                f"{_subject('audio', source, name)}: sample_rate= is for arrays; "
                "a file carries its own rate, so leave sample_rate out"
            )
        return _load_audio_file(source, name)
    subject = _subject("audio", source, name)
    if isinstance(source, tuple):
        if len(source) != 2:
            raise MediaError(f"{subject} is a tuple of {len(source)} items; pass (array, sample_rate)")
        array, rate = source
        if sample_rate is not None and sample_rate != rate:
            raise MediaError(
                f"{subject} carries sample rate {rate} but sample_rate={sample_rate} was passed; "
                "pass one of them"
            )
    elif isinstance(source, dict):
        if "array" not in source or "sampling_rate" not in source:
            raise MediaError(
                f"{subject} is a dict with keys {sorted(map(str, source))}; "
                "it needs 'array' and 'sampling_rate'"
            )
        array, rate = source["array"], source["sampling_rate"]
    elif isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        if sample_rate is None:
            raise MediaError(
                f"{subject} has no sample rate; pass sample_rate=, or (array, sample_rate), "
                'or {"array": ..., "sampling_rate": ...}'
            )
        array, rate = source, sample_rate
    else:
        raise MediaError(
            f"{subject} has type {type(source).__name__}; pass a file path, (array, sample_rate), "
            '{"array": ..., "sampling_rate": ...} or an array with sample_rate='
        )
    return _audio_from_array(array, rate, subject)


def _audio_from_array(array: Any, rate: Any, subject: str) -> np.ndarray:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise MediaError(f"{subject} has sample rate {rate!r}; pass a positive number of samples per second")
    if not math.isfinite(rate) or rate <= 0:
        raise MediaError(f"{subject} has sample rate {rate}; pass a positive number of samples per second")
    if hasattr(array, "detach"):  # a torch tensor, possibly on the GPU
        array = array.detach().cpu().numpy()
    samples = np.asarray(array)
    if samples.size == 0:
        raise MediaError(f"{subject} holds no samples (shape {samples.shape}); pass audio that is not empty")
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768.0
    elif samples.dtype == np.int32:
        samples = samples.astype(np.float32) / 2147483648.0
    elif samples.dtype == np.int8:
        samples = samples.astype(np.float32) / 128.0
    elif samples.dtype == np.uint8:
        samples = (samples.astype(np.float32) - 128.0) / 128.0
    elif samples.dtype.kind == "f":
        samples = samples.astype(np.float32, copy=False)
    else:
        raise MediaError(
            f"{subject} has dtype {samples.dtype}; pass float samples in [-1, 1] or int16 / int32 PCM"
        )
    if samples.ndim == 2:
        rows, cols = samples.shape
        if rows <= _MAX_CHANNELS and rows < cols:
            samples = samples.mean(axis=0)
        elif cols <= _MAX_CHANNELS and cols < rows:
            samples = samples.mean(axis=1)
        else:
            raise MediaError(
                f"{subject} has shape {samples.shape}, where no axis looks like channels; "
                "pass [samples], [channels, samples] or [samples, channels]"
            )
    elif samples.ndim != 1:
        raise MediaError(
            f"{subject} has shape {samples.shape}; pass [samples], [channels, samples] or [samples, channels]"
        )
    seconds = len(samples) / rate
    if seconds > MAX_AUDIO_SECONDS:
        raise _too_long(subject, seconds, MAX_AUDIO_SECONDS)
    return _finish_audio(samples, rate, subject)


def _too_long(subject: str, seconds: float, limit: float, origin: str = "") -> MediaError:
    return MediaError(
        f"{subject} is {_duration_text(seconds)} long{origin}; the limit is {_duration_text(limit)} "
        "(Qwen3-Omni's context); trim it or split it"
    )


def _finish_audio(samples: np.ndarray, rate: float, subject: str) -> np.ndarray:
    """Check mono float samples, resample them to 16 kHz and clip them to [-1, 1]."""
    if samples.size == 0:
        raise MediaError(f"{subject} holds no samples (0 s); pass audio that is not empty")
    finite = np.isfinite(samples)
    if not finite.all():
        first = int(np.argmin(finite))
        raise MediaError(
            f"{subject} contains NaN or infinite samples (the first at {first / rate:.3f} s); "
            "fix whatever produced it, or replace them (np.nan_to_num)"
        )
    peak = float(np.abs(samples).max())
    if peak > _MAX_AUDIO_PEAK:
        raise MediaError(
            f"{subject} peaks at {peak:.4g}, far outside [-1, 1] (int16 values stored as floats?); "
            "scale it into [-1, 1] (e.g. divide int16 values by 32768)"
        )
    if rate != SAMPLE_RATE:
        # soxr at "HQ" is what librosa.resample(res_type="soxr_hq") runs, without librosa's
        # seconds-long import.
        samples = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)


def check_model_audio(
    samples: np.ndarray, source: Any, *, name: str | None = None, kind: str = "audio"
) -> None:
    """Refuse 16 kHz audio shorter than the model's feature extractor accepts (`MIN_AUDIO_SAMPLES`)."""
    if len(samples) < MIN_AUDIO_SAMPLES:
        subject = _subject(kind, source, name) + (" (its audio track)" if kind == "video" else "")
        raise MediaError(
            f"{subject} is {len(samples) / SAMPLE_RATE * 1000:.1f} ms long ({len(samples)} samples at 16 kHz); "
            f"the shortest audio the model accepts is {MIN_AUDIO_SAMPLES / SAMPLE_RATE * 1000:.1f} ms "
            f"({MIN_AUDIO_SAMPLES} samples); pass a longer recording"
        )


def _load_audio_file(source: str | os.PathLike, name: str | None) -> np.ndarray:
    label, subject = _label(source, name), _subject("audio", source, name)
    path = _check_file(source, max_bytes=MAX_FILE_BYTES, label=label)
    kind, fmt = _sniff(path, label, expect="audio")
    if kind == "image":
        _refuse_other_kind(kind, fmt, "audio", label)
    if fmt == "WAV":
        _check_wav_header(path, subject)
    if fmt in _SOUNDFILE_FORMATS:
        try:
            samples, rate = _read_with_soundfile(path, subject)
        except (soundfile.LibsndfileError, RuntimeError) as error:
            logger.debug("soundfile cannot read %s (%s); trying PyAV", path, error)
        else:
            return _finish_audio(samples, rate, subject)
    samples, rate = _read_with_av(path, subject)
    return _finish_audio(samples, rate, subject)


def _check_wav_header(path: Path, subject: str) -> None:
    """Refuse a RIFF WAV whose header promises too long a sound, or more data than the file holds.

    libsndfile trusts the file over the header and quietly returns whatever is there, so a cut
    download would otherwise load as a shorter sound.
    """
    size = path.stat().st_size
    block_align = rate = 0
    with path.open("rb") as file:
        if file.read(12)[:4] != b"RIFF":
            return  # RF64 / BW64 keep 64-bit sizes elsewhere; soundfile checks those
        while len(chunk := file.read(8)) == 8:
            chunk_id, chunk_size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if chunk_id == b"fmt ":
                body = file.read(chunk_size + chunk_size % 2)
                if len(body) >= 16:
                    _, _, rate, _, block_align, _ = struct.unpack("<HHIIHH", body[:16])
            elif chunk_id == b"data":
                if not (rate and block_align):
                    break
                if chunk_size in (0, 0xFFFFFFFF):
                    return  # written by a streaming encoder that never filled in the size
                seconds = chunk_size // block_align / rate
                if seconds > MAX_AUDIO_SECONDS:
                    raise _too_long(subject, seconds, MAX_AUDIO_SECONDS, " (from its header)")
                held = size - file.tell()
                if chunk_size - held >= block_align:
                    raise MediaError(
                        f"{subject} is truncated: its header promises {_duration_text(seconds)} but the "
                        f"file holds {_duration_text(max(held, 0) // block_align / rate)}; "
                        "re-export or re-copy it"
                    )
                return
            else:
                file.seek(chunk_size + chunk_size % 2, os.SEEK_CUR)
    raise MediaError(
        f"{subject} is truncated or corrupt: its WAV header has no complete 'fmt ' and 'data' chunks; "
        "re-export or re-copy it"
    )


def _read_with_soundfile(path: Path, subject: str) -> tuple[np.ndarray, int]:
    with soundfile.SoundFile(str(path)) as file:
        rate = file.samplerate
        limit = int(MAX_AUDIO_SECONDS * rate)
        if file.frames > limit:
            raise _too_long(subject, file.frames / rate, MAX_AUDIO_SECONDS, " (from its header)")
        # Read one frame past the limit so a header that lies about the length cannot slip through.
        block = file.read(frames=limit + 1, dtype="float32", always_2d=True)
    if len(block) > limit:
        raise _too_long(subject, len(block) / rate, MAX_AUDIO_SECONDS)
    return block.mean(axis=1), rate


def _open_av(path: Path, subject: str) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise MediaError(
            f"{subject} cannot be opened ({_ffmpeg_reason(error)}); it may be corrupt or cut short; "
            "re-export or re-copy it"
        ) from error


def _stream_seconds(stream: av.stream.Stream, container: av.container.InputContainer | None) -> float | None:
    """Duration from the stream's (or else the container's) metadata, or None when they do not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container is not None and container.duration is not None:
        return container.duration / av.time_base
    return None


class _MonoCollector:
    """Decoded audio frames gathered as one mono float32 signal, refusing more than `limit_seconds`.

    `duration` (from the stream's metadata) trims the encoder's padding off the last frame.
    """

    def __init__(self, subject: str, limit_seconds: float, duration: float | None = None) -> None:
        self.subject, self.limit_seconds, self.duration = subject, limit_seconds, duration
        self.resampler = av.AudioResampler(format="fltp")  # planar float, same layout and rate
        self.chunks: list[np.ndarray] = []
        self.n_samples = 0
        self.rate = 0

    def add(self, frame: av.AudioFrame | None) -> None:
        for planar in self.resampler.resample(frame):
            self.rate = self.rate or planar.sample_rate
            chunk = planar.to_ndarray().mean(axis=0)  # [channels, samples] -> mono
            self.chunks.append(chunk)
            self.n_samples += len(chunk)
            if self.n_samples > self.limit_seconds * self.rate:
                raise _too_long(self.subject, self.n_samples / self.rate, self.limit_seconds)

    def samples(self) -> np.ndarray:
        self.add(None)  # flush the resampler
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        if self.duration:
            samples = samples[: max(1, round(self.duration * self.rate))]
        return samples


def _read_with_av(path: Path, subject: str) -> tuple[np.ndarray, int]:
    with _open_av(path, subject) as container:
        if not container.streams.audio:
            raise MediaError(f"{subject} has no audio stream; pass a file with sound in it")
        stream = container.streams.audio[0]
        seconds = _stream_seconds(stream, container)
        if seconds is not None and seconds > MAX_AUDIO_SECONDS:
            raise _too_long(subject, seconds, MAX_AUDIO_SECONDS, " (from its metadata)")
        collector = _MonoCollector(subject, MAX_AUDIO_SECONDS, seconds)
        try:
            for frame in container.decode(stream):
                collector.add(frame)
            samples = collector.samples()
        except av.FFmpegError as error:
            raise MediaError(
                f"{subject} cannot be decoded ({_ffmpeg_reason(error)}); it is cut short or corrupt; "
                "re-export it (e.g. as WAV)"
            ) from error
    return samples, collector.rate or stream.rate


# --- images --------------------------------------------------------------------------------------


def load_image(source: Any, *, name: str | None = None) -> Image.Image:
    """Load an image as an RGB `PIL.Image.Image`.

    `source` is a file path, a PIL image, or a uint8 array [H, W], [H, W, 1], [H, W, 3] or
    [H, W, 4]. The size is checked against `MAX_IMAGE_PIXELS` from the header, before decoding.
    EXIF rotation is applied, transparency is composited onto white, and of an animated image the
    first frame is kept. `name` is how error messages call the item (e.g. "image item 1").
    """
    subject = _subject("image", source, name)
    if isinstance(source, Image.Image):
        _check_image_size(source.size, subject)
        with _image_errors(subject, "an image"):
            return _to_rgb(source)
    if isinstance(source, np.ndarray):
        return _image_from_array(source, subject)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"{subject} has type {type(source).__name__}; pass a file path, a PIL image "
            "or a uint8 array [H, W, 3]"
        )
    label = _label(source, name)
    path = _check_file(source, max_bytes=MAX_FILE_BYTES, label=label)
    kind, fmt = _sniff(path, label, expect="image")
    if kind != "image":
        _refuse_other_kind(kind, fmt, "image", label)
    with _image_errors(subject, f"{fmt} data"), warnings.catch_warnings():
        # Pillow warns between its own limit and twice that; ours is lower and checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:  # reads the header only
            _check_image_size(image.size, subject)
            image.load()
            return _to_rgb(image)


@contextmanager
def _image_errors(subject: str, what: str) -> Iterator[None]:
    """Turn Pillow's errors while opening or decoding into MediaErrors."""
    try:
        yield
    except MediaError:
        raise
    except Image.DecompressionBombError as error:  # Pillow's own cap, hit while reading the header
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise _too_big(subject, int(pixels.group(1)) if pixels else None) from error
    except (OSError, SyntaxError, ValueError, struct.error, EOFError) as error:
        reason = "is truncated" if "truncated" in str(error) else f"cannot be decoded as {what} ({error})"
        raise MediaError(
            f"{subject} {reason}; it may be corrupt or cut short; re-export or re-copy it"
        ) from error


def _too_big(subject: str, pixels: int | None, size: tuple[int, int] | None = None) -> MediaError:
    shape = f"{size[0]}×{size[1]} = " if size else ""
    amount = f"{shape}{pixels / 1e6:.1f} megapixels" if pixels else "more pixels than Pillow allows"
    return MediaError(
        f"{subject} is {amount} (from its header); the limit is {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels; "
        "downscale it first"
    )


def _check_image_size(size: tuple[int, int], subject: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise MediaError(
            f"{subject} is {width}×{height}, which has no pixels; pass a picture that is not empty"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_big(subject, width * height, size)


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image: EXIF rotation applied, transparency composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _image_from_array(array: np.ndarray, subject: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise MediaError(
            f"{subject} has dtype {array.dtype}; pass uint8 values 0-255 "
            "(for floats in [0, 1]: (array * 255).round().astype(np.uint8))"
        )
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        raise MediaError(
            f"{subject} has shape {array.shape}, channels first; pass [H, W, 3] (array.transpose(1, 2, 0))"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise MediaError(f"{subject} has shape {array.shape}; pass [H, W, 3], [H, W, 4] or [H, W]")
    _check_image_size((array.shape[1], array.shape[0]), subject)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(array)))


# --- video ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous; videos compare by identity
class Video:
    """A video sampled for Qwen3-Omni."""

    frames: np.ndarray  # [T, H, W, 3] uint8; T is even and at least 2
    fps: float  # rate of the sampled frames
    duration: float  # seconds of the source video
    audio: np.ndarray | None  # float32 mono at 16 kHz, or None when not asked for
    name: str  # how messages call it: the file name, or the name given


def load_video(
    source: str | os.PathLike,
    *,
    fps: float = 2.0,
    max_frames: int = MAX_VIDEO_FRAMES,
    with_audio: bool = False,
    name: str | None = None,
) -> Video:
    """Decode a video file with PyAV and sample its frames uniformly at `fps`.

    Each sampled frame is the source frame nearest to k / fps seconds after the first one; `fps`
    above the source's own rate is lowered to it. The frame count is made even and at least 2 by
    repeating the last frame (Qwen's temporal patch is 2). With `with_audio`, the first audio
    track comes back as float32 mono at 16 kHz. Refuses videos longer than `MAX_VIDEO_SECONDS` or
    giving more than `max_frames` frames, before decoding when the metadata says so.
    """
    label, subject = _label(source, name), _subject("video", source, name)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"{subject} has type {type(source).__name__}; pass a file path (str or pathlib.Path)"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{subject}: fps={fps!r}; pass a positive number of frames per second")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 2:
        raise MediaError(f"{subject}: max_frames={max_frames!r}; pass an integer of at least 2")
    max_frames -= max_frames % 2  # the count is made even, so an odd cap could not be met
    path = _check_file(source, max_bytes=MAX_FILE_BYTES, label=label)
    kind, fmt = _sniff(path, label, expect="video")
    if kind != "video":
        _refuse_other_kind(kind, fmt, "video", label)
    with _open_av(path, subject) as container:
        if not container.streams.video:
            if container.streams.audio:
                raise MediaError(f"{subject} has no video stream, only sound; use load_audio for it")
            raise MediaError(f"{subject} has no streams at all; it is empty or cut short; re-export it")
        video_stream = container.streams.video[0]
        video_stream.thread_type = "AUTO"
        streams = [video_stream]
        if with_audio:
            if not container.streams.audio:
                raise MediaError(f"{subject} has no audio track; turn off use_audio_in_video")
            streams.append(container.streams.audio[0])
        duration = _stream_seconds(video_stream, container)
        if duration is not None and duration > MAX_VIDEO_SECONDS:
            raise _too_long(subject, duration, MAX_VIDEO_SECONDS, " (from its metadata)")
        native = float(video_stream.average_rate or video_stream.guessed_rate or 0)
        rate = min(fps, native) if native > 0 else float(fps)
        if duration is not None:
            expected = math.ceil(duration * rate - 1e-6)
            if expected + expected % 2 > max_frames:
                raise _too_many_frames(subject, expected, rate, max_frames, duration)
        try:
            frames, last_time, audio = _decode_video(container, streams, rate, native, max_frames, subject)
        except av.FFmpegError as error:
            raise MediaError(
                f"{subject} cannot be decoded ({_ffmpeg_reason(error)}); it is cut short or corrupt; "
                "re-export it (e.g. as H.264 MP4)"
            ) from error
    if not frames:
        raise MediaError(f"{subject} has no frames; it is empty or corrupt; re-export it")
    promised = _stream_seconds(video_stream, None)
    if promised is not None and promised - last_time > max(0.5, 0.05 * promised) + 1 / (native or rate):
        # A cut download keeps its metadata but loses the tail: the demuxer just stops early.
        raise MediaError(
            f"{subject} is truncated: its metadata promises {_duration_text(promised)} of video but "
            f"frames stop at {_duration_text(last_time)}; re-export or re-copy it"
        )
    if duration is None:
        duration = last_time + (1 / native if native > 0 else 0.0)
    frames += [frames[-1]] * (1 if len(frames) % 2 else 0)
    frames += [frames[-1]] * max(0, 2 - len(frames))
    sound = None
    if audio is not None:
        if not audio.n_samples:
            raise MediaError(f"{subject} has an audio track with no sound in it; turn off use_audio_in_video")
        sound = _finish_audio(audio.samples(), audio.rate, f"the audio track of {subject}")
    return Video(
        frames=np.stack(frames),
        fps=float(rate),
        duration=float(duration),
        audio=sound,
        name=name if name is not None else path.name,
    )


def _too_many_frames(subject: str, count: int, rate: float, max_frames: int, duration: float) -> MediaError:
    lower = math.floor(max_frames / duration * 100) / 100 if duration > 0 else rate / 2
    return MediaError(
        f"{subject} gives {count} frames at fps={rate:g}; the limit is {max_frames} (max_frames); "
        f"lower fps (e.g. fps={lower:g}) or trim the video"
    )


def _decode_video(
    container: av.container.InputContainer,
    streams: list[av.stream.Stream],
    rate: float,
    native: float,
    max_frames: int,
    subject: str,
) -> tuple[list[np.ndarray], float, _MonoCollector | None]:
    """One pass over the file: the frames nearest to each k / rate, and the audio when asked."""
    audio = None
    if len(streams) > 1:
        audio = _MonoCollector(subject, MAX_AUDIO_SECONDS, _stream_seconds(streams[1], container))
    picked: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    start = previous = previous_time = None
    index = 0
    t = 0.0

    def keep(frame: av.VideoFrame) -> None:
        nonlocal size
        size = size or (frame.width, frame.height)
        picked.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
        if len(picked) > max_frames:
            raise _too_many_frames(subject, len(picked), rate, max_frames, t)

    for packet in container.demux(*streams):
        for frame in packet.decode():
            if isinstance(frame, av.AudioFrame):
                audio.add(frame)
                continue
            t = frame.time if frame.time is not None else index / (native or rate)
            start = t if start is None else start
            t -= start
            if t > MAX_VIDEO_SECONDS:
                raise _too_long(subject, t, MAX_VIDEO_SECONDS)
            while len(picked) / rate <= t + 1e-9:
                target = len(picked) / rate
                nearer_previous = previous is not None and target - previous_time < t - target
                keep(previous if nearer_previous else frame)
            previous, previous_time, index = frame, t, index + 1
    return picked, t, audio
