"""The notebooks in a real JupyterLab: a headless server on 127.0.0.1, Debian's chromium through
Playwright (never `playwright install`), every cell run, and the figures and the explorer drawn in the
page itself, not only in the kernel.

The notebooks are copied (with data/) into the test's folder, so JupyterLab's autosave never writes
outputs into the committed ones. Screenshots land in the test's tmp_path and in test-output/lab/.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
OUTPUT = ROOT / "test-output" / "lab"
START_TIMEOUT = 120  # seconds for the server to answer
RUN_TIMEOUT = 420  # seconds for one notebook's cells on a busy 2-core machine

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
]

# User settings for the test server: every cell stays in the DOM (no windowing), no news or update checks.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "checkForUpdates": False,
        "fetchNews": "false",
    },
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (localhost only)
        return response.read()


def _descendants(pid: int) -> list:
    import psutil  # installed with ipykernel

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _stop(server: subprocess.Popen, base: str, token: str) -> None:
    """Shut the kernels down through the API, then end the server's process group and every process
    it started (kernels run in sessions of their own, so the group alone does not reach them)."""
    import psutil

    children = _descendants(server.pid)
    try:
        kernels = json.loads(_get(f"{base}/api/kernels?token={token}"))
        for kernel in kernels:
            request = urllib.request.Request(
                f"{base}/api/kernels/{kernel['id']}?token={token}", method="DELETE"
            )
            urllib.request.urlopen(request, timeout=10).close()  # noqa: S310
    except (OSError, ValueError):
        pass  # the server is already gone or not answering; the signals below still end it
    try:
        os.killpg(server.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


@pytest.fixture(scope="module")
def jupyter_lab(tmp_path_factory):
    """A JupyterLab server over a copy of notebooks/ and data/; yields (base url, token, server log)."""
    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(
        NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns("runs", ".ipynb_checkpoints")
    )
    shutil.copytree(ROOT / "data", root / "data")
    settings = root / "settings"
    for name, values in SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    config = root / "jupyter_lab_config.py"
    config.write_text(
        "\n".join(
            [
                "c.ServerApp.ip = '127.0.0.1'",
                f"c.ServerApp.port = {port}",
                "c.ServerApp.port_retries = 0",
                "c.ServerApp.open_browser = False",
                "c.ServerApp.allow_root = True",  # CI containers run as root; harmless otherwise
                f"c.IdentityProvider.token = {token!r}",
                f"c.ServerApp.root_dir = {str(root / 'notebooks')!r}",
                "c.LabApp.news_url = None",
                "c.LabApp.check_for_updates_class = 'jupyterlab.handlers.announcements.NeverCheckForUpdate'",
                "c.LabApp.extension_manager = 'readonly'",
                "c.LabApp.expose_app_in_browser = True",
                f"c.LabApp.user_settings_dir = {str(settings)!r}",
                f"c.LabApp.workspaces_dir = {str(root / 'workspaces')!r}",
            ]
        )
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "JUPYTER_CONFIG_DIR": str(root / "config"),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "IPYTHONDIR": str(root / "ipython"),
    }
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", f"--config={config}"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if server.poll() is not None:
                pytest.fail(f"JupyterLab exited with {server.returncode}:\n{_tail(root / 'server.log')}")
            try:
                _get(f"{base}/api/status?token={token}")
                break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"JupyterLab did not answer in {START_TIMEOUT} s:\n{_tail(root / 'server.log')}"
                    )
                time.sleep(0.5)
        yield base, token, root / "server.log"
    finally:
        _stop(server, base, token)
        log.close()


MESSAGES: list[str] = []  # the current page's errors and console errors, quoted when a test fails


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# The notebook's state, read from JupyterLab's own model (window.jupyterapp): kernel status, each code
# cell's execution count, and the text of any error output.
STATE_JS = """
(name) => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.context || !panel.context.path.endsWith(name) || !panel.content) return null;
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const cells = panel.content.widgets.filter((cell) => cell.model.type === 'code');
  const errors = [];
  cells.forEach((cell, index) => {
    for (const output of cell.model.outputs.toJSON()) {
      if (output.output_type === 'error') {
        errors.push(`cell ${index}: ${output.ename}: ${output.evalue}\\n${(output.traceback || []).join('\\n')}`);
      }
    }
  });
  return {
    status: kernel ? kernel.status : 'none',
    counts: cells.map((cell) => cell.model.executionCount),
    errors: errors.map((text) => text.replace(/\\u001b\\[[0-9;]*m/g, '')),
  };
}
"""


def _state(page, name: str) -> dict | None:
    return page.evaluate(STATE_JS, name)


def _run_all(page, name: str) -> dict:
    """Run every cell as a person would (Run ▸ Run All Cells) and wait until all ran or one failed."""
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    deadline = time.monotonic() + RUN_TIMEOUT
    state = None
    while time.monotonic() < deadline:
        state = _state(page, name)
        if state and state["errors"]:
            break
        if state and state["status"] == "idle" and all(isinstance(c, int) for c in state["counts"]):
            break
        time.sleep(1.0)
    else:
        pytest.fail(f"{name}: cells did not finish in {RUN_TIMEOUT} s; last state {state}")
    return state


def _open(page, base: str, token: str, name: str):
    """Open `name` in a fresh workspace, wait for its kernel; returns the notebook panel's locator."""
    page.goto(f"{base}/lab/tree/{name}?reset&token={token}")
    page.wait_for_function(
        "(name) => { const app = window.jupyterapp; const panel = app && app.shell.currentWidget;"
        " return !!(panel && panel.context && panel.context.path.endsWith(name) && panel.sessionContext"
        " && panel.sessionContext.session && panel.sessionContext.session.kernel"
        " && panel.sessionContext.session.kernel.status === 'idle'); }",
        arg=name,
        timeout=120_000,
    )
    return page.locator("#" + page.evaluate("() => window.jupyterapp.shell.currentWidget.id"))


