"""The served demo as a separate process, under a memory limit the tests enforce: a long message, eight
clients at once, and a kill in the middle of a turn.

Each server is `python -m apps.demo --model tiny` on 127.0.0.1, watched by a thread that samples its
resident memory and kills it past MEMORY_LIMIT (the test then fails, saying so). Slow: CI runs them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import soundfile
from conftest_app import DATA, ROOT, client, free_port

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("app_env")]

MEMORY_LIMIT = 6 * 1024**3
PROSE = "The quick brown fox jumps over the lazy dog while the band plays a slow song. "
LONG = (PROSE * (10_000 // len(PROSE) + 1))[:10_000]  # the message box's limit, about 2,200 tokens
FAST = dict(max_new_tokens=8, max_speech_frames=6)


class Server:
    """`python -m apps.demo --model tiny` on a free port, its memory watched (killed past the limit)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = {
            **os.environ,
            "GRADIO_TEMP_DIR": str(folder / "gradio"),
            "TMPDIR": str(folder / "tmp"),
            "HOME": str(folder / "home"),
            "PYTHONPATH": str(ROOT),
        }
        self.log = open(folder / f"server-{self.port}.log", "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "apps.demo", "--model", "tiny", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.peak, self.over, self._stop = 0, False, threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()
        self._wait_until_serving()

    def _watch(self) -> None:
        watched = psutil.Process(self.process.pid)
        while not self._stop.is_set() and self.process.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                rss = watched.memory_info().rss + sum(
                    c.memory_info().rss for c in watched.children(recursive=True)
                )
                self.peak = max(self.peak, rss)
                if rss > MEMORY_LIMIT:
                    self.over = True
                    self.process.kill()
            time.sleep(0.05)

    def _wait_until_serving(self, seconds: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.tail()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}config", timeout=5).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"the server did not start in {seconds} s\n{self.tail()}")

    def tail(self) -> str:
        self.log.flush()
        return (self.folder / f"server-{self.port}.log").read_text()[-3000:]

    def alive(self) -> bool:
        return self.process.poll() is None and not self.over

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self._stop.set()
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(app_env):
    running = Server(app_env)
    yield running
    running.stop()
    assert not running.over, (
        f"the server passed {MEMORY_LIMIT / 1024**3:.0f} GB (peak {running.peak / 1e9:.1f} GB)"
    )


def _clear(message: str) -> bool:
    """A refusal a person can act on: words, no traceback, not Gradio's empty error."""
    return len(message) > 20 and "Traceback" not in message and message.strip() not in ("None", "null")


def test_a_10000_character_message_with_default_settings_completes_under_6_gb(server):
    from gradio_client.exceptions import AppError

    script = client(server.url)
    try:  # every setting but the text: the app's default
        text, wav, chat = script.predict(text=LONG, api_name="/reply")
    except AppError as refusal:
        assert _clear(str(refusal)), str(refusal)
    except Exception as lost:  # the server went away mid-turn
        raise AssertionError(
            f"no answer ({lost!r}); peak {server.peak / 1e9:.1f} GB, over: {server.over}"
        ) from None
    else:
        assert chat[0]["content"][0]["text"] == LONG and chat[-1]["role"] == "assistant"
        # Attention is recorded at a cost linear in the prompt: this turn fits the budget and has it.
        heatmap = script.predict(None, api_name="/attention")[0]["plot"]
        assert "attention was not recorded" not in heatmap and '"heatmap"' in heatmap
    assert server.alive(), f"peak {server.peak / 1e9:.1f} GB\n{server.tail()}"
    assert server.peak < MEMORY_LIMIT
    text, _, chat = script.predict(text="and a short one", speak=False, **FAST, api_name="/reply")
    assert text is not None and chat[-2]["content"][0]["text"] == "and a short one"
    script.close()


def _turn(number: int, turn: int) -> dict:
    """What client `number` sends at `turn`: long text, speech, an image or a short question (attention on)."""
    from gradio_client import handle_file

    marker = f"client {number} turn {turn}"
    kind = (number + turn) % 4
    if kind == 0 and turn == 0:
        return dict(text=f"{marker}: {LONG}"[:10_000], **FAST)
    if kind == 1:
        return dict(text=marker, audio=handle_file(str(DATA / "speech.wav")), **FAST)
    if kind == 2:
        return dict(text=marker, image=handle_file(str(DATA / "image.png")), **FAST)
    return dict(text=f"{marker}: what comes next?", **FAST)


def test_eight_clients_three_turns_each_are_answered_apart_under_6_gb(server):
    from gradio_client.exceptions import AppError

    outcomes: dict[int, list] = {n: [] for n in range(8)}

    def run(number: int) -> None:
        own = client(server.url)
        try:
            for turn in range(3):  # bounded: three turns, then the client stops
                try:
                    _, _, chat = own.predict(**_turn(number, turn), record_attention=True, api_name="/reply")
                    outcomes[number].append(("answered", turn, chat))
                except AppError as refusal:
                    outcomes[number].append(("refused", turn, str(refusal)))
        finally:
            own.close()

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a client did not finish in 10 min"
    answered = 0
    for number, results in outcomes.items():
        assert len(results) == 3, (number, results)
        asked = []
        for status, turn, value in results:
            if status == "refused":
                assert _clear(value), (number, turn, value)
                continue
            answered += 1
            asked.append(f"client {number} turn {turn}")
            users = [m["content"][0]["text"] for m in value if m["role"] == "user"]
            assert len(users) == len(asked) and len(value) == 2 * len(asked), (number, turn, users)
            for said, marker in zip(users, asked, strict=True):
                assert said.startswith(marker) or marker in said, (
                    number,
                    turn,
                    said,
                )  # its own, no one else's
    assert answered >= 20, outcomes  # refusals are the exception (e.g. a full queue), not the rule
    assert server.alive(), f"peak {server.peak / 1e9:.1f} GB\n{server.tail()}"
    after = client(server.url)
    assert after.predict(text="still there?", speak=False, **FAST, api_name="/reply")[0] is not None
    after.close()


def _check_downloads(folder: Path) -> int:
    """Every download under its final name is whole (partial ones only under .partial- names); how many."""
    from apps.demo.panels import PARTIAL

    whole = 0
    for path in folder.rglob("*"):
        if not path.is_file() or PARTIAL in str(path.relative_to(folder)):
            continue
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None and archive.namelist(), path
        elif path.suffix == ".wav":
            audio, _ = soundfile.read(path)
            assert len(audio) > 0, path
        elif path.suffix == ".html":
            assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), path
        whole += 1
    return whole


