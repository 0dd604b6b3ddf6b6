"""`python -m apps.demo` (and `omnilab demo`, which execs it): serve the demo until stopped.

Everything the server writes lives in one folder of its own, `<temp>/omnilab-demo-<pid>/`: Gradio's
uploads, cache and example copies in `gradio/`, every other temporary file (the sessions' downloads,
the examples' sources, ffmpeg's files) in `tmp/`. A clean stop (Ctrl-C, SIGINT, SIGTERM) removes it;
a killed server's folder is removed when the next server starts. Gradio reads its folder when it is
first imported, so nothing here imports it (or omnilab) before the folder is set.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

log = logging.getLogger("omnilab.app")

DEFAULT_MODEL = "organism"  # what `make demo` serves: the trained toy, which answers its examples
DEFAULT_PORT = 7860
MAX_UPLOAD_MB = 200
FOLDER_PREFIX = "omnilab-demo-"


def parser(prog: str = "python -m apps.demo") -> argparse.ArgumentParser:
    """The demo's command line (`omnilab demo` declares the same flags and passes them on)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="The omnilab demo: chat with a Qwen3-Omni model and watch its instruments."
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="the model to serve: organism (the trained toy; default), tiny or small (random weights), "
        "a hub id or a local checkpoint directory",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="the port on 127.0.0.1 (the app binds no other address)",
    )
    parser.add_argument(
        "--max-upload-mb", type=int, default=MAX_UPLOAD_MB, help="refuse uploads larger than this many MiB"
    )
    return parser


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_folders(root: Path) -> list[Path]:
    """Remove the folders in `root` of demo servers that have ended (killed ones too); returns them."""
    gone = []
    for folder in root.glob(f"{FOLDER_PREFIX}*"):
        pid = folder.name.removeprefix(FOLDER_PREFIX)
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def server_folder(root: str | Path | None = None) -> Path:
    """Make this server's folder in `root` (the temp folder) and point Gradio, `tempfile` and child
    processes into it (GRADIO_TEMP_DIR, TMPDIR, and MPLCONFIGDIR unless set); the folders of ended
    servers go first."""
    root = Path(root or tempfile.gettempdir())
    for folder in remove_stale_folders(root):
        log.info("removed the folder of an ended server: %s", folder)
    folder = root / f"{FOLDER_PREFIX}{os.getpid()}"
    for sub in ("gradio", "tmp"):
        (folder / sub).mkdir(parents=True)
    os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")
    os.environ["TMPDIR"] = str(folder / "tmp")
    os.environ.setdefault("MPLCONFIGDIR", str(folder / "tmp" / "matplotlib"))  # Gradio's Plot imports it
    tempfile.tempdir = str(folder / "tmp")
    return folder


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does: Gradio closes, the folder goes


def main(argv: list[str] | None = None) -> int:
    """Load the model, serve the app on 127.0.0.1, say when it is ready; on a clean stop, remove the folder."""
    started = time.monotonic()
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one line each
    folder = server_folder()
    remove = lambda: shutil.rmtree(folder, ignore_errors=True)  # noqa: E731
    atexit.register(remove)  # after the last worker thread is joined (a job may still be writing)
    signal.signal(signal.SIGTERM, _stop)
    app = None
    try:
        import omnilab

        from .layout import launch

        lab = omnilab.load(args.model)
        app = launch(lab=lab, port=args.port, max_file_size=args.max_upload_mb * 1024**2, prevent_thread_lock=True, quiet=True)  # fmt: skip
        url = app.local_url.rstrip("/")
        print(
            f"omnilab demo: {lab.model_id} ready at {url} in {time.monotonic() - started:.0f} s", flush=True
        )
        app.block_thread()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:
        pass
    finally:
        if app is not None:
            app.close()
        remove()
        log.info("stopped; removed %s", folder)
    return 0
