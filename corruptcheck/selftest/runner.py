"""The detector's self-test (docs/faults.md): every fault x case x precision and every benign variant.

A fault run is `compare(case, engine, precision, engine=FaultyEngine(...))`; the row says
whether the fault fired (else *not exercised*, excluded from recall), whether the compare
failed (detected), the first failing point, the teacher-forced culprit, the expected point
(the fault's strike point that the engine exposes first) and whether the two agree. A benign
variant is an honest engine (another precision, reduction order, attention algorithm,
batching); any failure of one is a false positive.

Totals: float32 recall and localization accuracy over exercised (fault, case) pairs;
bfloat16 detections, and for each bf16 row its effect/noise ratio = the fault's own error
(rel_l2 of the float32 faulty run, where honest float32 noise is negligible) over the honest
bf16 noise (the bf16 tolerance's `noise_rel_l2`), at the strike point where that ratio is
largest: the expected point or a documented equivalent, in the first layer where the fault
fired (mhc-comb-transposed barely moves its first strike point and strikes in full at the
next one); false positives.
"""
from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from corruptcheck.selftest.benign import BENIGN, VLLM_BENIGN, VLLM_NO_BF16_KV, Benign, benign_for, online_softmax_attention
from corruptcheck.cases import CASES, Case, get_case
from corruptcheck.compare import compare
from corruptcheck.engines import Engine, get_engine
from corruptcheck.errors import BadInput
from corruptcheck.faults import Fault, FaultyEngine, faults_for
from corruptcheck.finite import finite_or_none
from corruptcheck.judge.results import Report
from corruptcheck.selftest.html import render_html, write_html
from corruptcheck.selftest.variant_engine import VariantEngine, partnered
from corruptcheck.verdicts import SelftestStatus, Verdict

SELFTEST_SCHEMA = 1
PRECISIONS = ("float32", "bfloat16")
BF16_FLOOR_RATIO = 3.0  # faults above 3x the bf16 noise must be caught in bf16 (docs/faults.md)
LOCALIZATION_TARGET = 0.95  # exact localization wanted for >= 95% of float32 pairs


# Every engine row runs with these options: vLLM as shipped ignores the routed experts' SwiGLU
# clamp (a real defect, docs/engines.md), so faults are judged on an engine with that fixed.
ENGINE_OPTIONS = {"vllm": {"fix": "routed-swiglu-clamp"}, "llamacpp": {"weights": "f32", "kv_type": "f32"}}
# engines that declare their own precision profile: their rows run at that one precision
ENGINE_PRECISIONS = {"vllm": ("fp8-serving",), "llamacpp": ("ggml-float32",)}


def default_cases(engine: str) -> list[str]:
    """The engine cases (FP8-exact, real-engine kernel limits) for vllm, the bf16 ones elsewhere
    (the release-format cases are `corruptcheck check`'s)."""
    return [name for name, c in CASES.items() if c.weight_format == ("fp8" if engine in ("vllm", "llamacpp") else "bf16")]


# ---------------------------------------------------------------------------------------------
# rows

@dataclass
class FaultRow:
    fault: str
    klass: str
    case: str
    precision: str
    status: SelftestStatus  # detected | missed | not exercised | error
    fired: int = 0
    where: str | None = None
    layers: list = field(default_factory=list)  # where the fault fired
    verdict: str | None = None
    first: str | None = None
    culprit: str | None = None
    expected: str | None = None
    localized: bool | None = None
    culprit_local_ratio: float | None = None
    effect_point: str | None = None  # the strike point where the fault shows most (effect / noise)
    effect: float | None = None  # rel_l2 at effect_point in this run
    noise: float | None = None  # honest noise rel_l2 at effect_point at this precision
    strikes: dict = field(default_factory=dict)  # every exposed strike point -> [rel_l2, noise rel_l2]
    seconds: float = 0.0
    note: str = ""

    @property
    def exercised(self) -> bool:
        return self.status in (SelftestStatus.DETECTED, SelftestStatus.MISSED)


@dataclass
class BenignRow:
    variant: str
    case: str
    precision: str
    status: SelftestStatus  # pass | flagged | error
    verdict: str | None = None
    worst: str | None = None
    worst_ratio: float | None = None
    first: str | None = None
    seconds: float = 0.0
    note: str = ""


def _exposed(points: dict, name: str) -> bool:
    p = points.get(name)
    return p is not None and p.verdict not in (Verdict.SKIPPED, Verdict.MISSING)


def expected_point(fault: Fault, where: str | None, points: dict) -> str | None:
    """The fault's first strike point that the engine exposes, under the layer where it fired."""
    if where is None:
        return None
    return next((n for n in fault.expected_candidates(where) if _exposed(points, n)), None)


