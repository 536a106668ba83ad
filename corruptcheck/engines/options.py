"""Engine settings given as text (`--engine-option KEY=VALUE`, `--corruptcheck-engine-option`):
each engine declares the ones it takes with a parser, and they are checked before the engine
starts, so a typo or a bad value is one line and exit 2 — never silently ignored, never a
traceback minutes into a launch."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from corruptcheck.errors import BadInput


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[Any], Any]  # text (or an already-typed value from the API) -> value; ValueError when bad
    help: str
    repeatable: bool = False  # given more than once -> a list


def positive_int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ValueError("expected a positive integer")
    try:
        n = int(v) if isinstance(v, int) else int(v.strip(), 10)
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


def positive_float(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("expected a positive number")
    try:
        x = float(v)
    except ValueError:
        raise ValueError("expected a positive number") from None
    if not math.isfinite(x) or x <= 0:
        raise ValueError("expected a positive finite number")
    return x


def fraction(v) -> float:
    x = positive_float(v)
    if x > 1:
        raise ValueError("expected a fraction in (0, 1]")
    return x


def boolean(v) -> bool:
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def text(v) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError("expected non-empty text")
    return v


def one_of(*values: str) -> Callable[[Any], str]:
    def parse(v) -> str:
        if v not in values:
            raise ValueError(f"expected one of {', '.join(values)}")
        return v
    return parse


def parse_options(engine_name: str, declared, raw: dict) -> dict:
    """Check `raw` ({key: value or [values]}) against an engine's declared options."""
    known = {o.name: o for o in declared}
    out = {}
    for key, value in raw.items():
        opt = known.get(key)
        if opt is None:
            names = ", ".join(sorted(known)) or "none"
            raise BadInput(f"engine {engine_name!r} has no option {key!r} (its options: {names})")
        values = value if isinstance(value, list) else [value]
        if len(values) > 1 and not opt.repeatable:
            raise BadInput(f"engine option {key} given {len(values)} times; it takes one value")
        parsed = []
        for v in values:
            try:
                parsed.append(opt.parse(v))
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadInput(f"engine option {key}={v!r}: {exc} ({opt.help})") from None
        out[key] = parsed if opt.repeatable else parsed[0]
    return out


def crash_spec(v) -> str:
    from corruptcheck.engines.progress import parse_crash

    parse_crash(v)
    return str(v)


# options every engine takes (handled by compare, not by the engine's run)
COMMON = (Option("crash", crash_spec, "test only: the engine's child process dies as KIND@PHASE, KIND "
                                      "segv|abort|raise|hang|oom|exit0, PHASE load|prefill|decode|forward"),)
