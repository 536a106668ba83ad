"""The result of a compare as typed objects, each with its JSON next to it (`to_json`, and
`from_json` for a document read back): the report document, its points, summary, culprit and
serving phases. Reports (reports/render.py, reports/html.py) render from these; the JSON schema is
REPORT_SCHEMA below and its bytes do not depend on this layer."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from corruptcheck.finite import finite_or_none, finite_values
from corruptcheck.verdicts import JUDGED, Verdict

REPORT_SCHEMA = 2  # 1 = first differ; 2 adds ratio, local, culprit, tolerance_precision (additive);
# `diagnosis` (additive, written only when the diagnosis ran) keeps 2
_OMIT_NONE = {"omit_if_none": True}  # a key written only when it has a value


class _Json:
    """to_json: the fields in declaration order (typed children by their own to_json);
    from_json: the inverse, for the keys this class declares."""

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _plain(v)
        return out

    @classmethod
    def from_json(cls, doc: dict):
        return cls(**{f.name: doc[f.name] for f in fields(cls) if f.name in doc})


def _plain(v):
    if isinstance(v, _Json):
        return v.to_json()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return v


@dataclass
class Point(_Json):
    """One capture point's verdict in the report."""
    name: str
    verdict: str
    layer: int | None
    kind: str
    metrics: dict
    tolerance: dict | None
    ratio: float | None  # error / tolerance (> 1 fails); None where not finite
    reason: str
    local: dict | None  # teacher-forced result (localize.py), non-finite numbers as None

    @classmethod
    def from_result(cls, p) -> Point:
        return cls(p.name, p.verdict, p.layer, p.kind, p.metrics, p.tolerance, finite_or_none(p.ratio), p.reason,
                   finite_values(p.local) if p.local else None)

    @property
    def judged(self) -> bool:
        return self.verdict in JUDGED


@dataclass
class Culprit(_Json):
    """The first point whose teacher-forced (local) error exceeds its local tolerance."""
    name: str
    layer: int | None
    local_ratio: float | None
    local_rel_l2: float | None
    local_norm_ratio: float | None
    reason: str
    phase: dict | None = field(default=None, metadata=_OMIT_NONE)  # served run: where it was localized


@dataclass
class Diagnosis(_Json):
    """One ranked defect hypothesis for a failing sub-block (judge/diagnose.py,
    docs/diagnosis.md): the residual of the engine against the hypothesis run on the engine's own
    input, in units of the local tolerance, beside the reference's; `explains` only when the
    best is within the honest noise and clearly better than the reference and the runner-up."""
    hypothesis: str
    point: str
    params: dict
    residual_ratio: float | None
    reference_ratio: float | None
    explains: bool
    sub_block: str
    evidence: dict | None = field(default=None, metadata=_OMIT_NONE)  # per token, on the best only


@dataclass
class Phase(_Json):
    """A served run's prefill chunk or decode step, judged on its own rows (phases.py)."""
    phase: str
    step: int | None
    chunk: int | None
    tokens: int
    verdict: str
    worst_ratio: float | None
    worst_point: str | None
    pairs: int
    first_divergence: dict | None
    failed_points: int | None = field(default=None, metadata=_OMIT_NONE)


@dataclass
class Summary(_Json):
    compared: int
    failed: int
    missing: int
    skipped: int
    not_exercised: int
    worst: dict | None  # {"name", "rel_l2"}: the float point with the largest relative error
    worst_ratio: dict | None  # {"name", "ratio"}: the point closest to (or furthest over) its tolerance
    pairs_by_phase: dict  # compared (point, token) pairs: {"prefill": n, "decode": n}


