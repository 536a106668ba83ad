"""Python API for engine test suites: check an engine (a registered name, an import path, or an
`Engine` object) or a dump directory against a case, and get a `CheckResult` with the verdict,
the points, the culprit and `assert_ok()`, which raises with a readable message. A CheckResult
is a view over the run's typed report (judge/results.py, `CheckResult.report`): its own
attributes are the documented names (docs/pytest.md), its messages and its assertions.

    from corruptcheck.api import check
    check("hf", "tiny", "float32").assert_ok()

The pytest plugin (`pytest_plugin.py`) builds its test items and failure messages from here.
"""
from __future__ import annotations

from pathlib import Path

from corruptcheck.cases import Case, get_case
from corruptcheck.compare import DEFAULTS, RunSettings
from corruptcheck.reports.render import diagnosis_lines
from corruptcheck.engines import Engine, get_engine
from corruptcheck.errors import BadInput, EngineUnavailable
from corruptcheck.finite import fmt_number
from corruptcheck.reference import Precision
from corruptcheck.judge.tolerance import NORM_SHARE
from corruptcheck.judge.results import Culprit, Point, Report
# point verdicts that are neither a pass nor a failure (never counted as passes)
from corruptcheck.verdicts import NOT_JUDGED, Verdict

_LIST_AT_MOST = 10


class CheckFailed(AssertionError):
    """`assert_ok()` found a problem (base class of the errors below)."""


class CorruptionDetected(CheckFailed):
    """At least one point is outside its tolerance."""


class NothingCompared(CheckFailed):
    """Verdict `error`: the engine captured none of the case's points."""


class EngineCrash(CheckFailed):
    """Verdict `crash`: the engine's process died (signal, out of memory, no progress, exit
    without finishing, an exception); `crash` is the record (kind, detail, phase, delivered)."""

    def __init__(self, message: str, crash: dict | None = None):
        super().__init__(message)
        self.crash = crash or {}


class MissingPoints(CheckFailed):
    """`assert_ok(allow_missing=False)`: the engine lacks required points."""


def check(engine, case: str | Case = "tiny", precision: str | None = "float32", *,
          schedule: str = DEFAULTS.schedule, teacher_forcing: str = DEFAULTS.teacher_forcing,
          use_golden: bool = DEFAULTS.use_golden, diagnose: str = DEFAULTS.diagnose,
          engine_process: str = DEFAULTS.engine_process, engine_timeout: float | None = None,
          engine_memory: float | None = None, **engine_options) -> "CheckResult":
    """Run `case` through `engine` and compare every point with the float64 reference.

    `engine`: a registered name (`hf`, `reference`, `dump`, ...), an import path
    `package.module:Class`, an `Engine` subclass or an `Engine` instance (e.g. one wrapping an
    in-process model). `precision`: what the engine runs in; tolerances follow the precision
    its capture declares. `schedule`, `teacher_forcing`, `use_golden`, `diagnose` (docs/diagnosis.md):
    the run's settings, with
    the defaults every front door shares (`compare.RunSettings`: the case's served schedule where
    it has one and the engine can serve it). `engine_process` (auto | child | inline),
    `engine_timeout` (s without progress), `engine_memory` (GiB): the engine's child process
    (compare.RunSettings); a child that dies gives verdict `crash`. `engine_options` go to
    `Engine.run`. Raises `BadInput` or `EngineUnavailable` when nothing can be compared."""
    if precision is not None:
        try:
            Precision.of(precision)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
    settings = RunSettings(schedule, teacher_forcing, use_golden, diagnose, engine_process, engine_timeout, engine_memory)
    name, eng = _resolve_engine(engine)
    return CheckResult(settings.compare(_resolve_case(case), name, precision, engine=eng, **engine_options).report)


def check_dump(path: str | Path, case: str | Case, precision: str | None = None, **options) -> "CheckResult":
    """Check a dump directory (docs/dump.md) written by an engine for `case`. The tolerances
    follow the precision the dump declares; `options` go to the dump engine (e.g.
    `format="sglang"`)."""
    return check("dump", case, precision, path=str(path), **options)


def _resolve_case(case: str | Case) -> Case:
    if isinstance(case, Case):
        return case
    return get_case(case)


