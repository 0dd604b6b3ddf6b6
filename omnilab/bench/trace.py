"""`omnilab bench trace`: what tracing costs on `small`, ~512 mixed-modality tokens, in one run.

traced forward (routing + positions) / bare forward (target <= 1.05); the same capture with
nnsight / bare, side by side; saved bytes per (token, layer); peak trace memory."""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path

import torch

from ._common import best_of, mixed_conversation

TARGET = 1.05


def run(model: str = "small", tokens: int = 512, repeats: int = 5) -> dict:
    from .. import load

    lab = load(model)
    inputs = lab.prepare(mixed_conversation(lab, tokens))
    thinker = lab.model.thinker
    n = int(inputs["input_ids"].shape[1])
    layers = thinker.config.text_config.num_hidden_layers

    def bare():
        with torch.inference_mode():
            thinker(**inputs)

    def traced():
        with lab.trace(capture=("routing", "positions")), torch.inference_mode():
            thinker(**inputs)

    figures = {"model": lab.model_id, "tokens": n, "layers": layers}
    figures["bare_s"] = best_of(bare, repeats)
    figures["traced_s"] = best_of(traced, repeats)
    figures["traced_over_bare"] = figures["traced_s"] / figures["bare_s"]
    figures["target"] = TARGET
    figures["pass"] = figures["traced_over_bare"] <= TARGET
    figures.update(_nnsight(thinker, inputs, repeats, figures["bare_s"]))

    tracemalloc.start()
    with lab.trace(capture=("routing", "positions")) as tr, torch.inference_mode():
        thinker(**inputs)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures["peak_trace_memory_mb"] = peak / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        path = tr.trace.save(Path(tmp) / "t")
        size = (path / "routing.parquet").stat().st_size + (path / "router_stats.parquet").stat().st_size
    figures["saved_bytes_per_token_layer"] = size / (n * layers)
    return figures


def _nnsight(thinker, inputs, repeats: int, bare_s: float) -> dict:
    """The same routing capture with nnsight (the peer), or why it could not run."""
    try:
        from nnsight import NNsight

        wrapped = NNsight(thinker)
        layers = thinker.model.language_model.layers

        def run_nnsight():
            with torch.inference_mode(), wrapped.trace(**inputs):
                for i in range(len(layers)):
                    wrapped.model.language_model.layers[i].mlp.gate.output.save()

        seconds = best_of(run_nnsight, repeats)
        return {"nnsight_s": seconds, "nnsight_over_bare": seconds / bare_s}
    except Exception as exc:  # the peer is optional; report why it did not run
        return {"nnsight_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
