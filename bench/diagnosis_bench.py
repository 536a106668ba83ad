"""The diagnosis measured over the self-test (docs/diagnosis.md §Measured): every fault of
`faults_for(engine)` on each case and precision where it fires, compared with the diagnosis on.

- top-1: the injected fault's hypothesis is named first and explains the engine (within noise);
- unexplained: no hypothesis explains it; wrong: another hypothesis is claimed;
- left out: the same runs with the fault's own hypothesis removed from the registry: any claim
  is a false one;
- honest: every honest variant with `--diagnose always`: any claim is a false one;
- the extra wall time of a failing compare with the diagnosis on.

    python -m bench.diagnosis_bench [--cases tiny] [--precisions float32,bfloat16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

from corruptcheck.cases import get_case
from corruptcheck.faults import faults_for
from corruptcheck.judge.hypotheses import HYPOTHESES, hypotheses_for
from corruptcheck.selftest.benign import benign_for
from corruptcheck.selftest.runner import benign_run, fault_run


def _claim(diagnosis) -> str | None:
    return next((d.hypothesis for d in diagnosis or [] if d.explains), None)


def fault_rows(engine: str, cases, precisions, left_out: bool) -> list[dict]:
    rows = []
    for case_name in cases:
        case = get_case(case_name)
        for prec in precisions:
            for name, fault in faults_for(engine).items():
                without = (name,) if left_out else ()
                t0 = time.perf_counter()
                row, res = fault_run(case, engine, fault, prec, diagnose="on-fail",
                                     hypotheses=hypotheses_for(without=without))
                if res is None or not row.fired or res.report.diagnosis is None:
                    continue
                d = res.report.diagnosis
                claim = _claim(d)
                top = d[0] if d else None
                own = next((e for e in d if e.hypothesis == name), None)
                rows.append({"fault": name, "case": case_name, "precision": prec, "culprit": row.culprit,
                             "has_hypothesis": name in HYPOTHESES, "left_out": left_out,
                             "claimed": claim, "first": top.hypothesis if top else None,
                             "params": top.params if top else None,
                             "residual_ratio": top.residual_ratio if top else None,
                             "reference_ratio": top.reference_ratio if top else None,
                             "own_residual_ratio": own.residual_ratio if own else None,
                             "seconds": time.perf_counter() - t0, "diagnose_s": res.report.timings.get("diagnose_s")})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def honest_rows(engine: str, cases) -> list[dict]:
    rows = []
    for case_name in cases:
        case = get_case(case_name)
        for variant in benign_for(engine).values():
            if engine not in variant.engines:
                continue
            row, res = benign_run(case, engine, variant, diagnose="always")
            if res is None:
                continue
            d = res.report.diagnosis or []
            rows.append({"variant": variant.name, "case": case_name, "precision": variant.precision,
                         "verdict": res.report.verdict, "claimed": _claim(d), "first": d[0].hypothesis if d else None,
                         "residual_ratio": d[0].residual_ratio if d else None,
                         "reference_ratio": d[0].reference_ratio if d else None})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summary(rows: list[dict], left: list[dict], honest: list[dict]) -> dict:
    scored = [r for r in rows if r["has_hypothesis"]]
    return {"runs": len(scored), "top1": sum(r["claimed"] == r["fault"] for r in scored),
            "first_named": sum(r["first"] == r["fault"] for r in scored),
            "unexplained": sum(r["claimed"] is None for r in scored),
            "wrong_claims": sum(r["claimed"] not in (None, r["fault"]) for r in scored),
            "left_out_runs": len(left), "left_out_false_claims": sum(r["claimed"] is not None for r in left),
            "honest_runs": len(honest), "honest_false_claims": sum(r["claimed"] is not None for r in honest)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", default="hf")
    ap.add_argument("--cases", default="tiny")
    ap.add_argument("--precisions", default="float32,bfloat16")
    ap.add_argument("--skip", default="", help="comma-separated: faults, left-out, honest")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    cases, precs, skip = args.cases.split(","), args.precisions.split(","), args.skip.split(",")
    rows = [] if "faults" in skip else fault_rows(args.engine, cases, precs, left_out=False)
    left = [] if "left-out" in skip else fault_rows(args.engine, cases, precs, left_out=True)
    honest = [] if "honest" in skip else honest_rows(args.engine, cases)
    out = {"summary": summary(rows, left, honest), "faults": rows, "left_out": left, "honest": honest}
    print(json.dumps(out["summary"]))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
