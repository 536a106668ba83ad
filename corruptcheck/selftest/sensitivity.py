"""Minimum detectable effect (docs/faults.md §Magnitude knobs and minimum detectable effect):
for each fault family that fires on a case, the smallest magnitude m of its knob (`Fault.at`)
at which `compare` still flags the engine and localizes the fault, and the fault's effect there
in units of the honest noise at its strike point.

One clean engine run gives the clean capture and, at each point, the honest noise: the clean
engine's rel_l2 against the float64 reference. Each faulty run is `compare(...,
engine=FaultyEngine(...))` judged as the self-test judges it (`selftest.fault_run`): *detected*
= the verdict is fail and the teacher-forced culprit is one the fault accepts; *flagged* = the
verdict is fail. m = 1 first (not detected there: no MDE), then a bisection in log space between
M_LO and 1 for `steps` iterations; m* is the smallest detected magnitude it found, and

    MDE = effect(m*) / noise,   effect(m) = rel_l2(faulty capture at m, clean capture)

at the strike point that caught it: the culprit at m* (an expected point or documented
equivalent, at any layer where the fault fired; for a discrete point the next float point, as
the self-test's effect point). A fault striking several layers is often caught at a later one
when its magnitude is small. A family not detected at m = 1 is measured at the self-test's
effect point of the first layer where it fired. The honest
side: the benign variants that apply to the engine at this precision, and the clean run itself,
each with its worst err/tol.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from corruptcheck.selftest.benign import benign_for
from corruptcheck.cases import Case, get_case
from corruptcheck.compare import compare
from corruptcheck.engines import Capture, get_engine
from corruptcheck.engines.base import EngineWrapper
from corruptcheck.errors import BadInput
from corruptcheck.faults import Fault, faults_for
from corruptcheck.finite import finite_or_none
from corruptcheck.judge.metrics import float_metrics
from corruptcheck.selftest.runner import (ENGINE_OPTIONS, ENGINE_PRECISIONS, PRECISIONS, _effect_point, _exposed, _worst,
                                   fault_run, resolve, run_benign)
from corruptcheck.verdicts import SelftestStatus, Verdict

SENSITIVITY_SCHEMA = 1
M_LO = 1e-4  # the bisection's lower end
STEPS = 7  # bisection steps: the bracket [M_LO, 1] narrows to a factor 10^(4/2^7) = 1.07
# a variant running float64 except where the engine itself computes in float32 (transformers:
# mHC, norms, RoPE) is judged as float32 (HFEngine.run declares it so)
JUDGED_AS = {"float64": "float32"}


class _Recording(EngineWrapper):
    """`inner`, keeping the points of its last capture (the effect is taken against the clean
    capture). Same name as `inner`, so a fault patches it as it patches `inner`."""

    points: dict | None = None

    def run(self, case, precision: str, **options) -> Capture:
        cap = self.inner.run(case, precision, **options)
        self.points = cap.points
        return cap


@dataclass
class Step:
    """One faulty run at magnitude m."""
    m: float
    verdict: str | None
    flagged: bool
    localized: bool  # flagged, and the culprit is one the fault accepts: detected
    culprit: str | None
    effect: float | None  # rel_l2 of the faulty capture against the clean one at the family's point
    strike_ratio: float | None  # err/tol at that point
    worst_ratio: float | None  # the largest err/tol of the run
    worst_point: str | None
    seconds: float = 0.0
    caught_at: str | None = None  # the float strike point of an accepted culprit
    strikes: dict = field(default_factory=dict)  # every strike point -> (effect, err/tol); not in the JSON


@dataclass
class Family:
    family: str  # the fault's name
    klass: str
    knob: str
    point: str | None = None
    mde_noise_units: float | None = None
    detected_at: float | None = None  # m*: the smallest magnitude found detected
    localized: bool = False  # detected (flagged and localized) at m = 1, hence at m*
    flagged_at: float | None = None  # the smallest magnitude tried that the compare failed
    undetected_at: float | None = None  # the bisection's lower end: the largest m tried and not detected
    effect: float | None = None  # effect(m*)
    noise: float | None = None  # the clean engine's rel_l2 against the reference at the point
    note: str = ""
    steps: list = field(default_factory=list)  # Step, in the order run

    def to_json(self) -> dict:
        doc = {k: finite_or_none(v) for k, v in asdict(self).items() if k not in ("steps", "klass")}
        doc["class"] = self.klass
        doc["steps"] = [{k: finite_or_none(v) for k, v in asdict(s).items() if k != "strikes"} for s in self.steps]
        return doc


@dataclass
class Honest:
    variant: str
    worst_ratio: float | None
    worst_point: str | None
    note: str = ""


@dataclass
class SensitivityResult:
    engine: str
    case: str
    precision: str
    steps: int
    families: list = field(default_factory=list)  # Family
    honest: list = field(default_factory=list)  # Honest
    seconds: float = 0.0
    teacher_forcing: str = "on-fail"  # how each compare judged

    @property
    def honest_max_ratio(self) -> float | None:
        ratios = [h.worst_ratio for h in self.honest if h.worst_ratio is not None]
        return max(ratios, default=None)

    def to_json(self) -> dict:
        return {"schema": SENSITIVITY_SCHEMA, "engine": self.engine, "case": self.case, "precision": self.precision,
                "m_lo": M_LO, "steps": self.steps, "teacher_forcing": self.teacher_forcing,
                "families": [f.to_json() for f in self.families],
                "honest_max_ratio": finite_or_none(self.honest_max_ratio),
                "honest": [{k: finite_or_none(v) for k, v in asdict(h).items()} for h in self.honest],
                "seconds": self.seconds}


def _step(case: Case, engine: str, fault: Fault, precision: str, m: float, rec: _Recording, clean: dict,
          teacher_forcing: str = "on-fail"):
    """(Step, the self-test row) of the fault at magnitude m: its effect and err/tol at every
    strike point the self-test accepts, at every layer where it fired."""
    t0 = time.perf_counter()
    row, res = fault_run(case, engine, fault.at(m), precision, inner=rec, teacher_forcing=teacher_forcing)
    step = Step(m, row.verdict, row.verdict == Verdict.FAIL, bool(row.localized), row.culprit, None, None, None, None)
    if res is not None:
        points = {p.name: p for p in res.report.points}
        order = list(points)
        for cand in fault.accepted(row.expected, row.where, row.layers) if row.expected else []:
            ep = _effect_point(cand, order, points) if _exposed(points, cand) else None
            if ep and ep not in step.strikes:
                step.strikes[ep] = (float_metrics(rec.points[ep], clean[ep])["rel_l2"], points[ep].ratio)
            if step.localized and cand == row.culprit:
                step.caught_at = ep
        worst = _worst(res.report.points)
        if worst is not None:
            step.worst_ratio, step.worst_point = worst.ratio, worst.name
    step.seconds = time.perf_counter() - t0
    return step, row


def measure_family(case: Case, engine: str, fault: Fault, precision: str, rec: _Recording, clean: dict,
                   noise: dict, steps: int = STEPS, progress: Callable | None = None,
                   teacher_forcing: str = "on-fail") -> Family:
    """The family's MDE: m = 1, then `steps` bisection steps in log space over [M_LO, 1]."""
    fam = Family(fault.name, fault.klass, fault.knob)

    def run(m):
        step, row = _step(case, engine, fault, precision, m, rec, clean, teacher_forcing)
        if row.status in (SelftestStatus.NOT_EXERCISED, SelftestStatus.ERROR):  # nothing to judge: no step
            fam.note, step = row.note or row.status, None
        else:
            fam.steps.append(step)
        if progress:
            progress(fam, step)
        return step, row

    first, row = run(1.0)
    if first is None:
        return fam
    if row.effect_point is None:
        fam.note = row.note or "no float strike point exposed"
        return fam
    best = first
    if not first.localized:
        fam.note = ("flagged at m = 1 but not localized: " + row.note) if first.flagged else \
            f"not detected at m = 1 ({row.note})" if row.note else "not detected at m = 1"
    else:
        lo, hi, lo_tried = M_LO, 1.0, False
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            step = run(mid)[0]
            if step.localized:
                hi, best = mid, step
            else:
                lo, lo_tried = mid, True
        fam.localized, fam.detected_at = True, hi
        fam.undetected_at = lo if lo_tried else None
        if not lo_tried:
            fam.note = f"detected at every magnitude tried: m* is at the bisection's lower end ({M_LO:g})"
    fam.point = best.caught_at or row.effect_point
    for s in fam.steps:  # every run, seen at the family's point
        s.effect, s.strike_ratio = s.strikes.get(fam.point, (None, None))
    fam.noise = noise.get(fam.point)
    if fam.localized:
        fam.effect = best.effect
        if fam.noise and fam.effect is not None:
            fam.mde_noise_units = fam.effect / fam.noise
        else:
            fam.note = (fam.note + "; " if fam.note else "") + f"no honest noise at {fam.point} (exact there)"
    fam.flagged_at = min((s.m for s in fam.steps if s.flagged), default=None)
    return fam