def _resolve_engine(engine) -> tuple[str, Engine]:
    if isinstance(engine, str):
        return engine, get_engine(engine)
    if isinstance(engine, type) and issubclass(engine, Engine):
        engine = engine()
    if not isinstance(engine, Engine):
        raise BadInput(f"engine must be a name, an Engine subclass or an Engine instance, "
                       f"not {type(engine).__name__}")
    name = engine.name or type(engine).__name__
    ok, why = engine.available()
    if not ok:
        raise EngineUnavailable(f"engine {name!r} is not available: {why}")
    return name, engine


class CheckResult:
    """The outcome of one check: engine × case × precision."""

    def __init__(self, report: Report):
        self.report = report  # the typed report (reference source, timings, coverage, ...): every renderer takes it

    def __repr__(self):
        return (f"<CheckResult {self.verdict}: engine {self.engine!r}, case {self.case!r}, {self.precision}; "
                f"{len(self.failed)} failed, {len(self.missing)} missing>")

    # -- what was found
    @property
    def engine(self) -> str:
        return self.report.engine

    @property
    def case(self) -> str:
        return self.report.case

    @property
    def precision(self) -> str:
        return self.report.precision

    @property
    def verdict(self) -> Verdict:
        """`pass`, `fail` (a point is outside its tolerance) or `error` (nothing compared)."""
        return self.report.verdict

    @property
    def crash(self) -> dict | None:
        """The crash record when the engine's process died (verdict `crash`), else None."""
        return self.report.crash

    @property
    def passed(self) -> bool:
        return self.verdict == Verdict.PASS

    @property
    def points(self) -> list[Point]:
        """Every point of the case in model order (name, verdict, metrics, tolerance, ratio, local)."""
        return self.report.points

    @property
    def failed(self) -> list[Point]:
        return self.report.failed

    @property
    def missing(self) -> list[Point]:
        return self.report.missing

    @property
    def first_divergence(self) -> dict | None:
        """{"name", "layer"} of the first failing point in model order, or None."""
        return self.report.first_divergence

    @property
    def culprit(self) -> dict | None:
        """The point teacher forcing blames, as the report document has it ({"name", "layer",
        "local_ratio", ...}), or None."""
        return self.report.culprit.to_json() if self.report.culprit else None

    @property
    def diagnosis(self) -> list | None:
        """The ranked defect hypotheses as the report document has them ({"hypothesis", "point",
        "params", "residual_ratio", "reference_ratio", "explains", ...}, best first), or None when
        the diagnosis did not run."""
        return None if self.report.diagnosis is None else [d.to_json() for d in self.report.diagnosis]

    @property
    def phases(self) -> list:
        """A served run's phases (judge.results.Phase: prefill chunk or decode step, each judged
        on its own rows); empty for a prefill-only run."""
        return self.report.phases

    def point(self, name: str) -> Point:
        for p in self.points:
            if p.name == name:
                return p
        raise KeyError(f"case {self.case!r} has no point {name!r}")

    # -- reports
    def to_json(self) -> dict:
        """The JSON report document (the schema of `corruptcheck compare --json`)."""
        return self.report.to_json()

    def write_reports(self, directory: str | Path) -> dict[str, Path]:
        """Write DIRECTORY/<case>.json and DIRECTORY/<case>.html; returns their paths."""
        from corruptcheck.reports.html import write_html
        from corruptcheck.reports.render import write_json

        out = Path(directory)
        paths = {"json": out / f"{self.case}.json", "html": out / f"{self.case}.html"}
        write_json(self.report.to_json(), str(paths["json"]))
        write_html(self.report, str(paths["html"]))
        return paths

    def write_junit(self, path: str | Path) -> None:
        """JUnit XML with one test case per point (outside pytest; the plugin uses pytest's own)."""
        from corruptcheck.reports.render import write_junit

        write_junit(self.report, str(path))

    # -- messages
    def summary(self) -> str:
        """One line: verdict and counts, the first divergence and the culprit."""
        compared = self.report.summary.compared
        skipped = sum(p.verdict in (Verdict.SKIPPED, Verdict.NOT_EXERCISED) for p in self.points)
        head = f"corruptcheck: engine {self.engine!r} on case {self.case!r} at {self.precision}: "
        if self.verdict == Verdict.CRASH:
            from corruptcheck.reports.render import crash_text

            return head + (f"CRASH: the engine's process died: {crash_text(self.crash)} "
                           f"({compared} compared, {len(self.failed)} failed on what it delivered)")
        if self.verdict == Verdict.ERROR:
            return (head + f"nothing compared: the engine captured none of the case's points "
                           f"({len(self.missing)} required points missing)")
        counts = f"{compared} compared, {len(self.failed)} failed, {len(self.missing)} missing, {skipped} skipped"
        if self.passed:
            return head + f"PASS ({counts})"
        if self.verdict == Verdict.INCOMPLETE:
            return head + f"INCOMPLETE ({counts}): no compared point fails, but required points are missing"
        culprit = self.report.culprit.name if self.report.culprit else _no_culprit(self.report.teacher_forcing)
        return head + f"FAIL ({counts}); first divergence {self.first_divergence['name']}; culprit {culprit}"

    def explain(self, name: str) -> str:
        """The failure message of one point: metric, value, tolerance and its derivation, the
        worst token, and what teacher forcing says about it."""
        p = self.point(name)
        lines = [f"{p.name}: {p.verdict.upper()} (engine {self.engine!r}, case {self.case!r}, "
                 f"{self.report.tolerance_precision} tolerances)"]
        if p.verdict in NOT_JUDGED:
            return "\n".join(lines + [f"  not judged: {p.verdict}: {p.reason}"])
        seq_lens = self.report.case_spec["seq_lens"]
        lines += _index_lines(p, seq_lens) if p.kind == "index" else _float_lines(p, seq_lens)
        lines.append(_teacher_forcing_line(p, self.report.culprit, self.report.teacher_forcing))
        return "\n".join(lines)

    def message(self) -> str:
        """The summary, then the first divergent point and the culprit explained, then the
        list of failing points (what `assert_ok()` raises with)."""
        lines = [self.summary()]
        if self.verdict == Verdict.FAIL:
            first = self.first_divergence["name"]
            lines.append(self.explain(first))
            culprit = self.report.culprit
            if culprit and culprit.name != first:
                lines.append(self.explain(culprit.name))
            lines.append(f"failing points ({len(self.failed)}): {_names(self.failed)}")
            lines += diagnosis_lines(self.report.diagnosis)
        if self.missing:
            lines.append(f"missing points ({len(self.missing)}): {_names(self.missing)}")
        return "\n".join(lines)

    def assert_ok(self, allow_missing: bool = False) -> "CheckResult":
        """Raise `CorruptionDetected` when a point fails, `NothingCompared` when nothing was
        compared, and `MissingPoints` when required points are missing (a missing point is never
        a pass; `allow_missing=True` accepts them, e.g. while an adapter is being written — an
        engine that cannot expose a point declares it skipped instead). Returns self otherwise."""
        if self.verdict == Verdict.CRASH:
            raise EngineCrash(self.message(), self.crash)
        if self.verdict == Verdict.FAIL:
            raise CorruptionDetected(self.message())
        if self.verdict == Verdict.ERROR:
            raise NothingCompared(self.message())
        if self.missing and not allow_missing:
            raise MissingPoints(self.message())
        return self