def _effect_point(expected: str, order: list, points: dict) -> str | None:
    """The expected point if it is a float point; for a discrete one (indexer top-k) the next
    float point of the same sub-block (where the other selection first shows as an error)."""
    if points[expected].kind == "float":
        return expected
    prefix = expected.rsplit(".", 2)[0] + ".attn."
    after = order[order.index(expected) + 1:]
    return next((n for n in after if n.startswith(prefix) and _exposed(points, n) and points[n].kind == "float"),
                None)


def _timed_compare(row, case: Case, engine: str, precision: str, runner: Engine, teacher_forcing: str = "on-fail",
                   diagnose: str = "never", hypotheses=None):
    """compare() with a faulty or variant engine, timed into the row; a crash is recorded on the
    row (status `error`) as a finding, not raised, and gives None. The self-test's rows are not
    diagnosed unless asked (`diagnose`; bench/diagnosis_bench.py measures the diagnosis)."""
    t0 = time.perf_counter()
    try:
        return compare(case, engine, precision, engine=runner, teacher_forcing=teacher_forcing, diagnose=diagnose,
                       hypotheses=hypotheses, **ENGINE_OPTIONS.get(engine, {}))
    except Exception as exc:
        row.status, row.note = SelftestStatus.ERROR, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        return None
    finally:
        row.seconds = time.perf_counter() - t0


def _worst(points):
    """The point with the largest finite error/tolerance, or None."""
    return max((p for p in points if p.ratio is not None and math.isfinite(p.ratio)),
               key=lambda p: p.ratio, default=None)


def run_fault(case: Case, engine: str, fault: Fault, precision: str) -> FaultRow:
    return fault_run(case, engine, fault, precision)[0]


def fault_run(case: Case, engine: str, fault: Fault, precision: str, inner: Engine | None = None,
              teacher_forcing: str = "on-fail", diagnose: str = "never", hypotheses=None):
    """(row, the compare's result or None): `fault` (at its magnitude) around `inner` (default:
    the registered engine), compared (with `teacher_forcing`, and `diagnose` with `hypotheses`)
    and judged as a self-test row."""
    row = FaultRow(fault.name, fault.klass, case.name, precision, SelftestStatus.NOT_EXERCISED)
    if fault.triggered(case.config, case.seq_lens, engine) is False:
        row.note = f"trigger never fires here: {fault.trigger}"
        return row, None
    faulty = FaultyEngine(inner or get_engine(engine), fault)
    res = _timed_compare(row, case, engine, precision, faulty, teacher_forcing, diagnose, hypotheses)
    if res is None:
        return row, None
    st, rep = faulty.state, res.report
    _record_run(row, rep, st)
    if st.fired == 0:
        row.note = f"did not fire on this case ({fault.trigger})"
        if rep.verdict == Verdict.FAIL:
            row.note += "; compare failed anyway: first " + str(row.first)
        return row, res
    points = {p.name: p for p in rep.points}
    row.expected = expected_point(fault, st.where, points)
    row.status = SelftestStatus.DETECTED if rep.verdict == Verdict.FAIL else SelftestStatus.MISSED
    _judge_localization(row, fault, st)
    if row.expected:
        _measure_effect(row, fault, st, [p.name for p in rep.points], points)
    else:
        row.note = "the engine exposes none of the fault's strike points"
    if row.status == SelftestStatus.MISSED:
        worst = _worst(rep.points)
        if worst is not None:
            row.note = f"worst err/tol {worst.ratio:.3g} at {worst.name}"
    return row, res


def _record_run(row: FaultRow, rep: Report, st) -> None:
    """Where the fault fired, the compare's verdict, first failing point and culprit."""
    row.fired, row.where, row.layers = st.fired, st.where, list(st.layers)
    row.verdict = rep.verdict
    row.first = rep.first_divergence["name"] if rep.first_divergence else None
    row.culprit = rep.culprit.name if rep.culprit else None
    row.culprit_local_ratio = rep.culprit.local_ratio if rep.culprit else None


def _judge_localization(row: FaultRow, fault: Fault, st) -> None:
    """Localized: detected, with the culprit at the expected point or a documented equivalent."""
    accepted = fault.accepted(row.expected, st.where, st.layers) if row.expected else []
    row.localized = row.status == SelftestStatus.DETECTED and row.culprit is not None and row.culprit in accepted
    if row.localized and row.culprit != row.expected:
        row.note = f"culprit {row.culprit}: an equivalent strike point ({fault.name} fired at {', '.join(st.layers)})"
    elif row.status == SelftestStatus.DETECTED and not row.localized:
        row.note = (f"first failing point {row.first}, culprit {row.culprit}" if row.culprit else
                    f"first failing point {row.first}; no culprit: every failing point is within its local "
                    f"(teacher-forced) tolerance")


