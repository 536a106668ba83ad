"""The typed result of a judged run, one type from the judgment to the file: the differ builds
each `Point` (differ.py), the phases judge builds each `Phase` (phases.py), teacher forcing names
the `Culprit` (localize.py), the diagnosis ranks `Diagnosis` entries (diagnose.py), and compare
(or `corruptcheck check`) assembles them into the `Report` (`Report.judged`) that every renderer
(reports/), the API, the pytest plugin, the gate and the results store take. Each type has its
JSON next to it (`to_json`, written only at files and the store; `from_json` for a document read
back); the JSON schema is REPORT_SCHEMA below.

The differ's Comparison stays beside the Report while a run is judged: the working set of the
same Point objects with the verdict rules, which localize and phases refine in place.

A Point holds the judge's own numbers: `ratio` is inf where a point is not comparable (NaN/Inf
parity, nothing to compare), and `local` is the teacher-forced result as measured. JSON has no
Infinity, so the report writes those as null, and the rendered reports show what it writes
(`finite_ratio`, `finite_local`)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from corruptcheck.finite import finite_or_none, finite_values
from corruptcheck.verdicts import JUDGED, NOT_COMPARED, Verdict

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
    """One capture point's verdict, as the differ judged it (and localize / phases refined it)."""
    name: str
    verdict: Verdict  # pass | fail | missing | not-exercised | skipped | unchecked (release/check.py)
    layer: int | None
    kind: str
    metrics: dict = field(default_factory=dict)
    tolerance: dict | None = None
    ratio: float | None = None  # error / tolerance (> 1 fails); inf where not comparable
    reason: str = ""
    local: dict | None = None  # teacher-forced result (localize.py)

    @property
    def finite_ratio(self) -> float | None:
        """`ratio` as the report writes and shows it: None where not finite."""
        return finite_or_none(self.ratio)

    @property
    def finite_local(self) -> dict | None:
        """`local` as the report writes and shows it: non-finite numbers as None (None when empty)."""
        return finite_values(self.local) if self.local else None

    def to_json(self) -> dict:
        return {**super().to_json(), "ratio": self.finite_ratio, "local": self.finite_local}

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
    phase: dict | None = field(default=None, metadata=_OMIT_NONE)  # served run: where it was localized (Phase.where)


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
    verdict: Verdict
    worst_ratio: float | None
    worst_point: str | None
    pairs: int
    first_divergence: dict | None
    failed_points: int | None = field(default=None, metadata=_OMIT_NONE)

    @property
    def label(self) -> tuple:
        """("prefill", chunk) or ("decode", step): the label its rows carry."""
        return (self.phase, self.step if self.phase == "decode" else self.chunk)

    @property
    def where(self) -> dict:
        """{"phase", "step", "chunk"}: the phase named on a culprit localized within it."""
        return {"phase": self.phase, "step": self.step, "chunk": self.chunk}


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

    @classmethod
    def of(cls, points: list, pairs_by_phase: dict | None) -> Summary:
        """The counts of `points`; `pairs_by_phase`: a served run's (phases.pairs_by_phase), else
        every judged row is a prefill pair."""
        floats = [p for p in points if p.kind == "float" and p.verdict in JUDGED]
        worst = max(floats, key=lambda p: p.metrics.get("rel_l2") or 0.0, default=None)
        ranked = [p for p in points if p.ratio is not None]
        worst_ratio = max(ranked, key=lambda p: p.ratio, default=None)
        return cls(
            compared=sum(p.verdict in JUDGED for p in points), failed=sum(p.verdict == Verdict.FAIL for p in points),
            missing=sum(p.verdict in NOT_COMPARED for p in points),
            skipped=sum(p.verdict == Verdict.SKIPPED for p in points),
            not_exercised=sum(p.verdict == Verdict.NOT_EXERCISED for p in points),
            worst={"name": worst.name, "rel_l2": worst.metrics.get("rel_l2")} if worst else None,
            worst_ratio={"name": worst_ratio.name, "ratio": worst_ratio.finite_ratio} if worst_ratio else None,
            pairs_by_phase=pairs_by_phase if pairs_by_phase is not None else {
                "prefill": sum(_rows(p) for p in points if p.verdict in JUDGED), "decode": 0},
        )


@dataclass
class Report(_Json):
    """The report of one run (compare, or `corruptcheck check`), assembled once it is judged
    (`judged`); `to_json` is the report document (`compare --json`)."""
    schema: int
    verdict: Verdict
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
    def judged(cls, comp, *, case, engine: str, coverage: dict, reference: dict, engine_info: dict, timings: dict,
               noise_model: str, culprit: Culprit | None = None, teacher_forcing: str = "not run",
               schedule: object = "prefill-only", phases: list | None = None, pairs_by_phase: dict | None = None,
               greedy: dict | None = None, batching: str | None = None, crash: dict | None = None) -> Report:
        """The report of a judged run: `comp`, the differ's Comparison (its points, precision and
        unknown names; localized, and judged by phase for a served run); `case`, the Case it was
        judged on; a served run's schedule (its dict), phases, pairs_by_phase, greedy choices and
        batching; `crash`: the engine's process died (verdict crash, whatever its points say)."""
        return cls(
            schema=REPORT_SCHEMA, verdict=Verdict.CRASH if crash else comp.verdict, engine=engine, case=case.name,
            precision=comp.precision, tolerance_precision=comp.precision, points=comp.points,
            first_divergence=comp.first_divergence, unknown_names=comp.unknown, culprit=culprit,
            teacher_forcing=teacher_forcing, coverage=coverage, summary=Summary.of(comp.points, pairs_by_phase),
            noise_model=noise_model, reference=reference, engine_info=engine_info, case_spec=case.spec(),
            timings=timings, schedule=schedule, phases=phases or [], greedy=greedy, batching=batching, crash=crash,
        )

    @property
    def failed(self) -> list:
        """The failing points, in model order."""
        return [p for p in self.points if p.verdict == Verdict.FAIL]

    @property
    def missing(self) -> list:
        """Required points not compared: missing from the engine, or unchecked (never a pass)."""
        return [p for p in self.points if p.verdict in NOT_COMPARED]


def _rows(p) -> int:
    """Token (or entry) rows a judged point compared."""
    m = p.metrics or {}
    return int(m.get("tokens", 0) if p.kind == "index" else m.get("rows_compared", m.get("rows", 0)))
