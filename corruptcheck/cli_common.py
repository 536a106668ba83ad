"""What every command shares: the one-line error that ends a run with exit 2, and recording a run
in the results store."""
from __future__ import annotations

import sys

import click


def fail(msg: str) -> None:
    """Print `corruptcheck: error: msg` to stderr and exit 2 (bad input, engine unavailable)."""
    click.echo(f"corruptcheck: error: {msg}", err=True)
    sys.exit(2)


def record(path: str, write) -> None:
    """Record a run in the results store: write(store module) -> (run id, new). One line on
    stderr; a bad store is one error line and exit 2."""
    from corruptcheck import store
    from corruptcheck.errors import BadInput

    try:
        run_id, new = write(store)
    except BadInput as exc:
        fail(str(exc))
    click.echo(f"recorded run {run_id[:10]} in {path}" + ("" if new else " (already there)"), err=True)


def check_store(path: str) -> None:
    """Refuse a results store that cannot be used before any work starts."""
    from corruptcheck import store
    from corruptcheck.errors import BadInput

    try:
        store.check(path)
    except BadInput as exc:
        fail(str(exc))