def _measure_effect(row: FaultRow, fault: Fault, st, order: list, points: dict) -> None:
    """The fault's own error: at each strike point of the first layer where it fired (the
    expected point and its documented equivalents), its rel_l2 against the honest noise."""
    for cand in fault.accepted(row.expected, st.where, [st.where]):
        ep = _effect_point(cand, order, points) if _exposed(points, cand) else None
        if ep and ep not in row.strikes:
            row.strikes[ep] = [finite_or_none(points[ep].metrics.get("rel_l2")),
                               (points[ep].tolerance or {}).get("noise_rel_l2")]
    best = _strongest(row.strikes)
    if best:
        row.effect_point, (row.effect, row.noise) = best, row.strikes[best]


def _strongest(strikes: dict) -> str | None:
    """The point of `strikes` (point -> [rel_l2, noise rel_l2]) with the largest effect / noise."""
    def ratio(name):
        effect, noise = strikes[name]
        return effect / noise if effect is not None and noise else -1.0
    return max(strikes, key=ratio, default=None)


def run_benign(case: Case, engine: str, variant: Benign, teacher_forcing: str = "on-fail",
               diagnose: str = "never") -> BenignRow:
    return benign_run(case, engine, variant, teacher_forcing, diagnose)[0]


def benign_run(case: Case, engine: str, variant: Benign, teacher_forcing: str = "on-fail", diagnose: str = "never"):
    """(row, the compare's result or None) of an honest variant."""
    row = BenignRow(variant.name, case.name, variant.precision, SelftestStatus.PASS)
    res = _timed_compare(row, case, engine, variant.precision, VariantEngine(get_engine(engine), variant),
                         teacher_forcing, diagnose)
    if res is None:
        return row, None
    rep = res.report
    row.verdict = rep.verdict
    row.status = SelftestStatus.FLAGGED if rep.verdict != Verdict.PASS else SelftestStatus.PASS
    worst = _worst(rep.points)
    if worst is not None:
        row.worst, row.worst_ratio = worst.name, worst.ratio
    if rep.first_divergence:
        row.first = rep.first_divergence["name"]
        row.note = "; ".join(f"{p.name}: {p.reason}" for p in rep.failed[:3])
    return row, res


# ---------------------------------------------------------------------------------------------
# the whole matrix

