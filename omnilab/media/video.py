"""Load videos with PyAV: frames sampled uniformly at `fps`, and the audio track when asked for."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import av
import numpy as np

from omnilab.errors import MediaError

from . import limits
from .audio import MonoCollector, finish_audio, open_av, stream_seconds, too_long
from .files import check_media, duration_text, ffmpeg_reason, label_of, subject_of


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
    max_frames: int = limits.MAX_VIDEO_FRAMES,
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
    label, subject = label_of(source, name), subject_of("video", source, name)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(
            f"{subject} has type {type(source).__name__}; pass a file path (str or pathlib.Path)"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{subject}: fps={fps!r}; pass a positive number of frames per second")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 2:
        raise MediaError(f"{subject}: max_frames={max_frames!r}; pass an integer of at least 2")
    max_frames -= max_frames % 2  # the count is made even, so an odd cap could not be met
    path, _ = check_media(source, label, "video")
    with open_av(path, subject) as container:
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
        # Every stream attribute is read while the container is open: PyAV 18 refuses them after.
        duration = stream_seconds(video_stream, container)
        promised = stream_seconds(video_stream, None)
        if duration is not None and duration > limits.MAX_VIDEO_SECONDS:
            raise too_long(subject, duration, limits.MAX_VIDEO_SECONDS, " (from its metadata)")
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
                f"{subject} cannot be decoded ({ffmpeg_reason(error)}); it is cut short or corrupt; "
                "re-export it (e.g. as H.264 MP4)"
            ) from error
    if not frames:
        raise MediaError(f"{subject} has no frames; it is empty or corrupt; re-export it")
    if promised is not None and promised - last_time > max(0.5, 0.05 * promised) + 1 / (native or rate):
        # A cut download keeps its metadata but loses the tail: the demuxer just stops early.
        raise MediaError(
            f"{subject} is truncated: its metadata promises {duration_text(promised)} of video but "
            f"frames stop at {duration_text(last_time)}; re-export or re-copy it"
        )
    if duration is None:
        duration = last_time + (1 / native if native > 0 else 0.0)
    frames += [frames[-1]] * (1 if len(frames) % 2 else 0)
    frames += [frames[-1]] * max(0, 2 - len(frames))
    sound = None
    if audio is not None:
        if not audio.n_samples:
            raise MediaError(f"{subject} has an audio track with no sound in it; turn off use_audio_in_video")
        sound = finish_audio(audio.samples(), audio.rate, f"the audio track of {subject}")
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
) -> tuple[list[np.ndarray], float, MonoCollector | None]:
    """One pass over the file: the frames nearest to each k / rate, and the audio when asked."""
    audio = None
    if len(streams) > 1:
        audio = MonoCollector(subject, limits.MAX_AUDIO_SECONDS, stream_seconds(streams[1], container))
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
            if t > limits.MAX_VIDEO_SECONDS:
                raise too_long(subject, t, limits.MAX_VIDEO_SECONDS)
            while len(picked) / rate <= t + 1e-9:
                target = len(picked) / rate
                nearer_previous = previous is not None and target - previous_time < t - target
                keep(previous if nearer_previous else frame)
            previous, previous_time, index = frame, t, index + 1
    return picked, t, audio
