"""`omnilab bench analysis`: the full routing-analysis suite on a real-model-shaped trace.

A synthetic thinker trace of 100k tokens × 48 layers × top-8 of 128 experts (Qwen3-Omni-30B-A3B's
thinker; 38.4 M routing rows with the schema's dtypes, router_stats alongside) goes through
`omnilab.analysis.routing_suite`: the routing is prepared once, then every analysis runs on it. The
target is 10 s on 2 CPU cores; building the trace is not timed.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from ..trace import Trace

TARGET_SECONDS = 10.0


def synthetic_trace(
    tokens: int = 100_000, layers: int = 48, experts: int = 128, top_k: int = 8, seed: int = 0
) -> Trace:
    """A thinker-only Trace of the real model's routing shape, built fast (vectorized column arrays in the
    schema's dtypes, which `Trace.build` takes without copies).

    Tokens are text (Zipf-distributed ids), audio and video blocks, the last 2% decode; each token's k
    experts are distinct (an arithmetic progression modulo E with an odd step), drawn with a skew so
    that load is uneven, and audio tokens lean on the first experts so specialization is non-trivial.
    """
    rng = np.random.default_rng(seed)
    n = tokens
    modality = np.full(n, "text", dtype=object)
    block = max(n // 20, 1)
    for start in range(block, n - block, 4 * block):
        modality[start : start + block] = "audio"
        modality[start + block : start + block + block // 2] = "video"
    is_audio = modality == "audio"
    token_id = np.minimum(rng.zipf(1.3, n), 30_000).astype(np.int64) + 100
    token_id[is_audio] = 151675
    token_id[modality == "video"] = 151656
    phase = np.where(np.arange(n) >= n - n // 50, "decode", "prefill").astype(object)
    token_table = {
        "component": np.full(n, "thinker", dtype=object),
        "phase": phase,
        "step": np.zeros(n, np.int32),
        "pos": np.arange(n, dtype=np.int32),
        "token_id": token_id,
        "text": pd.Series(token_id).map(lambda i: f"t{i}").to_numpy(dtype=object),
        "modality": modality,
        "item": np.where(modality == "text", -1, 0).astype(np.int32),
        "t": np.arange(n),
        "h": np.arange(n),
        "w": np.arange(n),
        "seconds": np.full(n, np.nan),
        "frame": np.full(n, -1, np.int32),
    }

    start = (rng.power(3.0, size=(layers, n)) * experts).astype(np.int64) % experts
    start[:, is_audio] = rng.integers(0, experts // 8, size=(layers, int(is_audio.sum())))
    step = rng.integers(0, experts // 2, size=(layers, n)) * 2 + 1
    expert = ((start[:, :, None] + step[:, :, None] * np.arange(top_k)) % experts).astype(np.int16)
    raw = np.exp(-0.35 * np.arange(top_k, dtype=np.float32)) * rng.uniform(0.9, 1.1, (layers, n, 1)).astype(
        np.float32
    )
    weight = (raw / raw.sum(axis=2, keepdims=True)).astype(np.float16)

    rows = layers * n * top_k
    routing = {
        "component": np.full(rows, "thinker", dtype=object),
        "layer": np.repeat(np.arange(layers, dtype=np.int16), n * top_k),
        "pos": np.tile(np.repeat(np.arange(n, dtype=np.int32), top_k), layers),
        "phase": np.tile(np.repeat(phase, top_k), layers),
        "rank": np.tile(np.arange(top_k, dtype=np.int8), layers * n),
        "expert": expert.reshape(-1),
        "weight": weight.reshape(-1),
    }
    stats_rows = layers * n
    router_stats = {
        "component": np.full(stats_rows, "thinker", dtype=object),
        "layer": np.repeat(np.arange(layers, dtype=np.int16), n),
        "pos": np.tile(np.arange(n, dtype=np.int32), layers),
        "phase": np.tile(phase, layers),
        "entropy": rng.uniform(1.5, 4.5, stats_rows).astype(np.float32),
        "topk_mass": rng.uniform(0.3, 0.9, stats_rows).astype(np.float32),
    }
    meta = {
        "model_id": "synthetic-bench",
        "random_weights": True,
        "num_experts": {"thinker": experts},
        "top_k": {"thinker": top_k},
        "position_id_per_seconds": 13,
    }
    return Trace.build(tokens=token_table, routing=routing, router_stats=router_stats, meta=meta)


def run(tokens: int = 100_000, layers: int = 48, experts: int = 128, top_k: int = 8) -> dict:
    """Time the routing suite; returns seconds per step, the total, the target and whether it passed."""
    from ..analysis import ROUTING_ANALYSES, prepare

    built = time.perf_counter()
    trace = synthetic_trace(tokens, layers, experts, top_k)
    build_seconds = time.perf_counter() - built

    seconds: dict[str, float] = {}
    rows: dict[str, int] = {}
    begin = time.perf_counter()
    data = prepare(trace)
    seconds["prepare"] = time.perf_counter() - begin
    for name, analysis in ROUTING_ANALYSES.items():
        begin = time.perf_counter()
        result = analysis(data)
        seconds[name] = time.perf_counter() - begin
        rows[name] = len(result)
    total = sum(seconds.values())
    return {
        "tokens": tokens,
        "layers": layers,
        "experts": experts,
        "top_k": top_k,
        "routing_rows": len(trace.routing),
        "build_s": round(build_seconds, 3),
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "result_rows": rows,
        "total_s": round(total, 3),
        "target_s": TARGET_SECONDS,
        "pass": total < TARGET_SECONDS,
    }
