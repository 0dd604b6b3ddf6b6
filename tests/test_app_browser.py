"""The demo in a real browser: Debian's chromium driven by Playwright (never `playwright install`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest_app import DATA, OUTPUT, shared_lab

from apps.demo import jobs

pytest_plugins = ["conftest_app"]  # app_env, served
pytestmark = [
    pytest.mark.browser,
    pytest.mark.usefixtures("app_env"),
]


@pytest.fixture
def page(browser, served):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.set_default_timeout(90_000)
    page.goto(served)
    page.wait_for_selector("#send")
    try:
        yield page
    finally:
        page.close()


def _send(page, text: str, image: Path | None = None) -> None:
    if image is not None:
        page.set_input_files("#image-in input[type=file]", str(image))
        page.wait_for_selector("#image-in img")
    page.fill("#message textarea", text)
    page.click("#send")


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, OUTPUT / name)  # kept for a person to look at after the run
    return path


def test_a_turn_with_an_image_shows_the_reply_and_a_plotly_chart(page, tmp_path):
    assert "random-weight model" in page.inner_text("#banner")
    _send(page, "What is in this image?", DATA / "image.png")
    assistant = page.locator("#chatbot .bot-row").last
    assistant.wait_for()
    # a heatmap, not the note the panel shows before any turn
    page.wait_for_selector("#routing-plot .js-plotly-plot .heatmaplayer .hm")
    assert "image.png" in page.inner_text("#chatbot")
    assert assistant.inner_text().strip()
    assert "Routing of thinker layer 0" in page.inner_text("#routing-plot")
    assert _screenshot(page, tmp_path, "browser-turn.png").stat().st_size > 10_000


def test_a_bad_input_shows_an_escaped_message_and_the_app_keeps_serving(page, tmp_path):
    _send(page, "")
    toast = page.locator("[data-testid='toast-body']").first
    toast.wait_for()
    assert "the message is empty" in toast.inner_text()
    assert "Traceback" not in page.content()
    _screenshot(page, tmp_path, "browser-error.png")
    _send(page, 'still there? <img src=x onerror="window.pwned=1"><script>window.pwned=2</script>')
    page.wait_for_function(
        "() => document.querySelector('#chatbot').innerText.includes('still there?')", timeout=90_000
    )
    page.wait_for_selector("#routing-plot .js-plotly-plot .heatmaplayer .hm")
    assert page.evaluate("window.pwned") is None  # the message was shown, never run


def test_the_attribution_and_residual_speech_panels_answer_in_the_page(page, tmp_path):
    _send(page, "Say something.")
    page.wait_for_selector("#routing-plot .js-plotly-plot .heatmaplayer .hm")  # the panels have the turn
    page.get_by_role("tab", name="Attribution").click()
    page.fill("#attribution-steps input[type=number]", "4")
    page.press("#attribution-steps input[type=number]", "Enter")
    page.click("#explain")
    page.wait_for_selector("#attribution-plot .js-plotly-plot .barlayer .point")
    assert "Integrated Gradients of output token 0" in page.input_value("#attribution-text textarea")
    assert "convergence delta" in page.input_value("#attribution-text textarea")
    _screenshot(page, tmp_path, "browser-attribution.png")
    page.get_by_role("tab", name="Speech").click()
    page.click("#listen")
    page.wait_for_selector(
        "#residual-audio audio[src], #residual-audio [data-testid='waveform-x'], #residual-audio .waveform-container"
    )
    _screenshot(page, tmp_path, "browser-residual-speech.png")


def test_the_positions_and_logit_lens_figures_are_readable_at_the_apps_width(page, tmp_path):
    _send(page, "What is in this image?", DATA / "image.png")
    page.wait_for_selector("#routing-plot .js-plotly-plot .heatmaplayer .hm")
    page.get_by_role("tab", name="Positions").click()
    page.wait_for_selector("#positions-plot canvas")
    width, height = page.evaluate(
        """() => { const r = Array.from(document.querySelectorAll('#positions-plot canvas'))
                     .map(c => c.getBoundingClientRect()).sort((a, b) => b.height - a.height)[0];
                   return [r.width, r.height]; }"""
    )
    panel = page.locator("#positions-plot").bounding_box()
    assert width >= 0.9 * panel["width"] and height >= 500, (width, height, panel)  # the whole panel, tall
    _screenshot(page, tmp_path, "browser-positions.png")
    page.get_by_role("tab", name="Logit lens").click()
    page.click("#lens")
    page.wait_for_selector("#lens-plot .js-plotly-plot .heatmaplayer .hm")
    labels = page.evaluate(
        """() => Array.from(document.querySelectorAll('#lens-plot .heatmap-label text'))
                 .map(t => [t.getBBox().width, parseFloat(getComputedStyle(t).fontSize)])"""
    )
    cells = (
        page.evaluate("() => document.querySelector('#lens-plot .heatmaplayer').getBBox().width")
        / jobs.LENS_POSITIONS
    )
    layers = len(shared_lab().model.thinker.model.language_model.layers)
    assert len(labels) == layers * jobs.LENS_POSITIONS  # every cell says its word
    assert all(size >= 11 for _, size in labels)
    assert max(w for w, _ in labels) <= cells, (
        max(w for w, _ in labels),
        cells,
    )  # no word runs into the next
    _screenshot(page, tmp_path, "browser-logit-lens.png")