def _screenshot(page, tmp_path: Path, name: str, locator=None) -> Path:
    path = tmp_path / name
    if locator is not None:
        locator.scroll_into_view_if_needed()
    page.screenshot(path=str(path))
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, OUTPUT / name)  # kept for a person to look at after the run
    return path


@pytest.fixture
def page(browser, jupyter_lab):
    base, token, log = jupyter_lab
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(90_000)
    page.on("pageerror", lambda error: MESSAGES.append(f"page error: {error}"))
    page.on("console", lambda msg: MESSAGES.append(f"console: {msg.text}") if msg.type == "error" else None)
    MESSAGES.clear()
    try:
        yield page
    finally:
        try:  # free the 2 cores for the next notebook: end its kernel, close its tab
            page.evaluate(
                "async () => { const app = window.jupyterapp; if (!app) return;"
                " await app.serviceManager.sessions.shutdownAll(); app.shell.closeAll(); }"
            )
        finally:
            page.close()


def _ran_cleanly(page, name: str, log: Path) -> None:
    state = _run_all(page, name)
    if state["errors"]:
        pytest.fail(
            f"{name} failed in JupyterLab:\n"
            + "\n\n".join(state["errors"])
            + "\n\npage messages:\n"
            + "\n".join(MESSAGES[-20:])
            + f"\n\nserver log:\n{_tail(log)}"
        )
    assert state["counts"] and all(isinstance(c, int) for c in state["counts"]), state


def _plotly_figures(page, panel, minimum: int, name: str):
    """The figures that JupyterLab's plotly renderer drew (the output element is the plot)."""
    figures = panel.locator(".jp-OutputArea-output.js-plotly-plot")
    try:
        figures.nth(minimum - 1).wait_for(state="attached", timeout=60_000)
    except Exception:  # noqa: BLE001 (turned into a failure that says what the page shows)
        pytest.fail(
            f"{name}: expected at least {minimum} plotly figures in the page, found {figures.count()}; "
            "page messages:\n" + "\n".join(MESSAGES[-20:])
        )
    # drawn, not only mounted: each has plotly's SVG
    drawn = figures.filter(has=page.locator(".main-svg"))
    assert drawn.count() == figures.count(), f"{name}: {drawn.count()} of {figures.count()} figures drawn"
    return figures


def test_quickstart_runs_in_jupyterlab_and_shows_its_figure(page, jupyter_lab, tmp_path):
    base, token, log = jupyter_lab
    name = "00_quickstart.ipynb"
    panel = _open(page, base, token, name)
    _ran_cleanly(page, name, log)
    figures = _plotly_figures(page, panel, 1, name)
    heatmap = figures.first
    assert heatmap.locator(".heatmaplayer").count() >= 1, "the routing picture has no heatmap layer"
    assert "Routing of thinker layer 0" in heatmap.inner_text()
    assert panel.locator(".jp-OutputArea-output audio").count() >= 1, "the reply's audio player is missing"
    assert "Traceback" not in panel.inner_text()
    assert _screenshot(page, tmp_path, "lab-00-quickstart.png", heatmap).stat().st_size > 10_000


def test_expert_routing_runs_in_jupyterlab_with_figures_and_the_explorer(page, jupyter_lab, tmp_path):
    base, token, log = jupyter_lab
    name = "01_expert_routing.ipynb"
    panel = _open(page, base, token, name)
    _ran_cleanly(page, name, log)
    _plotly_figures(page, panel, 6, name)
    assert panel.locator(".jp-OutputArea-output.js-plotly-plot .sankey").count() >= 1, "no Sankey drawn"

    # the explorer: its controls and both of its FigureWidgets, drawn by the widget manager
    explorer = panel.locator(".jp-OutputArea-output .widget-vbox").filter(
        has=page.locator(".widget-toggle-buttons")
    )
    explorer.first.wait_for(timeout=60_000)
    assert "Error displaying widget" not in panel.inner_text()
    buttons = explorer.first.locator(".widget-toggle-buttons button")
    assert [b.inner_text().strip() for b in buttons.all()] == ["thinker", "talker"]
    assert explorer.first.locator(".widget-slider, .widget-hslider").count() >= 1, "no layer slider"
    plots = explorer.first.locator(".js-plotly-plot").filter(has=page.locator(".main-svg"))
    plots.nth(1).wait_for(timeout=60_000)
    assert plots.count() == 2  # the heatmap and the route
    assert "Routing of thinker layer 0" in explorer.first.inner_text()
    assert "first choices by layer" in explorer.first.inner_text()
    _screenshot(page, tmp_path, "lab-01-explorer.png", explorer.first)

    # the page drives the kernel: switching to the talker redraws the heatmap
    buttons.nth(1).click()
    page.wait_for_function(
        "(el) => el.innerText.includes('Routing of talker layer 0')",
        arg=explorer.first.element_handle(),
        timeout=60_000,
    )
    assert _screenshot(page, tmp_path, "lab-01-explorer-talker.png", explorer.first).stat().st_size > 10_000
