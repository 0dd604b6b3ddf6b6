"""Specification of omnilab.media: what each loader returns, and the error each bad input gets."""

from __future__ import annotations

import shutil
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from omnilab import media
from omnilab.conversation import gather
from omnilab.errors import MediaError

DATA = Path(__file__).resolve().parents[1] / "data"
SPEECH, IMAGE, VIDEO = DATA / "speech.wav", DATA / "image.png", DATA / "video.mp4"


def _remux(source: Path, target: Path, kind: str) -> Path:
    """Copy one stream ("video" or "audio") of `source` into a new MP4, without re-encoding."""
    with av.open(str(source)) as inp, av.open(str(target), "w") as out:
        stream = inp.streams.video[0] if kind == "video" else inp.streams.audio[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.dts is not None:
                packet.stream = copy
                out.mux(packet)
    return target


@pytest.fixture(scope="session")
def silent_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample video without its audio track."""
    return _remux(VIDEO, tmp_path_factory.mktemp("media") / "silent.mp4", "video")


@pytest.fixture(scope="session")
def sound_only_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MP4 holding only the sample video's AAC track."""
    return _remux(VIDEO, tmp_path_factory.mktemp("media") / "sound.mp4", "audio")


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height`, with one tiny (wrong-sized) data chunk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _wav_header(*, rate: int, n_frames: int) -> bytes:
    """A 44-byte header of 16-bit mono PCM whose data chunk claims `n_frames` frames."""
    data_size = 2 * n_frames
    return (
        b"RIFF"
        + struct.pack("<I", 36 + data_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


# --- audio: what comes back -----------------------------------------------------------------------


def test_load_audio_reads_the_sample_speech_as_16khz_mono_float32_in_unit_range():
    audio = media.load_audio(SPEECH)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 3.0 < len(audio) / media.SAMPLE_RATE < 6.0
    assert np.abs(audio).max() <= 1.0
    assert np.abs(audio).max() > 0.1  # speech, not silence


def test_load_audio_resamples_a_44_1khz_stereo_array_to_16khz_mono():
    t = np.arange(44100) / 44100
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([left, right], axis=1)  # [samples, channels]
    audio = media.load_audio(stereo, sample_rate=44100)
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    assert np.abs(audio).max() == pytest.approx(0.3, abs=0.01)  # the mean of the two channels
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)  # 1 s of audio: bin k is k Hz


def test_load_audio_mixes_channels_first_arrays_the_same_as_channels_last():
    stereo = np.random.default_rng(0).uniform(-0.5, 0.5, size=(2, 8000)).astype(np.float32)
    first = media.load_audio(stereo, sample_rate=16000)
    last = media.load_audio(stereo.T, sample_rate=16000)
    np.testing.assert_allclose(first, stereo.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(first, last)


def test_load_audio_takes_the_rate_from_a_tuple_or_a_datasets_dict():
    samples = np.zeros(8000, dtype=np.float32)
    assert media.load_audio((samples, 8000)).shape == (16000,)
    assert media.load_audio({"array": samples, "sampling_rate": 8000, "path": None}).shape == (16000,)


def test_load_audio_scales_int16_arrays_into_unit_range():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(media.load_audio(pcm, sample_rate=16000), [0, 0.5, -1, 32767 / 32768])


def test_load_audio_decodes_mp3_through_pyav(tmp_path):
    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "tone.mp3", 0.5 * np.sin(2 * np.pi * 440 * t), 16000, format="MP3")
    audio = media.load_audio(tmp_path / "tone.mp3")
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) < 2000


def test_load_audio_takes_the_sound_track_of_a_video():
    audio = media.load_audio(VIDEO)
    assert audio.shape == (2 * media.SAMPLE_RATE,)  # the track's own duration, without codec padding


# --- audio: what is refused -----------------------------------------------------------------------


def test_load_audio_refuses_a_missing_file():
    with pytest.raises(MediaError, match=r"'nowhere\.wav' does not exist"):
        media.load_audio("nowhere.wav")


def test_load_audio_refuses_a_directory(tmp_path):
    with pytest.raises(MediaError, match=r"is a directory, not a file"):
        media.load_audio(tmp_path)


def test_load_audio_refuses_a_text_file_named_wav(tmp_path):
    (tmp_path / "notes.wav").write_text("these are my notes, not a recording\n")
    with pytest.raises(MediaError, match=r"'notes\.wav' is not audio: its content is plain text"):
        media.load_audio(tmp_path / "notes.wav")


def test_load_audio_refuses_an_html_page_saved_as_mp3(tmp_path):
    (tmp_path / "song.mp3").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    with pytest.raises(MediaError, match=r"'song\.mp3' is not audio: its content is an HTML page"):
        media.load_audio(tmp_path / "song.mp3")


def test_load_audio_refuses_a_truncated_wav(tmp_path):
    content = SPEECH.read_bytes()
    (tmp_path / "cut.wav").write_bytes(content[: len(content) // 3])
    with pytest.raises(MediaError, match=r"audio 'cut\.wav' is truncated: its header promises 4\.70 s"):
        media.load_audio(tmp_path / "cut.wav")


def test_load_audio_refuses_a_wav_with_no_samples(tmp_path):
    soundfile.write(tmp_path / "silence.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(MediaError, match=r"audio 'silence\.wav' holds no samples"):
        media.load_audio(tmp_path / "silence.wav")


def test_load_audio_refuses_an_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(MediaError, match=r"'empty\.wav' is empty \(0 bytes\)"):
        media.load_audio(tmp_path / "empty.wav")


def test_load_audio_refuses_nan_samples_in_an_array():
    samples = np.zeros(16000, dtype=np.float32)
    samples[8000] = np.nan
    with pytest.raises(
        MediaError, match=r"audio item 2 contains NaN or infinite samples \(the first at 0\.500 s\)"
    ):
        media.load_audio(samples, sample_rate=16000, name="audio item 2")


def test_load_audio_refuses_nan_samples_in_a_float_wav(tmp_path):
    samples = np.zeros(1600, dtype=np.float32)
    samples[-1] = np.inf
    soundfile.write(tmp_path / "bad.wav", samples, 16000, subtype="FLOAT")
    with pytest.raises(MediaError, match=r"audio 'bad\.wav' contains NaN or infinite samples"):
        media.load_audio(tmp_path / "bad.wav")


def test_load_audio_refuses_a_wav_whose_header_says_over_40_minutes(tmp_path):
    # The header claims 41 min at 16 kHz; the file holds 0.1 s, and is refused before decoding.
    n_frames = 41 * 60 * 16000
    (tmp_path / "talk.wav").write_bytes(_wav_header(rate=16000, n_frames=n_frames) + bytes(3200))
    with pytest.raises(
        MediaError, match=r"audio 'talk\.wav' is 41\.0 min long \(from its header\); the limit is 40\.0 min"
    ):
        media.load_audio(tmp_path / "talk.wav")


def test_load_audio_refuses_an_array_over_40_minutes():
    samples = np.zeros(41 * 60 * 100, dtype=np.float32)  # 41 min at 100 Hz: cheap to make
    with pytest.raises(
        MediaError,
        match=r"is 41\.0 min long; the limit is 40\.0 min \(Qwen3-Omni's context\); trim it or split it",
    ):
        media.load_audio(samples, sample_rate=100)


def test_load_audio_refuses_an_array_without_a_sample_rate():
    with pytest.raises(MediaError, match=r"the audio array has no sample rate; pass sample_rate="):
        media.load_audio(np.zeros(16000, dtype=np.float32))


def test_load_audio_refuses_float_samples_on_the_int16_scale():
    with pytest.raises(MediaError, match=r"peaks at 1\.2e\+04.*divide int16 values by 32768"):
        media.load_audio(np.full(100, 12000.0), sample_rate=16000)


def test_load_audio_refuses_an_image(tmp_path):
    shutil.copy(IMAGE, tmp_path / "voice.wav")
    with pytest.raises(
        MediaError, match=r"'voice\.wav' is not audio: its content is a PNG image; use load_image"
    ):
        media.load_audio(tmp_path / "voice.wav")


# --- images -----------------------------------------------------------------------------------------


def test_load_image_reads_the_sample_png_as_rgb():
    image = media.load_image(IMAGE)
    assert image.mode == "RGB" and image.size == (256, 192)


def test_load_image_accepts_a_uint8_array():
    array = np.zeros((4, 6, 3), dtype=np.uint8)
    array[..., 0] = 255
    image = media.load_image(array)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_load_image_puts_transparent_pixels_on_white():
    image = media.load_image(Image.new("RGBA", (3, 2), (10, 20, 30, 0)))
    assert image.mode == "RGB" and image.getpixel((1, 1)) == (255, 255, 255)


def test_load_image_refuses_a_header_claiming_30000_by_30000_without_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png(30000, 30000))  # 900 megapixels, in 70 bytes
    with pytest.raises(
        MediaError, match=r"image 'bomb\.png' is 900\.0 megapixels \(from its header\); the limit is 40\.0"
    ):
        media.load_image(tmp_path / "bomb.png")


def test_load_image_refuses_a_header_over_our_cap_but_under_pillows(tmp_path):
    (tmp_path / "big.png").write_bytes(_png(7000, 7000))  # 49 megapixels: Pillow alone would accept it
    with pytest.raises(MediaError, match=r"image 'big\.png' is 7000×7000 = 49\.0 megapixels"):
        media.load_image(tmp_path / "big.png")


def test_load_image_refuses_a_truncated_png(tmp_path):
    content = IMAGE.read_bytes()
    (tmp_path / "cut.png").write_bytes(content[: len(content) // 2])
    with pytest.raises(MediaError, match=r"image 'cut\.png' is truncated"):
        media.load_image(tmp_path / "cut.png")


def test_load_image_refuses_a_text_file_named_png(tmp_path):
    (tmp_path / "photo.png").write_text("not a picture")
    with pytest.raises(MediaError, match=r"'photo\.png' is not an image: its content is plain text"):
        media.load_image(tmp_path / "photo.png")


def test_load_image_refuses_an_image_with_no_pixels():
    with pytest.raises(MediaError, match=r"image item 1 is 0×0, which has no pixels"):
        media.load_image(Image.new("RGB", (0, 0)), name="image item 1")


def test_load_image_refuses_a_video():
    with pytest.raises(
        MediaError, match=r"'video\.mp4' is not an image: its content is an MP4 video; use load_video"
    ):
        media.load_image(VIDEO)


def test_load_image_refuses_a_float_array():
    with pytest.raises(MediaError, match=r"has dtype float64; pass uint8"):
        media.load_image(np.zeros((4, 4, 3)))


# --- video ------------------------------------------------------------------------------------------


def test_load_video_samples_the_sample_at_2_fps():
    video = media.load_video(VIDEO)
    assert video.frames.shape == (4, 120, 160, 3) and video.frames.dtype == np.uint8
    assert video.fps == 2.0 and video.duration == pytest.approx(2.0)
    assert video.audio is None and video.name == "video.mp4"


def test_load_video_repeats_the_last_frame_to_make_the_count_even():
    video = media.load_video(VIDEO, fps=1.5)  # frames at 0, 0.67, 1.33 s, then one more
    assert len(video.frames) == 4
    np.testing.assert_array_equal(video.frames[-1], video.frames[-2])
    assert not np.array_equal(video.frames[0], video.frames[1])


def test_load_video_gives_at_least_two_frames():
    assert len(media.load_video(VIDEO, fps=0.1).frames) == 2


def test_load_video_returns_16khz_mono_audio_when_asked():
    video = media.load_video(VIDEO, with_audio=True)
    assert video.audio.dtype == np.float32 and video.audio.shape == (2 * media.SAMPLE_RATE,)


def test_load_video_refuses_audio_when_the_video_has_no_audio_track(silent_video):
    assert len(media.load_video(silent_video).frames) == 4
    with pytest.raises(
        MediaError, match=r"video 'silent\.mp4' has no audio track; turn off use_audio_in_video"
    ):
        media.load_video(silent_video, with_audio=True)


def test_load_video_refuses_an_mp4_with_no_video_stream(sound_only_mp4):
    with pytest.raises(
        MediaError, match=r"video 'sound\.mp4' has no video stream, only sound; use load_audio"
    ):
        media.load_video(sound_only_mp4)


def test_load_video_refuses_an_mp4_cut_before_its_first_frame(tmp_path):
    (tmp_path / "cut.mp4").write_bytes(VIDEO.read_bytes()[:2000])  # the header survives, no frame does
    with pytest.raises(MediaError, match=r"video 'cut\.mp4' has no frames"):
        media.load_video(tmp_path / "cut.mp4")


def test_load_video_refuses_an_mp4_cut_in_the_middle(tmp_path):
    content = VIDEO.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(content[: len(content) // 2])
    with pytest.raises(MediaError, match=r"video 'cut\.mp4' is truncated: its metadata promises 2\.00 s"):
        media.load_video(tmp_path / "cut.mp4")


def test_load_video_refuses_a_corrupt_mp4(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(VIDEO.read_bytes()[:32] + bytes(range(256)) * 8)
    with pytest.raises(MediaError, match=r"video 'junk\.mp4' (cannot be opened|has no streams at all)"):
        media.load_video(tmp_path / "junk.mp4")


def test_load_video_refuses_more_frames_than_max_frames():
    with pytest.raises(
        MediaError, match=r"gives 4 frames at fps=2; the limit is 2 \(max_frames\); lower fps"
    ):
        media.load_video(VIDEO, max_frames=2)


def test_load_video_refuses_a_video_longer_than_the_limit(monkeypatch):
    monkeypatch.setattr(media, "MAX_VIDEO_SECONDS", 1)
    with pytest.raises(MediaError, match=r"video 'video\.mp4' is 2\.00 s long \(from its metadata\)"):
        media.load_video(VIDEO)


# --- content sniffing, files, sources ---------------------------------------------------------------


def test_sniff_judges_the_content_not_the_name(tmp_path):
    shutil.copy(IMAGE, tmp_path / "image.wav")
    assert media.sniff(tmp_path / "image.wav") == "image"
    assert (media.sniff(SPEECH), media.sniff(VIDEO)) == ("audio", "video")


def test_sniff_refuses_a_file_of_unknown_content(tmp_path):
    (tmp_path / "blob.bin").write_bytes(bytes(range(1, 64)))
    with pytest.raises(
        MediaError, match=r"'blob\.bin' is not audio, an image or a video: its content is unrecognised binary"
    ):
        media.sniff(tmp_path / "blob.bin")


def test_check_file_resolves_the_path():
    assert media.check_file(str(SPEECH)) == SPEECH


def test_check_file_refuses_a_file_over_max_bytes():
    with pytest.raises(MediaError, match=r"'speech\.wav' is 146\.9 KiB; the limit is 1\.0 KiB \(max_bytes\)"):
        media.check_file(SPEECH, max_bytes=1024)


@pytest.mark.parametrize("load", [media.load_audio, media.load_image, media.load_video])
def test_loaders_refuse_urls(load):
    with pytest.raises(
        MediaError, match=r"'https://example\.com/x' is a URL .*reads local files only; download it first"
    ):
        load("https://example.com/x")


@pytest.mark.parametrize("load", [media.load_audio, media.load_image, media.load_video])
def test_loaders_refuse_a_source_of_the_wrong_type(load):
    with pytest.raises(MediaError, match=r"has type int; pass a file path"):
        load(42)


def test_audio_shorter_than_the_feature_extractor_accepts_is_refused_naming_it(tmp_path):
    path = tmp_path / "one.wav"
    soundfile.write(path, np.array([0.1], dtype=np.float32), 16000)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}]}]
    with pytest.raises(MediaError, match=r"one\.wav is 0\.1 ms long \(1 samples at 16 kHz\); the shortest"):
        gather(conversation)
    # the bound counts samples after resampling to 16 kHz
    with pytest.raises(MediaError, match=r"109 samples at 16 kHz"):
        media.check_model_audio(media.load_audio((np.zeros(300, dtype=np.float32), 44_100)), "clip")


def test_the_shortest_accepted_audio_runs_through_the_model(tiny):
    shortest = np.full(media.MIN_AUDIO_SAMPLES, 0.1, dtype=np.float32)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": (shortest, 16000)}]}]
    assert tiny.forward(conversation).shape[1] > 0
    with pytest.raises(MediaError, match="the shortest audio the model accepts"):
        tiny.forward([{"role": "user", "content": [{"type": "audio", "audio": (shortest[:-1], 16000)}]}])


def test_load_video_names_a_cut_mp4_without_ffmpeg_errno(tmp_path):
    path = tmp_path / "cut.mp4"
    path.write_bytes(VIDEO.read_bytes()[:4000])
    with pytest.raises(MediaError) as error:
        media.load_video(path)
    message = str(error.value)
    assert message.startswith("video 'cut.mp4' ") and "cut short or corrupt" in message
    assert "Errno" not in message and "avcodec" not in message
