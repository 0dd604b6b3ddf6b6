"""Load audio as float32 mono at 16 kHz from files (soundfile, else PyAV) or arrays; the PyAV helpers."""

from __future__ import annotations

import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile
import soxr

from omnilab.errors import MediaError

from . import limits
from .files import check_media, duration_text, ffmpeg_reason, label_of, subject_of

logger = logging.getLogger(__name__)

# Audio at most this far over full scale is clipped (decoders overshoot a little); beyond it the
# samples are almost surely on the wrong scale (int16 values stored as floats) and are refused.
_MAX_AUDIO_PEAK = 2.0
# A 2-D audio array's channel axis is the short one, and no longer than this.
_MAX_CHANNELS = 32
_SOUNDFILE_FORMATS = {"WAV", "FLAC", "OGG", "AIFF"}


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
                f"{subject_of('audio', source, name)}: sample_rate= is for arrays; "
                "a file carries its own rate, so leave sample_rate out"
            )
        return _load_audio_file(source, name)
    subject = subject_of("audio", source, name)
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
    if seconds > limits.MAX_AUDIO_SECONDS:
        raise too_long(subject, seconds, limits.MAX_AUDIO_SECONDS)
    return finish_audio(samples, rate, subject)


def too_long(subject: str, seconds: float, limit: float, origin: str = "") -> MediaError:
    return MediaError(
        f"{subject} is {duration_text(seconds)} long{origin}; the limit is {duration_text(limit)} "
        "(Qwen3-Omni's context); trim it or split it"
    )


def finish_audio(samples: np.ndarray, rate: float, subject: str) -> np.ndarray:
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
    if rate != limits.SAMPLE_RATE:
        # soxr at "HQ" is what librosa.resample(res_type="soxr_hq") runs, without librosa's
        # seconds-long import.
        samples = soxr.resample(samples, rate, limits.SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(np.clip(samples, -1.0, 1.0), dtype=np.float32)


def check_model_audio(
    samples: np.ndarray, source: Any, *, name: str | None = None, kind: str = "audio"
) -> None:
    """Refuse 16 kHz audio shorter than the model's feature extractor accepts (`MIN_AUDIO_SAMPLES`)."""
    if len(samples) < limits.MIN_AUDIO_SAMPLES:
        subject = subject_of(kind, source, name) + (" (its audio track)" if kind == "video" else "")
        raise MediaError(
            f"{subject} is {len(samples) / limits.SAMPLE_RATE * 1000:.1f} ms long ({len(samples)} samples at 16 kHz); "
            f"the shortest audio the model accepts is {limits.MIN_AUDIO_SAMPLES / limits.SAMPLE_RATE * 1000:.1f} ms "
            f"({limits.MIN_AUDIO_SAMPLES} samples); pass a longer recording"
        )


def _load_audio_file(source: str | os.PathLike, name: str | None) -> np.ndarray:
    subject = subject_of("audio", source, name)
    path, fmt = check_media(source, label_of(source, name), "audio", also="video")
    if fmt == "WAV":
        _check_wav_header(path, subject)
    if fmt in _SOUNDFILE_FORMATS:
        try:
            samples, rate = _read_with_soundfile(path, subject)
        except (soundfile.LibsndfileError, RuntimeError) as error:
            logger.debug("soundfile cannot read %s (%s); trying PyAV", path, error)
        else:
            return finish_audio(samples, rate, subject)
    samples, rate = _read_with_av(path, subject)
    return finish_audio(samples, rate, subject)


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
                if seconds > limits.MAX_AUDIO_SECONDS:
                    raise too_long(subject, seconds, limits.MAX_AUDIO_SECONDS, " (from its header)")
                held = size - file.tell()
                if chunk_size - held >= block_align:
                    raise MediaError(
                        f"{subject} is truncated: its header promises {duration_text(seconds)} but the "
                        f"file holds {duration_text(max(held, 0) // block_align / rate)}; "
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
        limit = int(limits.MAX_AUDIO_SECONDS * rate)
        if file.frames > limit:
            raise too_long(subject, file.frames / rate, limits.MAX_AUDIO_SECONDS, " (from its header)")
        # Read one frame past the limit so a header that lies about the length cannot slip through.
        block = file.read(frames=limit + 1, dtype="float32", always_2d=True)
    if len(block) > limit:
        raise too_long(subject, len(block) / rate, limits.MAX_AUDIO_SECONDS)
    return block.mean(axis=1), rate


def open_av(path: Path, subject: str) -> av.container.InputContainer:
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
        raise MediaError(
            f"{subject} cannot be opened ({ffmpeg_reason(error)}); it may be corrupt or cut short; "
            "re-export or re-copy it"
        ) from error


def stream_seconds(stream: av.stream.Stream, container: av.container.InputContainer | None) -> float | None:
    """Duration from the stream's (or else the container's) metadata, or None when they do not say."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container is not None and container.duration is not None:
        return container.duration / av.time_base
    return None


class MonoCollector:
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
                raise too_long(self.subject, self.n_samples / self.rate, self.limit_seconds)

    def samples(self) -> np.ndarray:
        self.add(None)  # flush the resampler
        samples = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        if self.duration:
            samples = samples[: max(1, round(self.duration * self.rate))]
        return samples


def _read_with_av(path: Path, subject: str) -> tuple[np.ndarray, int]:
    with open_av(path, subject) as container:
        if not container.streams.audio:
            raise MediaError(f"{subject} has no audio stream; pass a file with sound in it")
        stream = container.streams.audio[0]
        seconds = stream_seconds(stream, container)
        if seconds is not None and seconds > limits.MAX_AUDIO_SECONDS:
            raise too_long(subject, seconds, limits.MAX_AUDIO_SECONDS, " (from its metadata)")
        collector = MonoCollector(subject, limits.MAX_AUDIO_SECONDS, seconds)
        try:
            for frame in container.decode(stream):
                collector.add(frame)
            samples = collector.samples()
        except av.FFmpegError as error:
            raise MediaError(
                f"{subject} cannot be decoded ({ffmpeg_reason(error)}); it is cut short or corrupt; "
                "re-export it (e.g. as WAV)"
            ) from error
        # Read while the container is open: PyAV 18 refuses a closed container's stream attributes.
        rate = collector.rate or stream.rate
    return samples, rate
