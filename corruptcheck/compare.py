"""compare: run the reference (float64) and an engine on a case, diff every point."""
from __future__ import annotations

import time
from dataclasses import dataclass

from corruptcheck.cases import Case
from corruptcheck.coverage import coverage
from corruptcheck.differ import Comparison, compare_points
from corruptcheck.engines import Capture, get_engine
from corruptcheck.golden import ReferenceData, reference_for
from corruptcheck.points import capture_points
from corruptcheck.reference import REFERENCE_VERSION, Precision, run


@dataclass
class CompareResult:
    case: Case
    engine: str
    precision: str
    comparison: Comparison
    coverage: dict
    reference: dict
    engine_meta: dict
    timings: dict

    @property
    def verdict(self) -> str:
        return self.comparison.verdict


def reference_run(case: Case):
    """Compute the float64 reference now: (points, coverage)."""
    res = run(case.config, case.params(), case.sequences(), "float64")
    return res.points, coverage(case.config, res.stats, case.seq_lens)


def compare(case: Case, engine_name: str, precision: str, use_golden: bool = True, **engine_options) -> CompareResult:
    precision = Precision.of(precision).name
    engine = get_engine(engine_name)
    t0 = time.perf_counter()
    ref = reference_for(case) if use_golden else ReferenceData(*reference_run(case), "computed (--no-golden)")
    ref_points, cov = ref.points, ref.coverage
    t1 = time.perf_counter()
    cap: Capture = engine.run(case, precision, **engine_options)
    t2 = time.perf_counter()
    comp = compare_points(capture_points(case.config), ref_points, cap.points, precision, cov)
    t3 = time.perf_counter()
    return CompareResult(
        case=case, engine=engine_name, precision=precision, comparison=comp, coverage=cov,
        reference={"version": REFERENCE_VERSION, "precision": "float64", "source": ref.source,
                   "golden_digest": ref.digest},
        engine_meta=cap.meta,
        timings={"reference_s": t1 - t0, "engine_s": t2 - t1, "diff_s": t3 - t2},
    )
