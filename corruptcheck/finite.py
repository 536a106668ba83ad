"""Non-finite numbers in results: JSON has no NaN / Infinity, so reports store them as null
(`finite_or_none`), and text renders them with the renderer's own marks (`fmt_number`)."""
from __future__ import annotations

import math


def finite_or_none(v):
    """None for a non-finite float (and for None); any other value unchanged."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def finite_values(table: dict) -> dict:
    """The table with every non-finite float replaced by None."""
    return {k: finite_or_none(v) for k, v in table.items()}


def fmt_number(v, spec: str = ".3g", none: str = "-", nonfinite: str | None = None) -> str:
    """`v` formatted with `spec`; `none` for None, `nonfinite` (default: `none`) for NaN / Inf."""
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return none if nonfinite is None else nonfinite
    return format(v, spec)
