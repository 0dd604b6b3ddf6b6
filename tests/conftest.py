"""Session-wide fixtures: the tiny model is built once; no test touches the network."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def tiny():
    """The embedded default, built once per session (random weights, seed 0)."""
    import omnilab

    return omnilab.load("tiny")


@pytest.fixture(scope="session")
def all_media_conversation():
    return [
        {"role": "system", "content": "You are Qwen."},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": str(DATA / "speech.wav")},
                {"type": "image", "image": str(DATA / "image.png")},
                {"type": "video", "video": str(DATA / "video.mp4")},
                {"type": "text", "text": "What do you hear and see?"},
            ],
        },
    ]


CHROMIUM = "/usr/bin/chromium"  # Debian's; never `playwright install`


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium through Playwright. A missing chromium fails (the README installs it): the
    browser tests must never pass by being skipped."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"Debian's chromium is not at {CHROMIUM}: apt-get install chromium (see README)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            yield chromium
        finally:
            chromium.close()