def test_a_server_killed_mid_turn_restarts_and_leaves_no_half_written_download(app_env):
    from gradio_client.exceptions import AppError

    first = Server(app_env)
    killed_pid = first.process.pid
    writer, talker = client(first.url), client(first.url)
    writer.predict(text="make some files", **FAST, api_name="/reply")
    stop = threading.Event()
    downloaded = threading.Event()  # a download round trip finished: the server has files to lose

    def download_until_killed() -> None:
        with contextlib.suppress(Exception):
            while not stop.is_set():
                writer.predict(api_name="/trace_zip")
                writer.predict("thinker", 0, None, api_name="/figures_html")
                downloaded.set()

    threading.Thread(target=download_until_killed, daemon=True).start()
    job = talker.submit(
        text="a long answer, please", max_new_tokens=400, max_speech_frames=200, api_name="/reply"
    )
    # Kill once the long turn is running (and not done) and the downloads have written files.
    assert downloaded.wait(timeout=120), "no download finished before the kill"
    deadline = time.monotonic() + 60
    while job.status().code.name != "PROCESSING" and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the condition, not timing the kill
    assert job.status().code.name == "PROCESSING" and not job.done(), job.status()
    first.stop(signal.SIGKILL)
    stop.set()
    with contextlib.suppress(AppError, Exception):
        job.result(timeout=30)
    writer.close(), talker.close()
    folder = app_env / "tmp" / f"omnilab-demo-{killed_pid}"  # everything the server wrote
    outputs = folder / "tmp" / "omnilab-app" / f"pid-{killed_pid}"
    assert outputs.is_dir() and _check_downloads(outputs) > 0  # the kill found whole files only

    second = Server(app_env)
    try:
        assert not folder.exists()  # the killed server's files (and any partial download) are gone
        script = client(second.url)
        text, wav, chat = script.predict(text="are you back?", **FAST, api_name="/reply")
        assert text is not None and soundfile.read(wav)[1] == 24_000
        assert _check_downloads(app_env / "tmp" / f"omnilab-demo-{second.process.pid}") > 0
        script.close()
    finally:
        second.stop()
