"""Errors that end a run with exit code 2 and one clear line."""


class BadInput(Exception):
    """Input the tool cannot judge: unknown names, wrong shapes/dtypes, corrupt files."""


class EngineUnavailable(Exception):
    """The engine cannot run here (not installed, wrong platform)."""


class EngineFailed(Exception):
    """The engine itself raised while running the case: a result about the engine (it crashed),
    never a verdict on its numbers and never a defect of this tool."""
