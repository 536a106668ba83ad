"""compare: the reference (float64, from the golden when valid) against an engine on a case,
every point diffed with precision-aware tolerances, then localized by teacher forcing."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from corruptcheck.cases import Case
from corruptcheck.coverage import coverage
from corruptcheck.differ import Comparison, compare_points
from corruptcheck.engines import Capture, get_engine
from corruptcheck.golden import ReferenceData, reference_for
from corruptcheck.localize import attach, teacher_force
from corruptcheck.noise import measure
from corruptcheck.points import capture_points
from corruptcheck.reference import REFERENCE_VERSION, Precision, run

TEACHER_FORCING = ("on-fail", "always", "never")


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
    tolerance_precision: str = ""
    noise_source: str = ""
    culprit: dict | None = None
    teacher_forcing: str = "not run"
    extra: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return self.comparison.verdict


def reference_run(case: Case):
    """Compute the float64 reference now: (points, coverage)."""
    res = run(case.config, case.params(), case.sequences(), "float64")
    return res.points, coverage(case.config, res.stats, case.seq_lens)


def noise_for(case: Case, ref: ReferenceData, precision: str) -> tuple[dict | None, str]:
    """The noise model for `precision`: from the golden, else measured now (slower)."""
    if precision == "float64":
        return None, "float64: floor tolerance (exact engine)"
    if precision in ref.noise:
        return ref.noise[precision], "golden"
    return measure(case, ref.points, precision), "measured now (no golden noise model)"


def compare(case: Case, engine_name: str, precision: str, use_golden: bool = True,
            teacher_forcing: str = "on-fail", engine=None, **engine_options) -> CompareResult:
    precision = Precision.of(precision).name if precision else None  # None: the engine declares it
    engine = engine or get_engine(engine_name)
    # the engine first, then the reference: a real engine's memory is freed before the float64
    # reference of a wide case is loaded, so the peak is the larger of the two, not their sum
    t0 = time.perf_counter()
    cap: Capture = engine.run(case, precision, **engine_options)
    t1 = time.perf_counter()
    ref = reference_for(case) if use_golden else ReferenceData(*reference_run(case), "computed (--no-golden)")
    t2 = time.perf_counter()
    tol_prec = Precision.of(cap.precision).name
    noise, noise_source = noise_for(case, ref, tol_prec)
    t3 = time.perf_counter()
    comp = compare_points(capture_points(case.config), ref.points, cap.points, tol_prec, ref.coverage, noise,
                          cap.meta.get("capture", {}).get("skipped"))
    culprit, tf = None, "not run"
    if teacher_forcing == "always" or (teacher_forcing == "on-fail" and comp.verdict == "fail"):
        culprit = attach(comp, teacher_force(case, cap.points, tol_prec, noise))
        tf = "run"
    t4 = time.perf_counter()
    return CompareResult(
        case=case, engine=engine_name, precision=tol_prec, comparison=comp, coverage=ref.coverage,
        reference={"version": REFERENCE_VERSION, "precision": "float64", "source": ref.source,
                   "golden_digest": ref.digest},
        engine_meta=cap.meta,
        timings={"engine_s": t1 - t0, "reference_s": t2 - t1, "noise_s": t3 - t2, "diff_s": t4 - t3},
        tolerance_precision=tol_prec, noise_source=noise_source, culprit=culprit, teacher_forcing=tf,
    )
