"""What an engine run reports while it runs, for the supervisor of an engine child
(engines/child.py): the phase it is in (model load, prefill chunk J of sequence I, decode step K,
forward pass N) and the sequences whose capture is complete (streamed to disk as they complete,
so a run cut short still hands over what it did). In the tool's own process nothing listens and
every call is a no-op.

Also the test-only fault injection of `--engine-option crash=KIND@PHASE`: the child arms it, and
the engine dies that way when it first enters PHASE in the target sequence (the second one of the
run where there are two or more: "in the middle of prefill" has a sequence delivered before it)."""
from __future__ import annotations

import ctypes
import os
import threading
import time

CRASH_KINDS = ("segv", "abort", "raise", "hang", "oom", "exit0")
CRASH_PHASES = ("load", "prefill", "decode", "forward")


class InjectedFault(RuntimeError):
    """crash=raise: an exception raised inside the engine's run (as a failing kernel raises)."""


def parse_crash(value) -> tuple[str, str]:
    """'segv@prefill' -> ("segv", "prefill"); ValueError when it is not KIND@PHASE."""
    kind, sep, phase = str(value).partition("@")
    if not sep or kind not in CRASH_KINDS or phase not in CRASH_PHASES:
        raise ValueError(f"expected KIND@PHASE, KIND one of {'|'.join(CRASH_KINDS)}, "
                         f"PHASE one of {'|'.join(CRASH_PHASES)}")
    return kind, phase


class _State:
    sink = None  # object with .phase(text, kind) and .deliver(rows, sequence, labels)
    crash: tuple | None = None  # (kind, phase, target sequence)
    sequence = 0  # the sequence the engine is in (hf runs them one at a time)
    fired = False
    memory_cap: int | None = None  # bytes: crash=oom never grows past this (the bound, twice)


def listen(sink, crash: tuple[str, str] | None = None, target_sequence: int = 0, memory_cap: int | None = None) -> None:
    """Install the child's sink (and arm an injected crash at (kind, phase))."""
    _State.sink, _State.fired, _State.memory_cap = sink, False, memory_cap
    _State.crash = (*crash, target_sequence) if crash else None


def active() -> bool:
    return _State.sink is not None


def injected_pending() -> tuple | None:
    """The armed crash that never fired (the run never entered its phase), else None."""
    return _State.crash if _State.crash and not _State.fired else None


def phase(kind: str, sequence: int | None = None, **where) -> None:
    """The engine enters a phase: kind load | prefill | decode | forward | run | write, with
    where it is (chunk=J, step=K, pass=N)."""
    if _State.sink is None:
        return
    if sequence is not None:
        _State.sequence = sequence
    parts = [kind] + ([f"sequence {_State.sequence}"] if kind in ("prefill", "decode") else [])
    parts += [f"{k} {v}" for k, v in where.items()]
    text = parts[0] + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    _State.sink.phase(text, kind)
    crash = _State.crash
    if crash and not _State.fired and kind == crash[1] and (kind not in ("prefill", "decode")
                                                           or _State.sequence >= crash[2]):
        _State.fired = True
        _fire(crash[0], text)


def deliver(rows: dict, sequence: list[int], labels: list | None = None) -> None:
    """One sequence's capture is complete: its canonical rows ({point: [rows, ...]}), the token
    ids it ran (prompt and decoded) and, in a served run, the (phase, index) of every row."""
    if _State.sink is not None:
        _State.sink.deliver(rows, sequence, labels)


def _fire(kind: str, where: str) -> None:
    """Die the way engines do. Each is what a real engine failure looks like from outside."""
    if kind == "segv":  # a kernel reading address 0
        ctypes.string_at(0)
    elif kind == "abort":  # a failed C++ check (TORCH_CHECK in a C++ kernel aborts the process)
        os.abort()
    elif kind == "raise":
        raise InjectedFault(f"injected fault: a kernel raised in {where} (crash=raise)")
    elif kind == "hang":  # a scheduler deadlock: alive, no progress
        threading.Event().wait()
    elif kind == "exit0":  # a worker that returns 0 before finishing
        os._exit(0)
    elif kind == "oom":  # memory growth until the bound (or the kernel's OOM killer) ends it
        held, step = [], 64 << 20
        cap = _State.memory_cap or (8 << 30)
        while sum(len(b) for b in held) < cap:
            buf = bytearray(step)
            buf[::4096] = b"\x01" * len(range(0, step, 4096))  # touch every page: resident, not reserved
            held.append(buf)
            time.sleep(0.01)
        os._exit(137)  # never reached under a bound: the supervisor kills it first