@dataclass
class SelftestResult:
    engine: str
    cases: list
    precisions: list
    faults: list = field(default_factory=list)  # FaultRow
    benign: list = field(default_factory=list)  # BenignRow

    def bf16_effects(self) -> list[dict]:
        """Per exercised bf16 row: effect/noise = float32 fault error / honest bf16 noise."""
        fp32 = {(r.fault, r.case): r for r in self.faults if r.precision == "float32" and r.exercised}
        out = []
        for r in self.faults:
            if r.precision != "bfloat16" or not r.exercised:
                continue
            ref = fp32.get((r.fault, r.case))
            # the float32 run's error against the bf16 noise, at each strike point both runs saw
            mixed = {k: [v[0], r.strikes[k][1]] for k, v in ref.strikes.items() if k in r.strikes} if ref else {}
            if mixed:
                point, source = _strongest(mixed), "float32 run"
                effect, noise = mixed[point]
            else:
                point, effect, noise, source = r.effect_point, r.effect, r.noise, "bfloat16 run (no float32 run)"
            ratio = effect / noise if effect is not None and noise else None
            out.append({"fault": r.fault, "case": r.case, "status": r.status, "point": point,
                        "effect_rel_l2": effect, "bf16_noise_rel_l2": noise, "effect_over_noise": ratio,
                        "effect_source": source})
        return out

    def totals(self) -> dict:
        def block(prec):
            rows = [r for r in self.faults if r.precision == prec]
            ex = [r for r in rows if r.exercised]
            det = [r for r in ex if r.status == SelftestStatus.DETECTED]
            loc = [r for r in ex if r.localized]
            exact = [r for r in loc if r.culprit == r.expected]
            return {"runs": len(rows), "exercised": len(ex),
                    "not_exercised": sum(r.status == SelftestStatus.NOT_EXERCISED for r in rows),
                    "errors": sum(r.status == SelftestStatus.ERROR for r in rows), "detected": len(det),
                    "recall": len(det) / len(ex) if ex else None, "localized": len(loc),
                    "localized_at_expected": len(exact),
                    "localization_accuracy": len(loc) / len(ex) if ex else None,
                    "localization_target_met": (len(loc) / len(ex) >= LOCALIZATION_TARGET) if ex else None,
                    "missed": [f"{r.fault}@{r.case}" for r in ex if r.status == SelftestStatus.MISSED],
                    "mislocalized": [f"{r.fault}@{r.case}: culprit {r.culprit}, expected {r.expected}"
                                     for r in det if not r.localized]}
        out = {p: block(p) for p in self.precisions}
        effects = self.bf16_effects()
        if "bfloat16" in out:
            out["bfloat16"]["below_floor_misses"] = [e for e in effects if e["status"] == SelftestStatus.MISSED
                                                     and (e["effect_over_noise"] or 0) <= BF16_FLOOR_RATIO]
            out["bfloat16"]["above_floor_misses"] = [e for e in effects if e["status"] == SelftestStatus.MISSED
                                                     and (e["effect_over_noise"] or 0) > BF16_FLOOR_RATIO]
        flagged = [r for r in self.benign if r.status == SelftestStatus.FLAGGED]
        out["benign"] = {"runs": len(self.benign), "false_positives": len(flagged),
                         "errors": sum(r.status == SelftestStatus.ERROR for r in self.benign),
                         "flagged": [f"{r.variant}@{r.case}: {r.note}" for r in flagged]}
        return out

    @property
    def ok(self) -> bool:
        """Exit 0 only if no exercised fault was missed at float32, no benign variant was
        flagged and nothing crashed."""
        # a miss counts everywhere but bfloat16 (float32, or an engine's own profile such as
        # vLLM's fp8-serving); bf16 misses below the noise floor are expected
        missed32 = any(r.precision != "bfloat16" and r.status == SelftestStatus.MISSED for r in self.faults)
        errors = any(r.status == SelftestStatus.ERROR for r in [*self.faults, *self.benign])
        flagged = any(r.status == SelftestStatus.FLAGGED for r in self.benign)
        return not (missed32 or errors or flagged)

    def to_json(self) -> dict:
        return {"schema": SELFTEST_SCHEMA, "engine": self.engine, "cases": self.cases, "precisions": self.precisions,
                "ok": self.ok, "totals": self.totals(), "bf16_effects": self.bf16_effects(),
                "faults": [asdict(r) for r in self.faults], "benign": [asdict(r) for r in self.benign],
                "fault_catalog": [{"name": f.name, "class": f.klass, "catalog": f.catalog, "summary": f.summary,
                                   "points": list(f.points), "also": list(f.also), "trigger": f.trigger,
                                   "knob": f.knob}
                                  for f in faults_for(self.engine).values()]}


def resolve(names, registry: dict, what: str) -> list:
    """The named entries in registry order (None = all)."""
    if names is None:
        return list(registry.values())
    for n in names:
        if n not in registry:
            raise BadInput(f"unknown {what} {n!r}; known: {', '.join(registry)}")
    return [v for k, v in registry.items() if k in names]


def run_selftest(engine: str = "hf", cases=None, precisions=PRECISIONS, faults=None, benign=None,
                 progress: Callable | None = None) -> SelftestResult:
    """cases / faults / benign: names (None = all; benign=() for none). `progress(row)` is
    called after every run."""
    case_objs = [get_case(c) for c in (cases or default_cases(engine))]
    fault_objs = resolve(faults, faults_for(engine), "fault")
    variants = [v for v in resolve(benign, benign_for(engine), "benign variant") if engine in v.engines]
    if engine in ENGINE_PRECISIONS:  # the engine declares its precision; requested ones do not apply
        precisions = ENGINE_PRECISIONS[engine]
    for p in precisions:
        if p not in PRECISIONS and p not in ENGINE_PRECISIONS.get(engine, ()):
            raise BadInput(f"unknown precision {p!r}; choose from {', '.join(PRECISIONS)}")
    get_engine(engine)  # unknown / unavailable engine: fail before the matrix starts
    res = SelftestResult(engine, [c.name for c in case_objs], list(precisions))
    for case in case_objs:
        for fault in fault_objs:
            for prec in precisions:
                row = run_fault(case, engine, fault, prec)
                res.faults.append(row)
                if progress:
                    progress(row)
        for variant in variants:
            row = run_benign(case, engine, variant)
            res.benign.append(row)
            if progress:
                progress(row)
    return res


__all__ = ["BENIGN", "VLLM_BENIGN", "VLLM_NO_BF16_KV", "ENGINE_OPTIONS", "benign_for", "Benign", "BenignRow", "FaultRow",
           "SelftestResult", "VariantEngine", "run_selftest", "run_fault", "run_benign", "partnered",
           "online_softmax_attention", "render_html", "write_html"]
