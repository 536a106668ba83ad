"""Errors that end a run with exit code 2 and one clear line."""
from __future__ import annotations

import traceback
from pathlib import Path


def one_line(exc: BaseException) -> str:
    """'Type: first line of the message at file:line' (where it was raised)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}{': ' + first if first else ''}{where}"


class BadInput(Exception):
    """Input the tool cannot judge: unknown names, wrong shapes/dtypes, corrupt files."""


class EngineUnavailable(Exception):
    """The engine cannot run here (not installed, wrong platform)."""


class EngineFailed(Exception):
    """The engine itself raised while running the case: a result about the engine (it crashed),
    never a verdict on its numbers and never a defect of this tool."""


class EngineCrashed(EngineFailed):
    """The engine's process died (signal, out of memory, no progress, exit without finishing,
    an exception): `crash` = {"kind", "detail", "phase", ...}; `partial` = what it delivered
    before it died ({"points", "sequences", "labels", "precision"}), or None."""

    def __init__(self, crash: dict, partial: dict | None = None, engine: str = "engine"):
        self.crash, self.partial = crash, partial
        super().__init__(f"engine {engine!r} {crash_line(crash)}")


def crash_line(crash: dict) -> str:
    """The one reason line of a crash record."""
    return f"crashed ({crash.get('kind')}) in {crash.get('phase')}: {crash.get('detail')}"
