"""`omnilab bench`: every benchmark runs end to end at a small size and reports coherent figures.

Speeds are not asserted here (they are the benchmarks' business, as ratios in one run); what is
asserted is what must hold at any speed: the streamed reply is generate's, the store holds every
synthetic row at under 3 bytes a row, collection ran every sample both ways.
"""

from __future__ import annotations

import math

import pytest

from omnilab.bench import forward, store, stream, trace
from omnilab.bench._common import DATA
from omnilab.store import read_manifest


def _positive(figures: dict, *names: str) -> None:
    for name in names:
        assert figures[name] > 0 and math.isfinite(figures[name]), name


def test_bench_forward_times_both_experts_implementations():
    figures = forward.run("tiny", tokens=64, repeats=1)
    _positive(figures, "default_s", "eager_s", "default_over_eager")
    assert figures["tokens"] >= 64


def test_bench_trace_measures_tracing_and_what_routing_costs_on_disk():
    figures = trace.run("tiny", tokens=128, repeats=1)
    _positive(figures, "bare_s", "traced_s", "peak_trace_memory_mb", "routing_bytes_per_token_layer_k")
    # the timed capture records what it claims: every prompt position's top-k at every layer
    assert figures["routing_rows"] == figures["tokens"] * figures["layers"] * figures["top_k"]
    assert "nnsight_s" in figures, figures.get("nnsight_error")


@pytest.mark.slow
def test_bench_store_writes_every_row_compactly_and_collects_every_sample_both_ways():
    figures = store.run("tiny", rows=200_000, repeats=1, collect_repeats=1)
    assert figures["routing_rows"] >= 200_000
    assert figures["bytes_per_routing_row"] < 3
    assert figures["collect_samples"] == len(read_manifest(DATA / "manifest.jsonl"))
    _positive(figures, "expert_load_s", "collect_traced_samples_per_s", "collect_bare_samples_per_s")
    assert 0 < figures["collect_traced_write_share"] < 1
    assert figures["routing_bytes_per_row_compact"] < 20  # categoricals and float16, no string per row
    assert figures["compact_over_plain_memory"] < 1


@pytest.mark.slow
def test_bench_stream_streams_generates_reply_in_growing_chunks():
    figures = stream.run("tiny", speech_frames=12, max_new_tokens=6, repeats=1)
    assert figures["tokens_identical"] and figures["codes_identical"]
    assert figures["untraced_tokens_identical"]  # the untraced stream timed against generate is generate's
    assert figures["per_frame_code2wav_chunks"] == figures["frames"]
    assert figures["per_frame_audio_max_abs_diff"] <= 1e-5 * max(figures["audio_peak"], 1e-12)
    assert 0 < figures["stream_first_over_full"] < 1
    assert figures["audio_samples"] <= figures["expected_samples_upper_bound"]


def test_bench_device_is_for_the_model_benches_only(capsys):
    from omnilab.cli import main

    assert main(["bench", "store", "--device", "cuda"]) == 2
    assert "bench store runs on the CPU only" in capsys.readouterr().err


def test_benches_in_one_process_share_one_loaded_model(monkeypatch):
    from omnilab.bench import _common

    loads = []
    monkeypatch.setattr(_common, "_LABS", {})
    monkeypatch.setattr("omnilab.load", lambda model, **kw: loads.append((model, kw)) or object())
    first = _common.load_lab("tiny", "cuda")
    assert _common.load_lab("tiny", "cuda") is first and loads == [("tiny", {"device_map": "cuda"})]
    _common.load_lab("small")
    assert list(_common._LABS) == [("small", None)]  # one model at a time


def test_the_device_check_script_parses():
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert "--device cuda" in script.read_text()


def test_a_repeated_bench_reports_each_number_as_min_median_max():
    from omnilab.bench import repeated

    runs = [{"s": 1.0, "ok": True, "model": "tiny"}, {"s": 3.0, "ok": False, "model": "tiny"}]
    runs.append({"s": 2.0, "ok": True, "model": "tiny"})
    assert repeated(runs) == {
        "runs": 3,
        "s": {"min": 1.0, "median": 2.0, "max": 3.0},
        "ok": "2/3",
        "model": "tiny",
    }
