"""Intervals for rates: how sure a share of right answers out of n is.

Wilson, E. B. (1927), "Probable inference, the law of succession, and statistical inference".
"""

from __future__ import annotations

import math

__all__ = ["rate", "wilson"]


def wilson(right: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a share of `right` out of `n`."""
    if n <= 0:
        raise ValueError(f"a share needs at least one trial; got n={n}")
    if not 0 <= right <= n:
        raise ValueError(f"right must lie in 0..n; got {right} of {n}")
    share = right / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(hits) -> dict:
    """{n, right, rate, low, high} of a list of booleans: the share right with its 95% Wilson interval."""
    hits = [bool(h) for h in hits]
    low, high = wilson(sum(hits), len(hits))
    return {"n": len(hits), "right": sum(hits), "rate": sum(hits) / len(hits), "low": low, "high": high}
