"""Timing helpers shared by the bench sections: best-of-N wall time, peak RSS of a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys
import time


def best_of(fn, repeat: int = 3) -> float:
    """The fastest of `repeat` runs of fn() (seconds): the least disturbed by the machine."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def child_json(code: str) -> dict:
    """Run `code` in a fresh interpreter (its own peak RSS); it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"
