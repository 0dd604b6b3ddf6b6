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
