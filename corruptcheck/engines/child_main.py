"""The engine child: `python -m corruptcheck.engines.child_main WORKDIR` runs one engine on one
case as WORKDIR/job.pkl says (written by engines/child_engine.py in the tool's process) and
hands the capture over as files:

* `progress.json`: the phase it is in and a counter, rewritten at every phase and delivery
  (the supervisor's measure of progress, engines/child.py);
* `parts/seq-NNNN.safetensors` + `.json`: each sequence's canonical rows as soon as the
  sequence is complete (engines that deliver per sequence: hf), so a run cut short is judged
  on what it delivered;
* `capture/`: the whole capture as a dump (docs/design.md §5), then `done.json` (the completion
  marker, with this process's peak RSS);
* `exception.json`: what the engine raised, when it raised (then exit 1).

It never reads the reference and holds no verdict: those are the parent's."""
from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from corruptcheck.engines import child, progress

PARTS = "parts"
CAPTURE = "capture"
JOB = "job.pkl"


class _Sink:
    def __init__(self, workdir: Path):
        self.workdir, self.n, self.delivered, self.base = workdir, 0, 0, "start"
        (workdir / PARTS).mkdir(exist_ok=True)

    def _write(self, text: str) -> None:
        self.n += 1
        child.write_json(self.workdir / child.PROGRESS,
                         {"phase": text, "n": self.n, "delivered": self.delivered, "t": time.time()})

    def phase(self, text: str, kind: str) -> None:
        if kind == "forward":  # a pass inside the phase the engine named, if it named one
            text = text if self.base in ("start", "run") else f"{self.base}, {text}"
        else:
            self.base = text
        self._write(text)

    def deliver(self, rows: dict, sequence: list, labels) -> None:
        from safetensors.torch import save_file

        from corruptcheck.storage.dump import _unshared

        stem = self.workdir / PARTS / f"seq-{self.delivered:04d}"
        tmp = stem.with_name(f".{stem.name}.tmp")
        save_file(_unshared(rows), str(tmp))
        os.replace(tmp, stem.with_suffix(".safetensors"))
        child.write_json(stem.with_suffix(".json"), {"sequence": [int(t) for t in sequence],
                                                    "labels": [list(x) for x in labels] if labels else None})
        self.delivered += 1
        self._write(self.base)


def _watch_parent(parent: int) -> None:
    """The parent is gone (killed): take this process group (the engine's workers) down."""
    while True:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.5)


def _plain(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=str))


def main(workdir: str) -> int:
    root = Path(workdir)
    job = pickle.loads((root / JOB).read_bytes())  # written by our own parent, never by an engine
    child.die_with_parent(job["parent"])
    threading.Thread(target=_watch_parent, args=(job["parent"],), daemon=True).start()
    sink = _Sink(root)
    progress.listen(sink, job.get("crash"), job.get("target_sequence", 0), job.get("memory_cap"))
    try:
        progress.phase("load")
        from corruptcheck.engines import engine_class

        engine = engine_class(job["engine"])()
        progress.phase("run")
        run_case = job["case"]
        cap = engine.run(run_case, job["precision"], **({"schedule": job["schedule"]} if job.get("schedule") else {}),
                         **job["options"])
        pending = progress.injected_pending()
        progress.phase("write")
        from corruptcheck.schedule import decoded_case
        from corruptcheck.storage.dump import write_dump

        served = cap.meta.get("served")
        dump_case = decoded_case(run_case, served["sequences"]) if served else run_case
        write_dump(cap.points, dump_case, root / CAPTURE, engine={"name": cap.engine, "meta": _plain(cap.meta)},
                   precision=cap.precision)
    except BaseException as exc:  # noqa: BLE001 - whatever the engine raised is the parent's result
        from corruptcheck.errors import one_line

        child.write_json(root / child.EXCEPTION, {
            "type": type(exc).__name__, "message": (str(exc).splitlines() or [""])[0][:300],
            "where": one_line(exc).rpartition(" at ")[2] if " at " in one_line(exc) else "",
            "traceback": traceback.format_exception(exc)[-6:]})
        traceback.print_exc()
        return 1
    child.write_json(root / child.DONE, {"points": len(cap.points), "engine": cap.engine,
                                         "not_injected": list(pending[:2]) if pending else None,
                                         "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