def _honest(case: Case, engine: str, precision: str, clean_res, teacher_forcing: str = "on-fail") -> list[Honest]:
    """The clean run and every benign variant of the engine judged at `precision` (a variant
    that is the clean engine itself is the clean run, not run twice)."""
    worst = _worst(clean_res.report.points)
    clean = Honest("clean", worst.ratio if worst else None, worst.name if worst else None, "the engine itself")
    out = []
    for v in benign_for(engine).values():
        if engine not in v.engines or JUDGED_AS.get(v.precision, v.precision) != precision:
            continue
        if v.install is None and not v.options and not v.batch_partner and v.precision == precision:
            clean.variant = v.name
            continue
        row = run_benign(case, engine, v, teacher_forcing)
        out.append(Honest(v.name, row.worst_ratio, row.worst, row.note if row.status != SelftestStatus.PASS else ""))
    return [clean, *out]


def run_sensitivity(engine: str, case: str, precision: str = "float32", faults=None, steps: int = STEPS,
                    progress: Callable | None = None, teacher_forcing: str = "on-fail") -> SensitivityResult:
    """faults: names (None = every fault of the engine). `progress(family, step)` after each run
    (step None: the family was not exercised, `family.note` says why). `teacher_forcing`: how
    every compare (clean, faulty, honest) judges; "always" fails a point on its local excess
    too (docs/tolerances.md, Localization)."""
    if teacher_forcing not in ("on-fail", "always"):
        raise BadInput(f"teacher forcing must be on-fail or always here, not {teacher_forcing!r}")
    t0 = time.perf_counter()
    case_obj = get_case(case)
    if engine in ENGINE_PRECISIONS:  # the engine declares its precision
        precision = ENGINE_PRECISIONS[engine][0]
    elif precision not in PRECISIONS:
        raise BadInput(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if not isinstance(steps, int) or steps < 1:
        raise BadInput(f"--steps must be a positive integer, not {steps!r}")
    inner = get_engine(engine)  # unknown / unavailable engine: one line, before its faults are looked up
    fault_objs = resolve(faults, faults_for(engine), "fault")
    rec = _Recording(inner)
    clean_res = compare(case_obj, engine, precision, engine=rec, teacher_forcing=teacher_forcing,
                        **ENGINE_OPTIONS.get(engine, {}))
    clean = rec.points
    noise = {p.name: finite_or_none(p.metrics.get("rel_l2")) for p in clean_res.report.points if p.kind == "float"}
    res = SensitivityResult(engine, case_obj.name, clean_res.report.precision, steps, teacher_forcing=teacher_forcing)
    for fault in fault_objs:
        res.families.append(measure_family(case_obj, engine, fault, precision, rec, clean, noise, steps, progress,
                                           teacher_forcing))
    res.honest = _honest(case_obj, engine, precision, clean_res, teacher_forcing)
    res.seconds = time.perf_counter() - t0
    return res
