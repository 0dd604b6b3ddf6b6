"""The notebook gallery: every analysis notebook executed and written to HTML that reads without a kernel.

    python scripts/gallery.py                      # notebooks/*.ipynb → build/gallery/
    python scripts/gallery.py --out site notebooks/01_expert_routing.ipynb
    python scripts/gallery.py --no-execute         # export the outputs the notebooks already hold

Each notebook is executed with nbclient in its own folder (its relative paths, ../data, hold). Its plotly
figures become static HTML (one <div> each, drawn by the plotly.js that sits beside the pages, from
plotly's own offline bundle: nothing is fetched from the network). Widgets, which need a live kernel,
become a note saying so (the notebooks draw the widget's first view as a static figure beside it).
Then nbconvert's "basic" template writes each notebook's body into a page of ours, and index.html lists
the pages with their titles, figure counts, run times and whether they ran.

Exit status: 0 when every notebook ran, 1 when one failed (its page is still written, up to the error).
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
PLOTLY_JS = "plotly.min.js"
STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
pre, code { font-family: ui-monospace, monospace; font-size: 0.9em; }
.jp-InputArea-editor, .input_area, div.highlight { background: #f6f6f6; padding: 0.4em 0.6em; overflow-x: auto; }
.jp-OutputArea-output pre { background: #fff; border-left: 3px solid #ddd; padding: 0.3em 0.6em; overflow-x: auto; }
.jp-InputPrompt, .jp-OutputPrompt { display: none; }
table.dataframe { border-collapse: collapse; font-size: 0.85em; }
table.dataframe td, table.dataframe th { border: 1px solid #ddd; padding: 2px 6px; }
.omnilab-widget-note { color: #666; font-style: italic; }
.omnilab-error { color: #b00; }
nav a { margin-right: 1em; }
"""


@dataclass
class Page:
    """One notebook's page in the gallery."""

    notebook: str
    html: str
    title: str
    figures: int
    seconds: float | None
    error: str | None = None
    widgets: int = 0
    warnings: list[str] = field(default_factory=list)


def execute(path: Path, *, timeout: int) -> tuple[object, float, str | None]:
    """Run every cell of the notebook at `path` in its own folder: (notebook, seconds, error or None)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except CellExecutionError as exc:  # the page still shows every cell up to the failing one
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return notebook, time.perf_counter() - start, error


def static_outputs(notebook) -> tuple[int, int]:
    """Replace plotly figure outputs by static HTML divs and widget outputs by a note, in place.

    Returns (figures, widgets) converted.
    """
    import plotly.io as pio

    figures = widgets = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data")
            if not data:
                continue
            if PLOTLY_MIME in data:
                figure = data[PLOTLY_MIME]
                figure = json.loads(figure) if isinstance(figure, str) else figure
                div = pio.to_html(
                    figure,
                    include_plotlyjs=False,
                    full_html=False,
                    div_id=f"figure-{figures}",
                    config={"displaylogo": False, "responsive": True},
                )
                output["data"] = {"text/html": f'<div class="omnilab-figure">{div}</div>'}
                figures += 1
            elif WIDGET_MIME in data:
                text = html.escape(str(data.get("text/plain", "a widget")))
                output["data"] = {
                    "text/html": f'<p class="omnilab-widget-note">{text}: an interactive widget, live only in a '
                    "running notebook (the static figure beside it shows its first view)</p>"
                }
                widgets += 1
    return figures, widgets


def title_of(notebook, fallback: str) -> str:
    """The notebook's first markdown heading, else `fallback`."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def body_html(notebook) -> str:
    """The notebook as an HTML fragment (nbconvert's "basic" template: no head, no external assets)."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="basic")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(notebook)
    return body


def page_html(title: str, body: str, *, error: str | None = None) -> str:
    banner = (
        f'<p class="omnilab-error">This notebook stopped with an error: {html.escape(error)}</p>'
        if error
        else ""
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
        f'<script src="{PLOTLY_JS}"></script></head><body>'
        f'<nav><a href="index.html">← all notebooks</a></nav>{banner}{body}</body></html>\n'
    )


def index_html(pages: list[Page]) -> str:
    rows = []
    for page in pages:
        seconds = "not run" if page.seconds is None else f"{page.seconds:.0f} s"
        status = (
            f'<span class="omnilab-error">error: {html.escape(page.error)}</span>' if page.error else "ran"
        )
        rows.append(
            f'<tr><td><a href="{html.escape(page.html)}">{html.escape(page.title)}</a></td>'
            f"<td>{html.escape(page.notebook)}</td><td>{page.figures}</td><td>{seconds}</td><td>{status}</td></tr>"
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>omnilab notebooks</title>"
        f"<style>{STYLE} td, th {{ padding: 4px 10px; text-align: left; }}</style></head><body>"
        "<h1>omnilab notebooks</h1><p>Each notebook executed and rendered with its figures; no kernel needed.</p>"
        "<table><tr><th>notebook</th><th>file</th><th>figures</th><th>run time</th><th>status</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )


def plotly_bundle() -> Path:
    """plotly.js as the plotly package ships it (the offline bundle)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.exists():
        raise FileNotFoundError(f"plotly's offline bundle is not at {path}; reinstall plotly")
    return path


def build(
    notebooks: list[Path], out: Path, *, run: bool = True, timeout: int = 900, keep: bool = False, log=print
) -> list[Page]:
    """Write the gallery of `notebooks` into `out`: one page per notebook, plotly.min.js and index.html
    (`keep`: also each executed notebook, as out/executed/<name>.ipynb)."""
    import nbformat

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plotly_bundle(), out / PLOTLY_JS)
    pages = []
    for path in notebooks:
        path = Path(path).resolve()
        if run:
            log(f"running {path.name} ...")
            notebook, seconds, error = execute(path, timeout=timeout)
        else:
            notebook, seconds, error = nbformat.read(path, as_version=4), None, None
        if keep:
            (out / "executed").mkdir(exist_ok=True)
            nbformat.write(notebook, out / "executed" / path.name)
        figures, widgets = static_outputs(notebook)
        title = title_of(notebook, path.stem)
        name = f"{path.stem}.html"
        (out / name).write_text(page_html(title, body_html(notebook), error=error), encoding="utf-8")
        page = Page(path.name, name, title, figures, seconds, error, widgets)
        pages.append(page)
        log(f"{path.name}: {figures} figures, {widgets} widgets"
            + (f", {seconds:.0f} s" if seconds is not None else "") + (f", ERROR {error}" if error else ""))  # fmt: skip
    (out / "index.html").write_text(index_html(pages), encoding="utf-8")
    return pages


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks (default: notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gallery", help="output folder")
    parser.add_argument(
        "--no-execute", action="store_true", help="export the outputs already in the notebooks"
    )
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument(
        "--keep", action="store_true", help="also write the executed notebooks (out/executed/)"
    )
    args = parser.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    pages = build(notebooks, args.out, run=not args.no_execute, timeout=args.timeout, keep=args.keep)
    print(f"gallery: {args.out / 'index.html'} ({len(pages)} notebooks)")
    return 1 if any(page.error for page in pages) else 0


if __name__ == "__main__":
    sys.exit(main())
