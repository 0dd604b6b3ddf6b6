"""Benchmarks: `omnilab bench NAME`. Each module has `run(**options) -> dict` of figures."""

from __future__ import annotations

import statistics


def format_figures(name: str, figures: dict) -> str:
    """A readable two-column table of a benchmark's figures."""
    width = max((len(str(k)) for k in figures), default=10)
    lines = [f"omnilab bench {name}", "-" * (width + 24)]
    for key, value in figures.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, dict):
            text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
        else:
            text = str(value)
        lines.append(f"{str(key):<{width}}  {text}")
    return "\n".join(lines)


def repeated(runs: list[dict]) -> dict:
    """The figures of several runs of one bench as one: each number as its min / median / max over
    the runs (a shared machine's load moves single runs by 2-3x), anything else as the first run's."""
    out = {"runs": len(runs)}
    for key, value in runs[0].items():
        values = [run.get(key) for run in runs]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numbers and len(runs) > 1:
            out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        elif all(isinstance(v, bool) for v in values) and len(runs) > 1:
            out[key] = f"{sum(values)}/{len(values)}"
        else:
            out[key] = value
    return out