# -- message pieces

def _g(v, spec=".3g") -> str:
    return fmt_number(v, spec, none="n/a", nonfinite="inf")


def _names(points: list) -> str:
    names = [p.name for p in points]
    more = len(names) - _LIST_AT_MOST
    return ", ".join(names[:_LIST_AT_MOST]) + (f", ... (+{more} more)" if more > 0 else "")


def _token(t, seq_lens) -> str:
    """Flat token index -> 'token 73 (sequence 1, position 9)'."""
    if t is None:
        return "n/a"
    pos = int(t)
    for seq, n in enumerate(seq_lens):
        if pos < n:
            return f"token {t} (sequence {seq}, position {pos})"
        pos -= n
    return f"token {t}"


def _float_lines(p: Point, seq_lens) -> list[str]:
    m, t = p.metrics or {}, p.tolerance or {}
    rel, band = t.get("value"), t.get("norm_ratio_band")
    rl2, nr = m.get("rel_l2"), m.get("norm_ratio")
    if m.get("nonfinite_new"):
        metric = f"NaN/Inf: {m['nonfinite_new']} non-finite values the reference does not have (tolerance 0)"
    elif rl2 is None or (rel is not None and rl2 > rel):
        metric = f"rel_l2 = {_g(rl2)} > tolerance {_g(rel)}"
    elif nr is None or (band is not None and abs(nr - 1) > band):
        metric = f"norm ratio = {_g(nr, '.6g')}: scale off by {_g(nr - 1 if nr is not None else None, '+.3g')}, " \
                 f"outside the band 1 ± {_g(band)}"
    else:
        metric = f"rel_l2 = {_g(rl2)} within tolerance {_g(rel)}"
    if metric.startswith("norm ratio") and t.get("noise_rel_l2") is not None:
        tolerance = (f"norm band {_g(band)} = max({_g(t.get('safety'))} x max(worst honest |norm ratio - 1| "
                     f"({_g(t.get('noise_norm_dev'))}), {NORM_SHARE:g} x worst honest rel_l2 ({_g(t['noise_rel_l2'])})), "
                     f"floor {_g(t.get('floor'))})")
    else:
        tolerance = f"{_g(rel)} = {t.get('derivation', 'n/a')}"
    return [
        f"  metric: {metric} (error/tolerance {_g(p.ratio)})",
        f"  also: rel_l2 {_g(rl2)}, norm ratio {_g(nr, '.6g')} (band ±{_g(band)}), max abs {_g(m.get('max_abs'))}, "
        f"cosine {_g(m.get('cosine'), '.9f')}",
        f"  tolerance: {tolerance}",
        f"  worst token: {_token(m.get('worst_token'), seq_lens)}, relative error {_g(m.get('worst_token_rel'))}",
    ]


