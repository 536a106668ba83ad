"""The engine in the tool's process or in a supervised child (docs/design.md §9.1): wall time of
one compare each way, and the peak RSS of the tool's process and of the engine child. Each run is
a fresh interpreter; inline and child runs alternate so a change in the machine's load hits both.

    python -m bench.engine_process_bench --engine hf --case tiny --repeat 3
"""
from __future__ import annotations

import argparse
import statistics

from bench.common import child_json

CODE = """
import json, resource, time
from corruptcheck.cases import get_case
from corruptcheck.compare import compare
t = time.perf_counter()
rep = compare(get_case({case!r}), {engine!r}, "float32", schedule={schedule!r}, engine_process={process!r}).report
wall = time.perf_counter() - t
proc = rep.engine_info.get("process") or {{}}
print(json.dumps({{"verdict": rep.verdict, "wall_s": wall, "engine_s": rep.timings["engine_s"],
                  "parent_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_peak_mib": proc.get("peak_rss_mib")}}))
"""


def measure(engine: str, case: str, schedule: str, repeat: int) -> dict:
    runs: dict = {"inline": [], "child": []}
    for _ in range(repeat):
        for process in ("inline", "child"):
            runs[process].append(child_json(CODE.format(case=case, engine=engine, schedule=schedule, process=process)))
    return runs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--case", default="tiny")
    ap.add_argument("--schedule", default="case", choices=("case", "prefill-only"))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args(argv)
    runs = measure(a.engine, a.case, a.schedule, a.repeat)
    for process, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        child = [r["child_peak_mib"] for r in rs if r["child_peak_mib"] is not None]
        print(f"{a.engine} {a.case} ({a.schedule}) {process:6s}: verdict {rs[0]['verdict']}, compare wall "
              f"median {statistics.median(walls):.2f} s (min {min(walls):.2f}, runs {len(walls)}), engine "
              f"{statistics.median(r['engine_s'] for r in rs):.2f} s, parent peak RSS "
              f"{max(r['parent_peak_mib'] for r in rs):.0f} MiB"
              + (f", child peak RSS {max(child):.0f} MiB" if child else ""))
    mi, mc = (statistics.median(r["wall_s"] for r in runs[p]) for p in ("inline", "child"))
    print(f"child / inline wall: {mc / mi:.3f}")


if __name__ == "__main__":
    main()
