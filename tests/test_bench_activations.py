"""`omnilab bench activations` runs end to end at a small size and reports coherent figures.

Speeds are the bench's business (ratios in one run on `small`); what is asserted here holds at any
speed: nnsight ran the same capture, the captured size is every
layer's residual at every position, and the patching figure has its place.
"""

from __future__ import annotations

import math

from omnilab.bench import activations


def test_bench_activations_measures_the_residual_capture_beside_nnsight_and_its_memory():
    figures = activations.run("tiny", tokens=128, repeats=1)
    for name in ("bare_s", "traced_s", "nnsight_s", "captured_mb"):
        assert figures[name] > 0 and math.isfinite(figures[name]), name
    # every layer's residual stream at every position, float16
    assert figures["captured_mb"] * 2**20 == figures["layers"] * figures["tokens"] * 64 * 2
    assert math.isfinite(figures["capture_peak_over_captured"])
    assert (
        figures["patching_speedup"] > 0
        and figures["patching_patches"] == figures["patching_layers"] * figures["patching_groups"]
    )


def test_bench_activations_is_a_cli_bench(capsys):
    from omnilab.cli import BENCHES

    assert "activations" in BENCHES
