"""An engine run in a child process (`--engine-process child`; the default for the real
engines): the tool's process keeps the reference and the verdict, the child runs the engine
(engines/child_main.py) under the supervisor (engines/child.py) and hands its capture over as
files. A finished child's capture is read lazily from its dump (one point in memory at a time);
a child that died raises `EngineCrashed` with the crash record and the sequences it delivered."""
from __future__ import annotations

import os
import pickle
import shutil
import threading
from pathlib import Path

import torch

from corruptcheck.cases import Case
from corruptcheck.engines import child
from corruptcheck.engines.base import Capture, Engine, EngineWrapper
from corruptcheck.engines.progress import parse_crash
from corruptcheck.errors import BadInput, EngineCrashed

PROCESSES = ("auto", "child", "inline")


def wants_child(engine: Engine, engine_name: str, process: str, crash=None) -> bool:
    """Run it in a child? `child` / `inline` say so; `auto`: the engines that declare
    `runs_in_child` (vllm, sglang, trtllm), or any engine given an injected crash."""
    if process not in PROCESSES:
        raise BadInput(f"engine process must be one of {', '.join(PROCESSES)}, not {process!r}")
    if process == "inline":
        if crash:
            raise BadInput("crash=... is injected into the engine's child process; it needs --engine-process "
                           "child or auto")
        return False
    if process == "child" or crash:
        return True
    # auto: a registered real engine (an engine object of another class, e.g. a fault wrapper or a
    # test's subclass, cannot be rebuilt in a child from its name: it stays in this process)
    return bool(getattr(engine, "runs_in_child", False)) and type(engine) is _registered(engine_name)


def _registered(name: str):
    from corruptcheck.engines import engine_class
    try:
        return engine_class(name)
    except BadInput:
        return None


class ChildEngine(EngineWrapper):
    """`inner` (an engine registered as `name`) run in a supervised child process."""

    def __init__(self, inner: Engine, name: str, limits: child.ChildLimits = child.ChildLimits(), crash=None):
        super().__init__(inner, name)
        if type(inner) is not _registered(name):
            raise BadInput(f"engine {name!r} is not a registered engine class; only those run in a child process "
                           "(use --engine-process inline)")
        try:
            self.limits, self.crash = limits, parse_crash(crash) if crash else None
        except ValueError as exc:
            raise BadInput(f"engine option crash={crash!r}: {exc}") from None
        if self.crash and self.crash[0] == "oom" and not limits.memory_gib:
            raise BadInput("crash=oom grows memory until the bound: give --engine-memory GIB")
        self.workdir: Path | None = None
        self.process: dict = {}
        self._thread: threading.Thread | None = None
        self._outcome = None
        self._pgid: int | None = None

    def _started(self, pgid: int) -> None:
        self._pgid = pgid

    def start(self, case: Case, precision: str, schedule=None, **options) -> None:
        """Start the child and return at once (the tool's process can load the reference while
        the child starts and runs); `run` with the same arguments then waits for it."""
        self.close()
        child.install_handlers()  # from this (main) thread; the supervisor polls on another
        self._outcome = None

        def work():
            try:
                self._outcome = ("capture", self._run(case, precision, schedule, **options))
            except BaseException as exc:  # noqa: BLE001 - re-raised by run() in the caller's thread
                self._outcome = ("raised", exc)
        self._thread = threading.Thread(target=work, name="corruptcheck-engine-supervisor", daemon=True)
        self._thread.start()

    def run(self, case: Case, precision: str, schedule=None, **options) -> Capture:
        if self._thread is None:
            self.start(case, precision, schedule, **options)
        self._thread.join()
        self._thread = None
        what, value = self._outcome
        if what == "raised":
            raise value
        return value

    def _run(self, case: Case, precision: str, schedule=None, **options) -> Capture:
        self.workdir = child.new_workdir()
        lens = case.seq_lens if schedule is None else schedule.prompt_lens
        job = {"engine": self.name, "case": case, "precision": precision, "schedule": schedule, "options": options,
               "parent": os.getpid(), "crash": self.crash, "target_sequence": 1 if len(lens) > 1 else 0,
               "memory_cap": int(2 * self.limits.memory_gib * (1 << 30)) if self.limits.memory_gib else None}
        try:
            blob = pickle.dumps(job)
        except (pickle.PicklingError, TypeError, AttributeError) as exc:
            raise BadInput(f"engine options cannot be handed to a child process ({exc}); "
                           "use --engine-process inline") from None
        (self.workdir / "job.pkl").write_bytes(blob)
        end = child.supervise(child.python_argv("corruptcheck.engines.child_main", str(self.workdir)), self.workdir,
                              self.limits, child.child_env(), started=self._started)
        self.process = {"mode": "child", "pid": end.pid, "wall_s": round(end.wall_s, 3),
                        "peak_rss_mib": round(end.peak_rss_bytes / (1 << 20), 1), "phase": end.phase}
        if not end.finished:
            crash = {**end.crash, "exit_code": end.returncode, "pid": end.pid, "wall_s": round(end.wall_s, 3),
                     "peak_rss_mib": self.process["peak_rss_mib"], "stderr_tail": end.stderr_tail}
            raise EngineCrashed(crash, self._partial(precision), self.name)
        done = child.read_json(self.workdir / child.DONE) or {}
        if done.get("not_injected"):  # e.g. crash=...@decode on a prefill-only run: said, not an error
            kind, phase = done["not_injected"]
            self.process["injected_crash"] = (f"crash={kind}@{phase} not reached: the run never entered phase "
                                              f"{phase!r}")
        from corruptcheck.schedule import decoded_case
        from corruptcheck.storage.dump import load_dump, read_manifest

        dump = self.workdir / "capture"
        manifest = read_manifest(dump)
        meta = dict((manifest.get("engine") or {}).get("meta") or {})
        served = meta.get("served")
        points, _ = load_dump(dump, decoded_case(case, served["sequences"]) if served else case)
        meta["process"] = self.process
        return Capture(points, manifest["engine"].get("name", self.name), manifest["precision"], meta)

    def _partial(self, precision) -> dict | None:
        """The sequences the child delivered before it died, in order."""
        from safetensors.torch import load_file

        parts = sorted((self.workdir / "parts").glob("seq-*.json"))
        rows, sequences, labels = [], [], []
        for meta_path in parts:
            doc = child.read_json(meta_path)
            tensors = meta_path.with_suffix(".safetensors")
            if doc is None or not tensors.exists():
                break
            rows.append(load_file(str(tensors)))
            sequences.append(doc["sequence"])
            labels.append(doc.get("labels"))
        if not rows:
            return None
        points = {n: torch.cat([r[n] for r in rows if n in r], 0) for n in rows[0]}
        return {"points": points, "sequences": sequences,
                "labels": [tuple(x) for lab in labels for x in lab] if all(labels) else None,
                "precision": precision or "float32"}

    def close(self) -> None:
        """Stop a child still running (the compare gave up: bad input, an error of its own) and
        remove the work directory (after the compare has read what it needs)."""
        if self._thread is not None:
            if self._pgid is not None:
                child.kill_group(self._pgid)
            self._thread.join()
            self._thread = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
