"""The one range check of a config number: finite and within its bounds, or a ValueError naming the field and
the value (`optim.eps=nan must be a finite value >= 0`). NaN fails every bound (it compares false), so a NaN
that a run would train on, or that would silence a guardrail, is refused here with the rest."""

from __future__ import annotations

import math


def check(field: str, value, low: float = 0, high: float = math.inf, *, low_ok: bool = True) -> float:
    """`value` as a float when low <= value <= high (low < value when not `low_ok`) and finite; else raises."""
    v = float(value)
    if not (math.isfinite(v) and (v >= low if low_ok else v > low) and v <= high):
        bound = f"in [{low}, {high}]" if math.isfinite(high) else f"a finite value {'>=' if low_ok else '>'} {low}"
        raise ValueError(f"{field}={value!r} must be {bound}")
    return v
