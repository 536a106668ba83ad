"""Engines by name. Built-ins here; third-party engines join through the entry-point group
`corruptcheck.engines` (an `Engine` subclass)."""
from __future__ import annotations

from importlib.metadata import entry_points

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.errors import BadInput, EngineUnavailable


def _builtin() -> dict:
    from corruptcheck.engines.hf_engine import HFEngine
    from corruptcheck.engines.reference_engine import ReferenceEngine

    return {e.name: e for e in (ReferenceEngine, HFEngine)}


def engines() -> dict:
    found = _builtin()
    for ep in entry_points(group="corruptcheck.engines"):
        if ep.name not in found:
            found[ep.name] = ep
    return found


def get_engine(name: str) -> Engine:
    found = engines()
    if name not in found:
        raise BadInput(f"unknown engine {name!r}; known engines: {', '.join(sorted(found))}")
    obj = found[name]
    cls = obj.load() if hasattr(obj, "load") else obj
    engine = cls()
    ok, why = engine.available()
    if not ok:
        hint = f"; install it with: pip install 'corruptcheck[{engine.extra}]'" if engine.extra else ""
        raise EngineUnavailable(f"engine {name!r} is not available: {why}{hint}")
    return engine


__all__ = ["Capture", "Engine", "engines", "get_engine"]
