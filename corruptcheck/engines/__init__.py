"""Engines by name, discovered through the entry-point group `corruptcheck.engines` (the
built-ins register there too, see pyproject.toml). An engine can also be named by import path,
`package.module:ClassName`, e.g. for an engine defined in a project's own test suite."""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.errors import BadInput, EngineUnavailable

GROUP = "corruptcheck.engines"
# used when the package metadata is not installed (e.g. running from a source tree)
_FALLBACK = {
    "reference": "corruptcheck.engines.reference_engine:ReferenceEngine",
    "hf": "corruptcheck.engines.hf_engine:HFEngine",
    "dump": "corruptcheck.engines.dump_engine:DumpEngine",
    "llamacpp": "corruptcheck.engines.llamacpp_engine:LlamaCppEngine",
}


def engines() -> dict[str, str]:
    """name -> "module:Class" for every registered engine."""
    found = {ep.name: ep.value for ep in entry_points(group=GROUP)}
    for name, target in _FALLBACK.items():
        found.setdefault(name, target)
    return dict(sorted(found.items()))


def _load(target: str):
    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise BadInput(f"cannot load engine {target!r}: {exc}") from None
    if not (isinstance(obj, type) and issubclass(obj, Engine)):
        raise BadInput(f"{target!r} is not a corruptcheck Engine subclass")
    return obj


def engine_class(name: str):
    registry = engines()
    if name in registry:
        return _load(registry[name])
    if ":" in name:
        return _load(name)
    raise BadInput(f"unknown engine {name!r}; known engines: {', '.join(registry)}")


def install_hint(engine: Engine) -> str:
    """The pip command that would make an unavailable engine available, or "" (no extra, or
    installed already and unable to run here)."""
    return f"pip install 'corruptcheck[{engine.extra}]'" if engine.extra and not engine.installed() else ""


def get_engine(name: str) -> Engine:
    engine = engine_class(name)()
    ok, why = engine.available()
    if not ok:
        hint = install_hint(engine)
        raise EngineUnavailable(f"engine {name!r} is not available: {why}" + (f"; install it with: {hint}" if hint else ""))
    return engine


__all__ = ["Capture", "Engine", "engines", "engine_class", "get_engine", "install_hint", "GROUP"]
