"""Errors that end a run with exit code 2 and one clear line."""


class BadInput(Exception):
    """Input the tool cannot judge: unknown names, wrong shapes/dtypes, corrupt files."""


class EngineUnavailable(Exception):
    """The engine cannot run here (not installed, wrong platform)."""
