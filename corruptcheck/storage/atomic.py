"""Atomic file writes: a failed run never leaves a half-written file over a good one (reports,
goldens, caches, summaries)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_replace(path, write: Callable[[str], None]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one step
    (with the permissions a plain open() would give); on any failure the temporary is removed
    and `path` is untouched. Missing parent directories are created."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".corruptcheck-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_replace)."""
    atomic_replace(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(path) -> str | None:
    """Why `atomic_replace(path, ...)` would fail, or None: the path is a directory, or no file
    can be created where it would go (the nearest existing parent, since missing ones are
    created). Probed by creating and removing one temporary file there, so a run learns it before
    its work, not after."""
    target = Path(os.path.abspath(path))
    if target.is_dir():
        return "it is a directory"
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".corruptcheck-probe-")
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    os.unlink(tmp)
    return None
