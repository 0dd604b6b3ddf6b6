"""The demo as a newcomer starts it: `omnilab demo --help` explains every flag, the server says in one
line which model is ready where, and a clean stop (SIGTERM, SIGINT) leaves none of its files behind."""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_app import ROOT, client, free_port

from apps.demo import serve

pytest_plugins = ["conftest_app"]  # app_env
pytestmark = pytest.mark.usefixtures("app_env")

READY = re.compile(r"^omnilab demo: (\S+) ready at (http://127\.0\.0\.1:\d+) in \d+ s$", re.M)


def _help(*command: str) -> dict[str, str]:
    """{flag: its help line} from a command's --help (argparse's layout)."""
    text = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    flags = {}
    for match in re.finditer(r"^  (--[a-z-]+)(?: [A-Z_]+)?\s*(.*(?:\n {10,}.*)*)", text, re.M):
        flags[match.group(1)] = " ".join(match.group(2).split())
    return flags


def test_omnilab_demo_help_explains_every_flag_as_the_app_does():
    cli, app = _help("-m", "omnilab.cli", "demo"), _help("-m", "apps.demo")
    assert set(cli) == set(app) == {"--model", "--port", "--max-upload-mb"}  # and -h, --help
    assert all(cli.values()) and cli == app, (cli, app)  # each flag has its help text, the same in both
    assert "organism" in cli["--model"] and "default" in cli["--model"]
    assert serve.parser().parse_args([]).model == "organism"  # what `make demo` serves


class Server:
    """`python -m apps.demo --model tiny` with TMPDIR and HOME in a test folder of its own."""

    def __init__(self, folder: Path, *command: str):
        self.temp, self.home = folder / "tmp", folder / "home"
        for path in (self.temp, self.home):
            path.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("GRADIO_TEMP_DIR", "MPLCONFIGDIR")}
        env.update(TMPDIR=str(self.temp), HOME=str(self.home), PYTHONPATH=str(ROOT))
        command = command or ("-m", "apps.demo")
        self.process = subprocess.Popen(
            [sys.executable, *command, "--model", "tiny", "--port", str(free_port())],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines = []
        for line in self.process.stdout:
            self.lines.append(line)
            if READY.match(line.strip()):
                self.model, self.url = READY.match(line.strip()).groups()
                return
        raise AssertionError("the server ended before it was ready:\n" + "".join(self.lines[-40:]))

    def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        self.lines += self.process.stdout.read().splitlines(keepends=True)
        return self.process.wait(timeout=120)

    def files(self) -> list[Path]:
        return sorted(p for root in (self.temp, self.home) for p in root.rglob("*"))


def test_a_server_stopped_by_sigterm_after_a_spoken_turn_and_a_download_leaves_nothing(app_env, tmp_path):
    server = Server(tmp_path)
    try:
        assert server.model == "omnilab/tiny"
        folder = server.temp / f"omnilab-demo-{server.process.pid}"
        script = client(server.url)
        text, wav, _ = script.predict(text="hello", max_new_tokens=4, max_speech_frames=4, api_name="/reply")
        zipped = script.predict(api_name="/trace_zip")
        script.close()
        assert Path(wav).stat().st_size > 44 and Path(zipped).stat().st_size > 0  # fetched copies
        written = [p for p in server.files() if p.is_file()]
        assert written and all(p.is_relative_to(folder) for p in written), written  # one folder
        assert {".wav", ".zip"} <= {p.suffix for p in written}
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, "".join(server.lines[-40:])
    assert server.files() == []


def test_omnilab_demo_stopped_by_sigint_leaves_nothing(app_env, tmp_path):
    server = Server(tmp_path, "-m", "omnilab.cli", "demo")
    assert server.url.startswith("http://127.0.0.1:")
    assert server.stop(signal.SIGINT) == 0, "".join(server.lines[-40:])
    # Only torch's per-user compile cache may stay: the `omnilab` command imports omnilab (and torch)
    # before it becomes the server, and torch makes it in TMPDIR unless its cache dir is set elsewhere
    # (so it is there or not depending on the environment); the server's own files are all gone.
    inductor = server.temp / f"torchinductor_{getpass.getuser()}"
    left = [p for p in server.files() if p != inductor and not p.is_relative_to(inductor)]
    assert left == [], left
