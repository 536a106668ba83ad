"""JSON as the tool reads it: strict RFC 8259 (NaN / Infinity are refused, as the tool never
writes them), so a manifest that parses is one the tool can also hash and rewrite."""
from __future__ import annotations

import json


def _reject_constant(name):
    raise ValueError(f"non-finite number {name} in JSON")


def loads_finite(text: str):
    """json.loads without NaN / Infinity (ValueError, like any other malformed JSON)."""
    return json.loads(text, parse_constant=_reject_constant)
