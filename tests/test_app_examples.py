"""The organism's examples keep working for everyone: a Clear (or an ended session) in one browser
never deletes the example files another browser then uses (Gradio serves them from its upload
folder, where a session's own uploads are deleted when it ends)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest
from conftest_app import SERVED

from apps.demo import session as sessions
from apps.demo.layout import _file_paths

pytest_plugins = ["conftest_app"]  # app_env, served_organism
pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("app_env")]


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    # Each send queues behind the model group's earlier jobs (the panels drawn after every turn and
    # every Clear), so on a loaded 2-core machine a reply can take minutes: wait up to 5.
    page.set_default_timeout(300_000)
    page.goto(url)
    page.wait_for_selector("#send")
    page.get_by_label("speak the reply").uncheck()  # the text is checked here; speech is tested elsewhere
    return page


def _examples(url: str) -> dict[str, list[str]]:
    """The examples the page offers: {label: the paths of its files on the server}."""
    app = SERVED[url]
    dataset = next(b for b in app.blocks.values() if isinstance(b, gr.Dataset))
    click = next(fn for fn in app.fns.values() if fn.targets and fn.targets[0][0] == dataset._id)
    return {
        label: _file_paths([update.get("value") for update in click.fn(dataset.preprocess(index))])
        for index, label in enumerate(dataset.sample_labels)
    }


def _ask_and_clear(page, label: str) -> str:
    """Click the example, send it, read the reply, press Clear (each example is a new conversation:
    the beep's "use the video's audio" would otherwise apply to an earlier silent video too)."""
    page.get_by_text(label, exact=True).click()
    page.wait_for_function("() => document.querySelector('#message textarea').value.length > 0")
    page.click("#send")
    page.wait_for_function(
        "() => document.querySelectorAll('#chatbot .bot-row').length === 1"
        " && !document.querySelector('#chatbot').innerText.endsWith('…')"
    )
    reply = page.locator("#chatbot .bot-row").first.inner_text().strip()
    page.click("#clear")
    page.wait_for_function("() => document.querySelectorAll('#chatbot .bot-row').length === 0")
    return reply


def test_a_clear_in_one_browser_leaves_every_example_working_in_another(browser, served_organism):
    offered = _examples(served_organism)
    files = [path for paths in offered.values() for path in paths]
    assert len(files) >= 3 and all(Path(f).is_file() for f in files)
    first = _open(browser, served_organism)
    for label, paths in offered.items():
        if paths:  # the examples with files: this session sends them, then clears
            _ask_and_clear(first, label)
    first.close()  # and its session ends
    assert all(Path(f).is_file() for f in files), "a session deleted the app's example files"
    second = _open(browser, served_organism)
    replies = {label: _ask_and_clear(second, label) for label in offered}
    assert second.locator("[data-testid='toast-body']").count() == 0, second.inner_text("body")[:500]
    assert all(replies.values()), replies
    assert all(Path(f).is_file() for f in files) and set(files) <= sessions._KEPT
    second.close()
