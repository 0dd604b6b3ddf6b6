"""`omnilab bench atp`: attribution patching against the batched patching sweep, as a ratio.

Both estimate every (layer, position) cell of 8 residual layers x all positions of a ~256-token
mixed prompt on `small` (clean vs a blank image of the same size). AtP costs one clean forward, one
corrupted forward and one backward whatever the cells; the batched sweep costs one patched pass
(of the layers from the patched one on) per cell, so it is timed over `sweep_positions` positions
spread over the prompt and scaled to all of them (a sweep's time is linear in its cells: batches of
a fixed size, the same layers per cell). The two agree as `agreement` says, on the cells timed both
ways. Target: AtP ≥ 20x faster.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from ..analysis.attribution_patching import agreement, attribution_patching
from ..analysis.patching import patching_sweep
from ._common import _sync, load_lab, mixed_conversation
from .patching import blank_image_twin


def run(
    model: str = "small",
    device: str | None = None,
    tokens: int = 256,
    layers: int = 8,
    sweep_positions: int = 24,
) -> dict:
    """Seconds of AtP over layers x all positions and of the batched sweep (scaled), their ratio
    (speedup; target ≥ 20) and AtP's agreement with the sweep over the cells measured both ways."""
    lab = load_lab(model, device)
    conversation = mixed_conversation(lab, tokens)
    count = min(layers, len(lab.thinker.model.language_model.layers))
    sites = [f"resid.{i}" for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        corrupted = blank_image_twin(conversation, Path(tmp))
        length = int(lab.prepare(conversation)["input_ids"].shape[1])
        attribution_patching(lab, conversation, corrupted, 0, sites=sites[:1], positions=2)  # warm-up
        _sync()
        start = time.perf_counter()
        atp = attribution_patching(lab, conversation, corrupted, 0, sites=sites, positions="each")
        _sync()
        atp_s = time.perf_counter() - start
        picked = np.unique(np.linspace(0, length - 1, min(sweep_positions, length)).round().astype(int))
        _sync()
        start = time.perf_counter()
        sweep = patching_sweep(lab, conversation, corrupted, 0, sites=sites, positions=picked.tolist())
        _sync()
        sweep_timed_s = time.perf_counter() - start
    sweep_s = sweep_timed_s / len(picked) * length
    return {
        "model": lab.model_id,
        "tokens": length,
        "layers": count,
        "cells": count * length,
        "atp_s": atp_s,
        "sweep_s": sweep_s,
        "sweep_timed_positions": len(picked),
        "sweep_timed_s": sweep_timed_s,
        "speedup": sweep_s / atp_s,
        "agreement": agreement(atp, sweep),
    }
