"""The supervisor of an engine child process: engine-agnostic, used for any command that runs an
engine out of the tool's process (docs/design.md §9.1).

`supervise(argv, workdir, limits)` starts the command in its own session (a process group the
supervisor can kill whole), polls it, and returns how it ended (`ChildEnd`): finished, or a crash
of one of these kinds:

* `signal`: killed by a signal it did not get from us (SIGSEGV, SIGABRT, SIGBUS, ...), named;
* `oom`: its process tree's resident memory went over `memory_gib` (we kill the group), or the
  kernel's OOM killer took it (SIGKILL not sent by us, with the cgroup's oom_kill count raised
  or a peak near the bound);
* `timeout`: no progress for `timeout_s` (the phase file did not change): the group is killed;
* `exit`: a non-zero exit, or exit 0 without the completion marker, with its last stderr lines;
* `exception`: the child wrote an exception record (`exception.json`) before exiting.

Progress is the child's own: `progress.json` in the work directory (phase and a counter), written
whenever the engine enters a phase or delivers a sequence (engines/progress.py). The phase in it
is the crash's `phase`.

No orphans: the child runs with PR_SET_PDEATHSIG=SIGKILL (it dies with the parent, even a parent
killed by SIGKILL) and watches its parent itself (killing its own group when the parent is gone,
which takes its workers with it); the supervisor kills every live child group at exit and on
SIGTERM / SIGINT / SIGHUP. A work directory names its owner's pid; `sweep_stale()` removes those
whose owner is gone, so a re-run does not trip over a killed run's leftovers."""
from __future__ import annotations

import atexit
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRESS = "progress.json"
EXCEPTION = "exception.json"
DONE = "done.json"
OWNER = "owner.pid"
PREFIX = "corruptcheck-engine-"
STDERR = "stderr.txt"
POLL_S = 0.1
STDERR_LINES = 12
KINDS = ("signal", "oom", "timeout", "exit", "exception")
# before its first progress mark the child is importing Python, torch and the engine package:
# it gets at least this long, however short --engine-timeout is
STARTUP_S = 120.0

_LIVE: dict[int, subprocess.Popen] = {}  # pgid -> child, killed at exit


@dataclass(frozen=True)
class ChildLimits:
    timeout_s: float | None = None  # no progress for this long: killed, crash kind "timeout"
    memory_gib: float | None = None  # the process tree's RSS over this: killed, crash kind "oom"


@dataclass
class ChildEnd:
    """How a child ended. `crash` is None when it finished (completion marker written), else
    {"kind", "detail", "phase"}."""
    crash: dict | None
    returncode: int | None
    pid: int
    wall_s: float
    peak_rss_bytes: int
    phase: str | None
    stderr_tail: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.crash is None


def new_workdir() -> Path:
    """A fresh work directory for one child run (after removing stale ones)."""
    sweep_stale()
    d = Path(tempfile.mkdtemp(prefix=PREFIX))
    (d / OWNER).write_text(str(os.getpid()))
    return d


def sweep_stale(root: str | None = None) -> list[Path]:
    """Remove work directories whose owning process is gone (a killed run's leftovers)."""
    removed = []
    for d in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            owner = int((d / OWNER).read_text())
        except (OSError, ValueError):
            owner = None
        if owner is not None and _alive(owner):
            continue
        if owner is None and time.time() - d.stat().st_mtime < 3600:
            continue  # being created right now, or not ours
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, doc: dict) -> None:
    """Atomically (the supervisor reads these while the child writes them)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, default=str))
    os.replace(tmp, path)


# -- process tree memory ---------------------------------------------------------------------

def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every process in the group (the child and any workers it started)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            fields_ = stat[stat.rindex(")") + 2:].split()
            if int(fields_[2]) != pgid:  # field 5: process group
                continue
            total += int(fields_[21]) * os.sysconf("SC_PAGE_SIZE")  # field 24: rss in pages
        except (OSError, ValueError, IndexError):
            continue
    return total


def _oom_kills() -> int | None:
    """The cgroup's oom_kill count (cgroup v2), or None where it cannot be read."""
    try:
        cg = Path("/proc/self/cgroup").read_text().strip().split("\n")[-1].split(":", 2)[-1]
        for line in Path(f"/sys/fs/cgroup{cg}/memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# -- cleanup -------------------------------------------------------------------------------

def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_all() -> None:
    for pgid in list(_LIVE):
        kill_group(pgid)
        _LIVE.pop(pgid, None)


_HANDLERS_INSTALLED = False


def install_handlers() -> None:
    """Kill live children at exit and on SIGTERM / SIGINT / SIGHUP (then the previous handler)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_kill_all)
    import threading
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            _kill_all()
            if callable(previous):
                return previous(signum, frame)
            if previous == signal.SIG_IGN:
                return None
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        try:
            signal.signal(sig, handler)
        except (ValueError, OSError):
            pass


def _preexec() -> None:
    """In the child between fork and exec (one async-signal-safe system call: the parent may
    have threads): write no core file. PR_SET_PDEATHSIG is set by the child itself (die_with_parent)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def die_with_parent(parent: int) -> None:
    """In the child: the kernel sends it SIGKILL when its parent dies (PR_SET_PDEATHSIG), even
    when its own threads are stuck; a parent already gone is caught by the recheck."""
    try:
        libc = __import__("ctypes").CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL)


