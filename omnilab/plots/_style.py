"""Shared look of omnilab figures: one colour per modality, one template, one way to pick a layer."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..trace import MODALITIES

MODALITY_COLORS = {
    "text": "#4C78A8",
    "audio": "#F58518",
    "image": "#54A24B",
    "video": "#B279A2",
    "speech": "#E45756",
}
UNKNOWN_COLOR = "#BAB0AC"
TEMPLATE = "plotly_white"


def modality_color(name) -> str:
    return MODALITY_COLORS.get(str(name), UNKNOWN_COLOR)


def modality_colorscale() -> list:
    """A discrete colorscale over modality codes 0..len(MODALITIES)-1 (for a heatmap strip)."""
    n = len(MODALITIES)
    scale = []
    for i, name in enumerate(MODALITIES):
        scale.append([i / n, MODALITY_COLORS[name]])
        scale.append([(i + 1) / n, MODALITY_COLORS[name]])
    return scale


def pick(frame: pd.DataFrame, column: str, value, what: str) -> tuple[pd.DataFrame, object]:
    """Rows of `frame` with `column` == value (value None: the first value present), and that value."""
    if len(frame) == 0:
        return frame, value
    values = frame[column]
    if value is None:
        value = values.iloc[0]
    rows = frame[(values == value).to_numpy(dtype=bool)]
    if len(rows) == 0:
        present = ", ".join(str(v) for v in pd.unique(values)[:20])
        raise ValueError(f"{what} has no rows with {column} = {value!r}; present: {present}")
    return rows, value


def as_text(values) -> np.ndarray:
    """Labels as plain Python strings (categoricals and missing values included)."""
    return np.asarray(pd.Series(values, dtype=object).fillna("").astype(str).to_numpy(), dtype=object)


# A qualitative palette for categories that have no order (codec code ids): neighbouring ids get
# unrelated colours, and one id always gets the same colour.
CATEGORY_COLORS = [
    "#4C78A8", "#F58518", "#E45756", "#72B7B2", "#54A24B", "#EECA3B", "#B279A2", "#FF9DA6",
    "#9D755D", "#BAB0AC", "#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B",
    "#E377C2", "#7F7F7F", "#BCBD22", "#17BECF", "#393B79", "#637939", "#8C6D31", "#843C39",
]  # fmt: skip
DIVERGING = "RdBu_r"  # red above "no effect", blue below, white at it


INTEGER_AXIS = {"tickformat": "d", "dtick": 1, "tick0": 0}


def integer_ticks(fig, *axes: str) -> None:
    """Whole-number ticks on axes that count things (layers, experts, heads): no 0.5, 1.5."""
    fig.update_layout({axis: INTEGER_AXIS for axis in axes})


def step_colorscale(colors: list[str]) -> list:
    """A colorscale of equal bands, one per colour (z = i maps to colors[i] with zmin=-0.5, zmax=n-0.5)."""
    n = len(colors)
    scale = []
    for i, color in enumerate(colors):
        scale.append([i / n, color])
        scale.append([(i + 1) / n, color])
    return scale


def log_ticks(low: int, high: int, *, prefix: str = "") -> dict:
    """Colorbar ticks for a log10 scale from 10**low to 10**high, labelled with the values themselves."""
    values = list(range(int(low), int(high) + 1))
    return {"tickvals": values, "ticktext": [f"{prefix}{10.0**v:g}" for v in values]}


def symmetric_bound(values, floor: float = 1e-12) -> float:
    """The largest |value| (finite ones), at least `floor`: the half-width of a diverging scale at 0."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(max(np.abs(finite).max() if finite.size else 0.0, floor))


_BELOW = ["#2166AC", "#67A9CF", "#D1E5F0"]  # blue: less than "no effect"
NEUTRAL = "#F7F7F7"  # the colour of "no effect"
_ABOVE = ["#FDDBC7", "#EF8A62", "#B2182B"]  # red: more


def centred_colorscale(low: float, centre: float, high: float) -> list:
    """A diverging colorscale for the range low..high whose neutral colour sits exactly at `centre`
    (use with zmin=low, zmax=high: plotly's zmid is ignored once zmin/zmax are set)."""
    span = float(high) - float(low)
    at = 0.5 if span <= 0 else min(max((float(centre) - float(low)) / span, 0.0), 1.0)
    scale = [[at * i / len(_BELOW), color] for i, color in enumerate(_BELOW)]
    scale.append([at, NEUTRAL])
    scale += [[at + (1 - at) * (i + 1) / len(_ABOVE), color] for i, color in enumerate(_ABOVE)]
    # drop zero-width bands at the ends (a centre at low or high)
    out = []
    for stop in scale:
        if out and stop[0] <= out[-1][0]:
            out[-1] = [out[-1][0], stop[1]] if stop[1] == NEUTRAL else out[-1]
            continue
        out.append(stop)
    out[0][0], out[-1][0] = 0.0, 1.0
    return out


def wrap(title: str | None, width: int = 95) -> str | None:
    """A long figure title broken into lines of about `width` characters (plotly never wraps a title,
    it cuts it at the figure's edge); None stays None. Existing <br> breaks are kept."""
    if title is None or "<br>" in title or len(title) <= width:
        return title
    lines, line = [], ""
    for word in title.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "<br>".join([*lines, line])
