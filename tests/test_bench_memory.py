"""`omnilab bench memory` at a small size: what must hold at any speed."""

from __future__ import annotations

import pytest

from omnilab.bench import memory


def test_bench_memory_measures_each_turn_in_its_own_process():
    figures = memory.run(model="tiny", sizes=(64, 256), limit_gb=6)
    assert not [k for k in figures if "error" in k], figures
    for size in (64, 256):
        assert 200 < figures[f"bare_mb_{size}"] < 6 * 1024
        ratio = figures[f"traced_mb_{size}"] / figures[f"bare_mb_{size}"]
        assert figures[f"traced_over_bare_{size}"] == pytest.approx(ratio, rel=1e-3)
        assert figures[f"attention_rows_{size}"] > 0
    assert figures["tokens_256"] > figures["tokens_64"]
    assert isinstance(figures["pass_ratio"], bool) and "extra_growth_exponent" in figures


def test_a_turn_over_the_limit_is_killed_and_reported():
    figures = memory.run(model="tiny", sizes=(64,), limit_gb=0.2)
    assert figures["bare_error_64"] == "killed over the 0.2 GB limit"
    assert figures["pass_ratio"] is False
