"""Steering vectors: the mean difference of two sets of activations at one site.

The difference of means between activations on two contrasting sets of prompts (e.g. text that is
about speech vs not), added to the residual stream during generation, moves the model's behaviour
along that contrast (Turner et al., 2023, "Activation Addition: Steering Language Models Without
Optimization"; Rimsky et al., 2024, "Steering Llama 2 via Contrastive Activation Addition").

    v = steering_vector(a, b)                                  # a, b: [n, width] activations
    with lab.intervene(add={"resid.2": 4.0 * v}): lab.generate(conversation)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..errors import InterventionError

__all__ = ["steering_vector"]


def steering_vector(a, b, *, column: str | None = None) -> torch.Tensor:
    """mean(a) - mean(b) over rows: a float32 vector [width], for `lab.intervene(add={site: alpha * v})`.

    `a` and `b`: tensors or arrays [rows, width] (or one row [width]), or DataFrames read from a
    store with one column of per-token vectors (`column`; found when it is the only such column).
    """
    mean_a, mean_b = _rows(a, "a", column).mean(0), _rows(b, "b", column).mean(0)
    if mean_a.shape != mean_b.shape:
        raise InterventionError(
            f"a has width {mean_a.shape[0]} and b width {mean_b.shape[0]}; take both from the same site"
        )
    return mean_a - mean_b


def _rows(x, name: str, column: str | None) -> torch.Tensor:
    if isinstance(x, pd.DataFrame):
        x = _frame_rows(x, name, column)
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InterventionError(f"{name} is a {type(x).__name__}; give a tensor, an array or a DataFrame")
    x = x.detach().float().cpu()
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise InterventionError(f"{name} has shape {tuple(x.shape)}; give activations [rows, width]")
    return x


def _frame_rows(frame: pd.DataFrame, name: str, column: str | None) -> np.ndarray:
    if column is None:
        vectors = [
            c
            for c in frame.columns
            if len(frame) and isinstance(frame[c].iloc[0], (np.ndarray, list, torch.Tensor))
        ]
        if len(vectors) != 1:
            raise InterventionError(
                f"{name}: cannot tell which column holds the activations ({vectors or 'none'}); pass column="
            )
        column = vectors[0]
    if column not in frame.columns:
        raise InterventionError(
            f"{name} has no column {column!r}; it has {', '.join(map(str, frame.columns))}"
        )
    return np.stack([np.asarray(v, dtype=np.float32) for v in frame[column]])
