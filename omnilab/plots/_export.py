"""Write a figure to a file: HTML always, PNG/SVG/PDF through kaleido where a browser is available."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go

from ..errors import OmnilabError

__all__ = ["ExportError", "export"]

BROWSERS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
IMAGE_FORMATS = {".png", ".svg", ".pdf", ".jpg", ".jpeg", ".webp"}


class ExportError(OmnilabError, RuntimeError):
    """A figure that cannot be written in the asked format (no browser for images, unknown suffix)."""


def browser_path() -> str | None:
    """The browser kaleido will drive: $BROWSER_PATH, else a Chromium found on the machine, else None."""
    given = os.environ.get("BROWSER_PATH")
    if given and Path(given).exists():
        return given
    for candidate in (*BROWSERS, shutil.which("chromium"), shutil.which("google-chrome")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def export(
    fig: go.Figure,
    path: str | os.PathLike,
    *,
    width: int | None = None,
    height: int | None = None,
    scale: float = 2.0,
) -> Path:
    """Write `fig` to `path`; the suffix picks the format.

    .html: a self-contained page (plotly.js inlined, works offline). .png/.svg/.pdf/.jpg/.webp: a static
    image through kaleido, which drives a Chromium (BROWSER_PATH, default /usr/bin/chromium).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix in (".html", ".htm"):
        fig.write_html(path, include_plotlyjs=True, full_html=True)
        return path
    if suffix not in IMAGE_FORMATS:
        raise ExportError(
            f"cannot export a figure to '{path}': unknown suffix {suffix or '(none)'}; use .html, or "
            f"{', '.join(sorted(IMAGE_FORMATS))} for an image"
        )
    browser = browser_path()
    if browser is None:
        raise ExportError(
            f"cannot write '{path}': a {suffix[1:].upper()} needs a Chromium browser for kaleido and none was "
            "found (set BROWSER_PATH, or `apt-get install chromium`); export to .html instead"
        )
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise ExportError(
            f"cannot write '{path}': image export needs kaleido (`pip install 'omnilab[analysis]'`); "
            "export to .html instead"
        ) from None
    previous = os.environ.get("BROWSER_PATH")
    os.environ["BROWSER_PATH"] = browser
    try:
        fig.write_image(path, width=width, height=height, scale=scale)
    except Exception as exc:  # kaleido reports browser failures with many exception types
        raise ExportError(f"cannot write '{path}' with the browser at '{browser}': {exc}") from exc
    finally:
        if previous is None:
            os.environ.pop("BROWSER_PATH", None)
        else:
            os.environ["BROWSER_PATH"] = previous
    return path