def _index_lines(p: Point, seq_lens) -> list[str]:
    m, t = p.metrics or {}, p.tolerance or {}
    return [
        f"  metric: {m.get('genuine')} token(s) choose differently beyond a near-tie > tolerance 0 "
        f"(of {m.get('tokens')} tokens; {m.get('tie_explained')} difference(s) explained as near-ties)",
        f"  tolerance: tie margin {_g(t.get('tie_margin_rel'))} = {t.get('derivation', 'n/a')}",
        f"  worst token: first genuine disagreement at {_token(m.get('first_genuine_token'), seq_lens)}",
    ]


def _no_culprit(teacher_forcing: str) -> str:
    if teacher_forcing != "run":
        return "unknown (teacher forcing not run)"
    return "none (no sub-block exceeds its local tolerance on its own input: accumulated drift)"


def _teacher_forcing_line(p: Point, culprit: Culprit | None, teacher_forcing: str) -> str:
    loc = p.local or {}
    role, ratio = loc.get("role"), _g(loc.get("ratio"))
    blamed = culprit.name if culprit else _no_culprit(teacher_forcing)
    if role == "culprit":
        local = f"; local check: {loc['reason']}" if loc.get("reason") else ""
        return (f"  teacher forcing: CULPRIT: fed the engine's own input, this sub-block alone is {ratio}x its "
                f"local tolerance{local}")
    if role == "culprit sub-block":
        return (f"  teacher forcing: in the culprit's sub-block (culprit {blamed}); on its own input it is "
                f"{ratio}x its local tolerance")
    if role == "local excess":
        return (f"  teacher forcing: local excess: on its own input it is {ratio}x its local tolerance, "
                f"downstream of the culprit {blamed}")
    if role == "inherited":
        return (f"  teacher forcing: inherited: on its own input this sub-block is within its local tolerance "
                f"({ratio}x); the error is drift from upstream (culprit {blamed})")
    if role:
        return f"  teacher forcing: {role}; culprit {blamed}"
    return f"  teacher forcing: no result for this point; culprit {blamed}"


__all__ = ["check", "check_dump", "CheckResult", "CheckFailed", "CorruptionDetected", "NothingCompared",
           "MissingPoints", "NOT_JUDGED", "BadInput", "EngineUnavailable"]