# -- the supervisor --------------------------------------------------------------------------

def supervise(argv: list[str], workdir: Path, limits: ChildLimits = ChildLimits(), env: dict | None = None,
              started=None) -> ChildEnd:
    """Run `argv` as the engine child (its files in `workdir`) and return how it ended.
    `started(pgid)` is called once the child runs (a caller on another thread can kill_group it)."""
    install_handlers()
    workdir = Path(workdir)
    err = open(workdir / STDERR, "wb")
    bound = int(limits.memory_gib * (1 << 30)) if limits.memory_gib else None
    oom_before = _oom_kills()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_preexec, env=env, close_fds=True)
    _LIVE[proc.pid] = proc
    err.close()
    if started is not None:
        started(proc.pid)
    pgid, peak, killed_for, last_change, last_seen, phase = proc.pid, 0, None, t0, None, None
    try:
        while True:
            rc = proc.poll()
            rss = group_rss_bytes(pgid)
            peak = max(peak, rss)
            prog = read_json(workdir / PROGRESS)
            if prog is not None:
                phase = prog.get("phase", phase)
                if prog.get("n") != last_seen:
                    last_seen, last_change = prog.get("n"), time.monotonic()
            if rc is not None:
                break
            if bound and rss > bound:
                killed_for = ("oom", f"resident memory {rss / (1 << 30):.2f} GiB over the --engine-memory bound "
                                     f"{limits.memory_gib:g} GiB; killed")
            elif limits.timeout_s and time.monotonic() - last_change > (
                    limits.timeout_s if last_seen is not None else max(limits.timeout_s, STARTUP_S)):
                waited = limits.timeout_s if last_seen is not None else max(limits.timeout_s, STARTUP_S)
                killed_for = ("timeout", f"no progress for {waited:g} s (--engine-timeout); killed")
            if killed_for:
                kill_group(pgid)
                proc.wait()
                break
            time.sleep(POLL_S)
    finally:
        kill_group(pgid)  # workers it left behind go with it
        _LIVE.pop(pgid, None)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wall = time.monotonic() - t0
    done = read_json(workdir / DONE) or {}
    peak = max(peak, int(done.get("peak_rss_bytes") or 0))  # its own count (the poll can miss a spike)
    prog = read_json(workdir / PROGRESS) or {}
    phase = prog.get("phase", phase)
    tail = _tail(workdir / STDERR)
    crash = _classify(proc.returncode, killed_for, workdir, tail, peak, bound, oom_before, phase)
    return ChildEnd(crash, proc.returncode, proc.pid, wall, peak, phase, tail)


def _tail(path: Path, n: int = STDERR_LINES) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [ln for ln in lines if ln.strip()][-n:]


def _native_where(path: Path) -> str:
    """'; Fatal Python error: ... at File "x.py", line N in f': what faulthandler printed for a
    native crash (the innermost Python frame of the thread that crashed), or the last line."""
    try:
        lines = path.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return ""
    fatal = next((ln.strip() for ln in lines if ln.startswith("Fatal Python error")), None)
    i = next((k for k, ln in enumerate(lines) if ln.startswith("Current thread") and k + 1 < len(lines)), None)
    frame = lines[i + 1].strip() if i is not None else None
    if fatal or frame:
        return "; " + "; ".join(x for x in (fatal, f"at {frame}" if frame else None) if x)
    rest = [ln for ln in lines if ln.strip() and not ln.startswith("Extension modules")]
    return f"; last output: {rest[-1].strip()}" if rest else ""


def _classify(rc: int | None, killed_for, workdir: Path, tail: list, peak: int, bound: int | None,
              oom_before: int | None, phase: str | None) -> dict | None:
    def crash(kind, detail):
        return {"kind": kind, "detail": detail, "phase": phase or "start"}

    if killed_for:
        return crash(*killed_for)
    exc = read_json(workdir / EXCEPTION)
    if exc is not None:
        return crash("exception", f"{exc.get('type')}: {exc.get('message')}"
                                  + (f" at {exc['where']}" if exc.get("where") else ""))
    if rc is not None and rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if sig == signal.SIGKILL:
            after = _oom_kills()
            if (after is not None and oom_before is not None and after > oom_before) or \
                    (bound and peak > 0.8 * bound):
                return crash("oom", f"killed by SIGKILL from the kernel's OOM killer (peak resident memory "
                                    f"{peak / (1 << 30):.2f} GiB)")
        return crash("signal", f"killed by {name}{_native_where(workdir / STDERR)}")
    if rc:
        last = " | ".join(tail[-3:]) if tail else "no output"
        return crash("exit", f"exited with status {rc}: {last}")
    if read_json(workdir / DONE) is None:
        return crash("exit", "exited with status 0 without finishing the capture (no completion marker)")
    return None


def child_env() -> dict:
    """The child's environment: ours, with this package importable the way it is here."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONFAULTHANDLER", "1")  # a native crash leaves its Python stack in the tail
    return env


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
