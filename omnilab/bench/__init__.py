"""Benchmarks: `omnilab bench NAME`. Each module has `run(**options) -> dict` of figures."""

from __future__ import annotations


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