@dataclass
class Report(_Json):
    """The report document of one compare (report.to_json writes it)."""
    schema: int
    verdict: str
    engine: str
    case: str
    precision: str
    tolerance_precision: str
    points: list  # [Point]
    first_divergence: dict | None
    unknown_names: list
    culprit: Culprit | None
    teacher_forcing: str
    coverage: dict
    summary: Summary
    noise_model: str
    reference: dict
    engine_info: dict
    case_spec: dict
    timings: dict
    schedule: object  # the served schedule's dict, or "prefill-only"
    phases: list  # [Phase]
    greedy: dict | None
    batching: str | None
    gate: dict | None = field(default=None, metadata=_OMIT_NONE)  # a gate run: policy, run id, batch size
    # the engine's process died (verdict crash): kind signal | oom | timeout | exit | exception,
    # detail, phase, exit code, what it delivered (engines/child.py); absent when it did not
    crash: dict | None = field(default=None, metadata=_OMIT_NONE)
    diagnosis: list | None = field(default=None, metadata=_OMIT_NONE)  # [Diagnosis], best first; only when run

    @property
    def explained(self) -> Diagnosis | None:
        """The hypothesis that explains the engine (within noise, clearly the best), or None."""
        return next((d for d in self.diagnosis or [] if d.explains), None)

    @classmethod
    def from_json(cls, doc: dict) -> Report:
        """Keys a document lacks (an older or partial one) read as None."""
        rep = cls(**{f.name: doc.get(f.name) for f in fields(cls)})
        rep.points = [Point.from_json(p) for p in doc["points"]]
        rep.culprit = Culprit.from_json(doc["culprit"]) if doc.get("culprit") else doc.get("culprit")
        rep.summary = Summary.from_json(doc["summary"])
        rep.phases = [Phase.from_json(p) for p in doc.get("phases") or []]
        if doc.get("diagnosis") is not None:
            rep.diagnosis = [Diagnosis.from_json(d) for d in doc["diagnosis"]]
        return rep

    @classmethod
    def from_result(cls, res) -> Report:
        """From a compare.CompareResult."""
        comp, served = res.comparison, res.served
        return cls(
            schema=REPORT_SCHEMA, verdict=res.verdict, engine=res.engine, case=res.case.name,
            precision=res.precision, tolerance_precision=res.tolerance_precision,
            points=[Point.from_result(p) for p in comp.points],
            first_divergence=comp.first_divergence, unknown_names=comp.unknown,
            culprit=Culprit.from_json(res.culprit) if res.culprit else res.culprit,
            teacher_forcing=res.teacher_forcing, coverage=res.coverage, summary=_summary(comp, served),
            noise_model=res.noise_source, reference=res.reference, engine_info=res.engine_meta,
            case_spec=res.case.spec(), timings=res.timings,
            # a served run (schedule.py): the schedule, verdicts by phase, the engine's greedy choices
            schedule=served["schedule"] if served else "prefill-only",
            phases=[Phase.from_json(p) for p in served["phases"]] if served else [],
            greedy=served["greedy"] if served else None,
            batching=served.get("batching") if served else None,
            crash=getattr(res, "crash", None),
            diagnosis=None if res.diagnosis is None else [Diagnosis.from_json(d) for d in res.diagnosis],
        )


def _summary(comp, served) -> Summary:
    floats = [p for p in comp.points if p.kind == "float" and p.verdict in JUDGED]
    worst = max(floats, key=lambda p: p.metrics.get("rel_l2") or 0.0, default=None)
    ranked = [p for p in comp.points if p.ratio is not None]
    worst_ratio = max(ranked, key=lambda p: p.ratio, default=None)
    return Summary(
        compared=comp.compared, failed=len(comp.failed), missing=len(comp.missing),
        skipped=sum(p.verdict == Verdict.SKIPPED for p in comp.points),
        not_exercised=sum(p.verdict == Verdict.NOT_EXERCISED for p in comp.points),
        worst={"name": worst.name, "rel_l2": worst.metrics.get("rel_l2")} if worst else None,
        worst_ratio={"name": worst_ratio.name, "ratio": finite_or_none(worst_ratio.ratio)} if worst_ratio else None,
        pairs_by_phase=served["pairs_by_phase"] if served else {
            "prefill": sum(_rows(p) for p in comp.points if p.verdict in JUDGED), "decode": 0},
    )


def _rows(p) -> int:
    """Token (or entry) rows a judged point compared."""
    m = p.metrics or {}
    return int(m.get("tokens", 0) if p.kind == "index" else m.get("rows_compared", m.get("rows", 0)))
