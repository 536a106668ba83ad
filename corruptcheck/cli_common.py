"""What every command shares: the one-line error that ends a run with exit 2."""
from __future__ import annotations

import sys

import click


def fail(msg: str) -> None:
    """Print `corruptcheck: error: msg` to stderr and exit 2 (bad input, engine unavailable)."""
    click.echo(f"corruptcheck: error: {msg}", err=True)
    sys.exit(2)
