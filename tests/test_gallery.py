"""scripts/gallery.py: executed notebooks as HTML pages whose figures draw without a kernel or a network.

A two-cell notebook (a heading and one plotly figure) stands in for the analysis notebooks, which the
suite already executes with nbmake; here what is tested is the export: static figures, the offline
plotly bundle, the index, and Debian's chromium drawing the figure from the page.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.browser, pytest.mark.slow]

FIGURE_CELL = """\
import plotly.graph_objects as go  # plain plotly: the kernel need not import torch to test the export
go.Figure([go.Scatter(x=[0, 1, 2, 3], y=[0.3, 0.5, 0.5, 0.4], name="organism"),
           go.Scatter(x=[0, 1, 2, 3], y=[0.2, 0.2, 0.3, 0.2], name="tiny", line_dash="dash")],
          layout_title_text="Routing NMI by layer")
"""


def _gallery():
    spec = importlib.util.spec_from_file_location("gallery", ROOT / "scripts" / "gallery.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gallery", module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gallery")
    notebook = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# 99 · A figure"), nbformat.v4.new_code_cell(FIGURE_CELL)]
    )
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "99_figure.ipynb"
    nbformat.write(notebook, path)
    pages = _gallery().build([path], folder / "out", run=True, timeout=120, log=lambda *_: None)
    return folder / "out", pages


def test_gallery_writes_a_page_per_notebook_and_an_index(built):
    out, pages = built
    (page,) = pages
    assert page.error is None and page.figures == 1 and page.title == "99 · A figure"
    index = (out / "index.html").read_text()
    assert 'href="99_figure.html"' in index and "99 · A figure" in index
    assert (out / "plotly.min.js").stat().st_size > 1_000_000  # plotly's offline bundle, beside the pages


def test_gallery_pages_fetch_nothing_from_the_network(built):
    out, _ = built
    text = (out / "99_figure.html").read_text()
    assert '<script src="plotly.min.js">' in text
    assert "cdn." not in text and "https://" not in text.split("<body>")[0]
    assert "application/vnd.plotly.v1+json" not in text  # the figure is static HTML, not a kernel mimetype


def test_gallery_figures_render_in_chromium_offline(built, browser):
    out, _ = built
    page = browser.new_page()
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    try:
        page.goto((out / "index.html").as_uri())
        page.click("text=99 · A figure")
        page.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
        lines = page.locator(".js-plotly-plot .scatterlayer .trace").count()
        title = page.locator(".js-plotly-plot .gtitle").text_content()
    finally:
        page.close()
    assert lines == 2  # organism and the tiny control, drawn
    assert "NMI" in title
    assert all(url.startswith("file://") for url in requests), requests
