"""Shared pieces of the app tests: the test folder and environment, one tiny lab, a served app.

Imported by tests/test_app*.py (not a conftest: pytest does not load it by itself). Gradio and
gradio_client read their temp folders when they are first imported, so the tests import them only
inside fixtures, after `app_env` has pointed GRADIO_TEMP_DIR, TMPDIR and HOME at the test folder.

PYTEST_DONT_REWRITE (no assertions here; imported before pytest could rewrite it)
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import wave
import zlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # apps/ (the demo) lives beside omnilab/ and is not installed
DATA = ROOT / "data"
OUTPUT = ROOT / "test-output" / "app"
UPLOAD_LIMIT = 1024**2  # the served test app refuses uploads over 1 MiB
FAST = dict(max_new_tokens=6, max_speech_frames=6)
SERVED: dict = {}  # url -> the launched gr.Blocks, for tests that inspect its settings


def env_folder() -> Path:
    """This process's test folder for Gradio's files, temp files and HOME (those of ended runs go)."""
    folder = OUTPUT / f"env-{os.getpid()}"
    if not folder.exists():
        for old in OUTPUT.glob("env-*"):
            if not _alive(old.name.removeprefix("env-")):
                shutil.rmtree(old, ignore_errors=True)
    for sub in ("gradio", "tmp", "home"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return folder


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(scope="module")
def app_env():
    """GRADIO_TEMP_DIR, TMPDIR and HOME in the test folder, analytics off; restored after the module."""
    folder = env_folder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(folder / "gradio"))
        patch.setenv("TMPDIR", str(folder / "tmp"))
        patch.setenv("HOME", str(folder / "home"))
        patch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        patch.setattr(tempfile, "tempdir", str(folder / "tmp"))
        yield folder


@functools.cache
def shared_lab():
    """One tiny lab per test process (built in about a second; random weights, offline)."""
    import omnilab

    return omnilab.load("tiny")


@functools.cache
def shared_organism():
    """One organism lab per test process (the trained tiny model `make demo` serves)."""
    import omnilab

    return omnilab.load("organism")


def demo_module():
    """apps/demo/layout.py, the app's Blocks and launch (apps/ is beside omnilab/, not installed)."""
    from apps.demo import layout

    return layout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(app_env):
    """The demo on 127.0.0.1 at a free port, serving the shared tiny lab; yields its URL."""
    demo = demo_module()
    app = demo.launch(
        lab=shared_lab(), port=free_port(), max_file_size=UPLOAD_LIMIT, prevent_thread_lock=True, quiet=True
    )
    SERVED[app.local_url] = app
    try:
        yield app.local_url
    finally:
        SERVED.pop(app.local_url, None)
        app.close()


@pytest.fixture(scope="module")
def served_organism(app_env):
    """The demo on 127.0.0.1 at a free port, serving the shared organism (what `make demo` serves)."""
    demo = demo_module()
    app = demo.launch(
        lab=shared_organism(),
        port=free_port(),
        max_file_size=UPLOAD_LIMIT,
        prevent_thread_lock=True,
        quiet=True,
    )
    SERVED[app.local_url] = app
    try:
        yield app.local_url
    finally:
        SERVED.pop(app.local_url, None)
        app.close()


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=str(env_folder() / "downloads"))


def turn_args(
    text="",
    audio=None,
    image=None,
    video=None,
    *,
    video_audio=False,
    system="",
    voice="Ethan",
    speak=True,
    max_new_tokens=6,
    max_speech_frames=6,
    do_sample=False,
    temperature=0.7,
    top_p=0.8,
    top_k=20,
    seed=0,
    attention=True,
) -> list:
    """The inputs of /chat and /reply, in order."""
    return [
        text,
        audio,
        image,
        video,
        video_audio,
        system,
        voice,
        speak,
        max_new_tokens,
        max_speech_frames,
        do_sample,
        temperature,
        top_p,
        top_k,
        seed,
        attention,
    ]


# --- hostile files -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def make_hostile_files(folder: Path) -> dict[str, Path]:
    """Broken, lying and oversized media, by kind; made from the samples and ffmpeg's generators."""
    folder.mkdir(parents=True, exist_ok=True)
    speech, image, video = ((DATA / n).read_bytes() for n in ("speech.wav", "image.png", "video.mp4"))
    files = {
        "corrupt.wav": b"RIFF" + struct.pack("<I", 1000) + b"WAVE" + bytes(range(256)) * 2,
        "truncated.wav": speech[: len(speech) // 3],
        "text-named.wav": b"hello, I am a text file\n",
        "zero-length.wav": b"",
        "truncated.png": image[: len(image) // 2],
        "html-named.png": b"<html><body>not an image</body></html>",
        "truncated.mp4": video[: len(video) // 2],
        "text-named.mp4": b"just text\n",
        "oversized.wav": speech[:44] + bytes(UPLOAD_LIMIT + 1024),
        "huge-header.png": b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b""),
    }
    paths = {}
    for name, content in files.items():
        (folder / name).write_bytes(content)
        paths[name] = folder / name
    with wave.open(str(folder / "no-samples.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(b"")
    paths["no-samples.wav"] = folder / "no-samples.wav"
    made = {
        "no-frames.mp4": (
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=10",
            "-frames:v",
            "0",
            "-c:v",
            "libx264",
        ),
        "sound-only.mp4": ("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "1", "-c:a", "aac"),
        "silent.mp4": (
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=64x48:rate=10",
            "-t",
            "1",
            "-an",
            "-c:v",
            "libx264",
        ),
        "41-min.flac": ("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "2460", "-c:a", "flac"),
        "41-min.mp4": (
            "-f",
            "lavfi",
            "-i",
            "color=size=16x16:rate=1",
            "-t",
            "2460",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ),
    }
    for name, args in made.items():
        _ffmpeg(*args, str(folder / name))
        paths[name] = folder / name
    return paths
