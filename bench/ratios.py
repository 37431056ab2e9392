"""Paired per-round ratios: how two programs measured in the same interleaved rounds
compare on a machine whose speed drifts between rounds.

Round i of program a and round i of program b ran back to back, so a[i] / b[i] saw the
same machine; the median of those ratios and their interquartile range say more than
a ratio of medians when the machine swings by 2x within seconds. The same pairing
gives per-round differences (ns per packet of two program variants).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs`` (inclusive method: the
    quartiles of a single value are that value)."""
    if not xs:
        raise ValueError("no values")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | list[float]]:
    """Per-round ratios a[i] / b[i] of two programs' rates (rounds where b is 0 skipped):
    their median, quartiles ("q1", "q3"), the ratio of the two best rounds ("best":
    max(a) / max(b), each program at its least disturbed), "n" and the ratios."""
    if len(a) != len(b):
        raise ValueError(f"unpaired rounds: {len(a)} against {len(b)}")
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    if not ratios:
        raise ValueError("no round with a non-zero base")
    q1, med, q3 = quartiles(ratios)
    return {"median": med, "q1": q1, "q3": q3, "best": max(a) / max(b), "n": len(ratios),
            "ratios": ratios}


def paired_differences(a: Sequence[float], b: Sequence[float]) -> dict[str, float | int | list[float]]:
    """Per-round differences a[i] - b[i] (e.g. ns per packet of two program variants):
    their median, quartiles ("q1", "q3"), "n" and the differences."""
    if len(a) != len(b):
        raise ValueError(f"unpaired rounds: {len(a)} against {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    q1, med, q3 = quartiles(diffs)
    return {"median": med, "q1": q1, "q3": q3, "n": len(diffs), "differences": diffs}


__all__ = ["paired_differences", "paired_ratios", "quartiles"]
