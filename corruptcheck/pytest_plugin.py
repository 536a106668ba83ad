"""pytest plugin (entry point `pytest11`): corruptcheck as ordinary test items in an engine's CI.

    pytest --corruptcheck-engine hf --corruptcheck-case tiny -v

adds, per case, `corruptcheck[CASE::verdict]` (the case's overall verdict: fails on `fail`
with the culprit, and on `error` / an engine that cannot run), one item per serving phase of a
served run, `corruptcheck[CASE::prefill chunk J]` / `corruptcheck[CASE::decode step K]` (so a
CI log says which phase broke), and one item per capture point, `corruptcheck[CASE::POINT]`,
that passes or fails on that point's verdict; `missing`, `not-exercised` and `skipped` points,
and phases a run did not serve, are pytest skips with the reason, never passes. The run's
settings and their defaults are compare.RunSettings', the CLI's and the API's: the case's
served schedule where it has one and the engine can serve it. Every
item carries the `corruptcheck` marker. The compare runs once per case per process (each
pytest-xdist worker runs it lazily for the cases it gets; `--dist loadscope` keeps a case on
one worker). The `corruptcheck` fixture exposes the Python API (`corruptcheck.api`).

Without `--corruptcheck-engine` the plugin only registers its options, marker and fixture:
nothing heavy is imported here (torch and the tool load lazily) and no item is added.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from corruptcheck.verdicts import NOT_JUDGED as _NOT_JUDGED, Verdict  # light: no torch

MARKER = "corruptcheck"
VERDICT_ITEM = "verdict"  # corruptcheck[CASE::verdict]; no capture point has this name
# = cases.CASES and compare.RunSettings' choices (those modules import torch; tests assert equality)
CASE_NAMES = ("tiny", "flash-slice", "pro-slice", "flash-engine", "pro-engine", "tiny-release", "pro-release")
SCHEDULE_CHOICES = ("case", "prefill-only")
TEACHER_FORCING_CHOICES = ("on-fail", "always", "never")
ENGINE_PROCESSES = ("auto", "child", "inline")  # = engines.child_engine.PROCESSES
DIAGNOSE_CHOICES = ("on-fail", "always", "never")
_RUNNER = pytest.StashKey["_Runner | None"]()  # None: the plugin is inert in this session


def pytest_addoption(parser):
    group = parser.getgroup("corruptcheck", "corruptcheck: silent-corruption check of an inference engine")
    group.addoption("--corruptcheck-engine", metavar="NAME",
                    help="engine to check: a registered name (hf, reference, dump, ...) or package.module:Class; "
                         "adds one test item per case and capture point")
    group.addoption("--corruptcheck-case", action="append", metavar="CASE",
                    help=f"built-in case to run (repeatable; default: tiny): {', '.join(CASE_NAMES)}")
    group.addoption("--corruptcheck-schedule", choices=SCHEDULE_CHOICES, metavar="|".join(SCHEDULE_CHOICES),
                    help="case (default): serve the case's schedule (chunked prefill, batching, greedy decode, "
                         "one item per phase) where it has one and the engine can serve it; prefill-only: one "
                         "forward per sequence")
    group.addoption("--corruptcheck-teacher-forcing", choices=TEACHER_FORCING_CHOICES,
                    metavar="|".join(TEACHER_FORCING_CHOICES),
                    help="localize by re-running sub-blocks on the engine's own inputs (default: on-fail)")
    group.addoption("--corruptcheck-diagnose", choices=DIAGNOSE_CHOICES, metavar="|".join(DIAGNOSE_CHOICES),
                    help="rank the defect hypotheses on the failing sub-block (default: on-fail; docs/diagnosis.md)")
    group.addoption("--corruptcheck-no-golden", action="store_true", default=False,
                    help="compute the reference now instead of using the golden")
    group.addoption("--corruptcheck-precision", metavar="DTYPE",
                    help="precision the engine runs in: float64, float32 (default), bfloat16")
    group.addoption("--corruptcheck-report", metavar="DIR",
                    help="write DIR/CASE.json and DIR/CASE.html for every case that ran")
    group.addoption("--corruptcheck-record", metavar="PATH",
                    help="record every case's compare (a crash too) in this SQLite results store "
                         "(corruptcheck history)")
    group.addoption("--corruptcheck-engine-process", choices=ENGINE_PROCESSES, metavar="|".join(ENGINE_PROCESSES),
                    help="where the engine runs: auto (default: a supervised child process for vllm, sglang, "
                         "trtllm and an injected crash), child, inline; a child that dies is verdict crash, "
                         "reported on the case's items, and the session goes on")
    group.addoption("--corruptcheck-engine-timeout", type=float, metavar="S",
                    help="child: kill the engine after S seconds without progress (crash, kind timeout)")
    group.addoption("--corruptcheck-engine-memory", type=float, metavar="GIB",
                    help="child: kill the engine when its processes hold more than GIB (crash, kind oom)")
    group.addoption("--corruptcheck-engine-option", action="append", metavar="KEY=VALUE",
                    help="option passed to the engine's run() (repeatable); VALUE is JSON or a string, "
                         "'{case}' in it becomes the case name, e.g. path=dumps/{case}")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}: a corruptcheck point check (added by --corruptcheck-engine)")
    config.stash[_RUNNER] = _Runner.from_config(config)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    """Append the corruptcheck collector to the session's top-level nodes, so its items are
    collected, counted and selected (-k, -m) like any others."""
    rep = yield
    runner = collector.config.stash.get(_RUNNER, None)
    if runner is not None and isinstance(collector, pytest.Session) and rep.passed:
        rep.result.append(CorruptcheckCollector.from_parent(collector, name=MARKER, nodeid=MARKER))
    return rep


def pytest_report_header(config):
    runner = config.stash.get(_RUNNER, None)
    if runner is not None:
        report = f", reports in {runner.report_dir}" if runner.report_dir else ""
        return (f"corruptcheck: engine {runner.engine}, case(s) {', '.join(runner.cases)}, "
                f"precision {runner.precision}{report}")
    return None


@pytest.fixture(scope="session")
def corruptcheck(request) -> "CorruptcheckFixture":
    """The corruptcheck API with this session's settings as defaults."""
    return CorruptcheckFixture(request.config)


class CaseNotCompared(Exception):
    """The engine could not be run or compared on a case (the cause is chained)."""


class _Runner:
    """The session's settings and the per-process cache of results, one compare per case."""

    def __init__(self, engine: str, cases: list[str], precision: str, report_dir: Path | None,
                 engine_options: dict, settings: dict | None = None):
        self.engine, self.cases, self.precision = engine, cases, precision
        self.report_dir, self.engine_options = report_dir, engine_options
        self.settings = settings or {}  # compare.RunSettings fields given on the command line
        self.record_path: Path | None = None  # --corruptcheck-record
        self._results: dict = {}  # case -> CheckResult | the exception the engine raised

    @classmethod
    def from_config(cls, config) -> "_Runner | None":
        engine = config.getoption("corruptcheck_engine")
        given = [flag for flag, dest in (("--corruptcheck-case", "corruptcheck_case"),
                                         ("--corruptcheck-precision", "corruptcheck_precision"),
                                         ("--corruptcheck-report", "corruptcheck_report"),
                                         ("--corruptcheck-record", "corruptcheck_record"),
                                         ("--corruptcheck-engine-option", "corruptcheck_engine_option"),
                                         ("--corruptcheck-schedule", "corruptcheck_schedule"),
                                         ("--corruptcheck-teacher-forcing", "corruptcheck_teacher_forcing"),
                                         ("--corruptcheck-diagnose", "corruptcheck_diagnose"),
                                         ("--corruptcheck-no-golden", "corruptcheck_no_golden"),
                                         ("--corruptcheck-engine-process", "corruptcheck_engine_process"),
                                         ("--corruptcheck-engine-timeout", "corruptcheck_engine_timeout"),
                                         ("--corruptcheck-engine-memory", "corruptcheck_engine_memory"))
                 if config.getoption(dest)]
        if not engine:
            if given:  # a check that silently does not run is what this tool exists to prevent
                raise pytest.UsageError(f"{', '.join(given)} only take effect with --corruptcheck-engine")
            return None
        cases = list(dict.fromkeys(config.getoption("corruptcheck_case") or ["tiny"]))
        precision = config.getoption("corruptcheck_precision") or "float32"
        report = config.getoption("corruptcheck_report")
        report_dir = Path(config.invocation_params.dir, report).resolve() if report else None
        options = _parse_options(config.getoption("corruptcheck_engine_option") or [])
        _validate(engine, cases, precision, options)
        record = config.getoption("corruptcheck_record")
        settings = {k: v for k, v in (("schedule", config.getoption("corruptcheck_schedule")),
                                      ("teacher_forcing", config.getoption("corruptcheck_teacher_forcing")),
                                      ("diagnose", config.getoption("corruptcheck_diagnose")),
                                      ("use_golden", False if config.getoption("corruptcheck_no_golden") else None),
                                      ("engine_process", config.getoption("corruptcheck_engine_process")),
                                      ("engine_timeout", config.getoption("corruptcheck_engine_timeout")),
                                      ("engine_memory", config.getoption("corruptcheck_engine_memory")))
                    if v is not None}
        for flag, key in (("--corruptcheck-engine-timeout", "engine_timeout"),
                          ("--corruptcheck-engine-memory", "engine_memory")):
            if key in settings and not 0 < settings[key] < float("inf"):
                raise pytest.UsageError(f"{flag} must be a positive number, not {settings[key]!r}")
        runner = cls(engine, cases, precision, report_dir, options, settings)
        if record:
            from corruptcheck.history import store
            from corruptcheck.errors import BadInput

            runner.record_path = Path(config.invocation_params.dir, record).resolve()
            try:
                store.check(runner.record_path)
            except BadInput as exc:
                raise pytest.UsageError(str(exc)) from None
        return runner

    def options_for(self, case: str) -> dict:
        return {k: v.replace("{case}", case) if isinstance(v, str) else v for k, v in self.engine_options.items()}

    def result(self, case: str):
        """The CheckResult of `case`, computed on first use; raises CaseNotCompared when the
        engine could not be run on it (remembered, so it is not re-run for every item)."""
        if case not in self._results:
            from corruptcheck import api

            try:
                res = api.check(self.engine, case, self.precision, **self.settings, **self.options_for(case))
            except Exception as exc:  # noqa: BLE001 - any engine failure is reported by the items
                from corruptcheck.errors import EngineFailed

                # an engine crash: name what the engine itself raised (the wrapper is the tool's)
                self._results[case] = exc.__cause__ if isinstance(exc, EngineFailed) and exc.__cause__ else exc
                if self.record_path and isinstance(exc, EngineFailed):
                    from corruptcheck.history import store
                    store.record_crash(self.record_path, "pytest", self.engine, case, self.precision, str(exc))
            else:
                self._results[case] = res
                if self.report_dir:
                    res.write_reports(self.report_dir)
                if self.record_path:
                    from corruptcheck.history import store
                    store.record_report(self.record_path, res.to_json(), "pytest")
        out = self._results[case]
        if isinstance(out, Exception):
            raise CaseNotCompared(f"corruptcheck could not compare engine {self.engine!r} on case {case!r}: "
                                  f"{type(out).__name__}: {out}") from out
        return out

    def items(self, parent):
        from corruptcheck.cases import get_case
        from corruptcheck.points import capture_points

        xdist = parent.config.pluginmanager.hasplugin("xdist")
        for case in self.cases:
            marks = [pytest.mark.corruptcheck] + ([pytest.mark.xdist_group(f"corruptcheck-{case}")] if xdist else [])
            c = get_case(case)
            phases = [] if self.settings.get("schedule") == "prefill-only" or c.schedule is None else [
                phase_item_name(label) for label in c.schedule.phase_labels()]
            names = [VERDICT_ITEM] + phases + [spec.name for spec in capture_points(c.config)]
            for point in names:
                cls = VerdictItem if point == VERDICT_ITEM else PhaseItem if point in phases else PointItem
                name = f"{MARKER}[{case}::{point}]"
                item = cls.from_parent(parent, name=name, case=case, point=point)
                for mark in marks:
                    item.add_marker(mark)
                yield item


def phase_item_name(label) -> str:
    """("prefill", 1) -> "prefill chunk 1", ("decode", 3) -> "decode step 3" (a phase item's
    name after CASE::; no capture point has a space in its name)."""
    kind, index = label
    return f"{kind} {'chunk' if kind == 'prefill' else 'step'} {index}"


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--corruptcheck-engine-option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def _validate(engine: str, cases: list[str], precision: str, options: dict) -> None:
    """Unknown names end the session at once (exit 4) instead of failing every item."""
    from corruptcheck.cases import get_case
    from corruptcheck.engines import engine_class
    from corruptcheck.errors import BadInput
    from corruptcheck.reference import Precision

    try:
        for case in cases:
            get_case(case)
    except BadInput as exc:
        raise pytest.UsageError(f"--corruptcheck-case: {exc}") from None
    try:
        cls = engine_class(engine)
        if options:
            cls.parse_options(options)
        Precision.of(precision)
    except (BadInput, ValueError) as exc:
        raise pytest.UsageError(f"corruptcheck: {exc}") from None


class CorruptcheckCollector(pytest.Collector):
    """Parent of the generated items (one per session)."""

    def collect(self):
        return list(self.config.stash[_RUNNER].items(self))


class _CaseItem(pytest.Item):
    def __init__(self, *, case: str, point: str, **kwargs):
        super().__init__(**kwargs)
        self.case, self.point = case, point

    def _result(self):
        return self.config.stash[_RUNNER].result(self.case)

    def reportinfo(self):
        # a location whose path part equals the node id's ("corruptcheck"), as for a test file
        return self.path / MARKER, None, self.name

    def repr_failure(self, excinfo, style=None):
        from corruptcheck.api import CheckFailed

        if isinstance(excinfo.value, CheckFailed):
            return str(excinfo.value)
        if isinstance(excinfo.value, CaseNotCompared):
            from corruptcheck.errors import BadInput, EngineUnavailable

            cause = excinfo.value.__cause__
            if self.point != VERDICT_ITEM or cause is None or isinstance(cause, (BadInput, EngineUnavailable)):
                return str(excinfo.value)  # one line
            # an unexpected engine error: the verdict item shows where the engine raised it
            trace = super().repr_failure(pytest.ExceptionInfo.from_exception(cause), style=style or "short")
            return _EngineErrorRepr(str(excinfo.value), trace)
        return super().repr_failure(excinfo, style=style)


@dataclass
class _Crash:
    """What pytest's one-line summaries (`-rf`, JUnit's message) read from a failure."""
    path: str
    lineno: int
    message: str

    def __str__(self):
        return f"{self.path}:{self.lineno}: {self.message}"


class _EngineErrorRepr:
    """The verdict item's failure when the engine raised: the headline, then where it raised.
    A plain multi-line string would be printed whole in the `-rf` summary on CI (pytest does
    that when $CI is set); this keeps the summary at the headline."""

    def __init__(self, headline: str, trace):
        self.headline, self.trace = headline, trace
        crash = getattr(trace, "reprcrash", None)
        self.reprcrash = _Crash(getattr(crash, "path", MARKER), getattr(crash, "lineno", 0), headline)

    def toterminal(self, tw):
        tw.line(self.headline)
        self.trace.toterminal(tw)

    def __str__(self):  # pytest-xdist ships a failure that is not an exception repr as str()
        return f"{self.headline}\n{self.trace}"


class VerdictItem(_CaseItem):
    """The case's overall verdict: pass, fail (with the first divergence and the culprit) or
    error (nothing compared, or the engine could not run)."""

    def runtest(self):
        res = self._result()
        self.user_properties.append(("corruptcheck_verdict", str(res.verdict)))  # plain str: xdist sends it
        res.assert_ok()


class PointItem(_CaseItem):
    """One capture point's verdict."""

    def runtest(self):
        res = self._result()
        try:
            p = res.point(self.point)
        except KeyError:
            pytest.skip("not in this case's reference (the case has no such point)")
        self.user_properties.append(("corruptcheck_verdict", str(p.verdict)))
        if p.ratio is not None:
            self.user_properties.append(("error_over_tolerance", f"{p.ratio:.4g}"))
        if res.verdict == Verdict.CRASH and p.verdict == Verdict.MISSING:  # not delivered: the crash, not a skip
            _raise_crash(res)
        if p.verdict in _NOT_JUDGED:
            pytest.skip(f"{p.verdict}: {p.reason}")
        if p.verdict == Verdict.FAIL:
            from corruptcheck.api import CorruptionDetected

            raise CorruptionDetected(f"{res.explain(p.name)}\n{res.summary()}")


class PhaseItem(_CaseItem):
    """One phase of a served run (a prefill chunk or a decode step), judged on its own rows: fails
    with the phase's worst point; a phase the run did not serve (the engine cannot serve the
    schedule, or it stopped early) is a skip with the reason, never a pass."""

    def runtest(self):
        res = self._result()
        self.user_properties.append(("corruptcheck_phase", self.point))
        phase = next((p for p in res.phases if phase_item_name(p.label) == self.point), None)
        if phase is None and res.verdict == Verdict.CRASH:
            _raise_crash(res)
        if phase is None:
            note = (res.report.engine_info or {}).get("schedule_note")
            pytest.skip(f"not served: {note}" if note else "not served: the run has no such phase")
        self.user_properties.append(("corruptcheck_verdict", str(phase.verdict)))
        if phase.worst_ratio is not None:
            self.user_properties.append(("error_over_tolerance", f"{phase.worst_ratio:.4g}"))
        if phase.verdict == Verdict.FAIL:
            from corruptcheck.api import CorruptionDetected

            first = (phase.first_divergence or {}).get("name") or phase.worst_point
            raise CorruptionDetected(f"{self.point} fails: {phase.failed_points or 'some'} point(s) over their "
                                     f"tolerance on this phase's {phase.tokens} token(s), first {first}, worst "
                                     f"{phase.worst_point} at err/tol {phase.worst_ratio:.3g}\n{res.summary()}")
        if phase.verdict != Verdict.PASS:
            pytest.skip(f"{phase.verdict}: nothing judged on this phase's rows")


def _raise_crash(res):
    """An item the crash took away (a point or phase the engine never delivered): it fails with
    the crash, one line."""
    from corruptcheck.api import EngineCrash
    from corruptcheck.reports.render import crash_text

    raise EngineCrash(f"engine {res.engine!r} crashed before delivering this: {crash_text(res.crash)}", res.crash)


class CorruptcheckFixture:
    """What the `corruptcheck` fixture gives a test: `check()`, `check_dump()` and `result()`
    with the command line's engine, case and precision as defaults."""

    def __init__(self, config):
        self._runner: _Runner | None = config.stash.get(_RUNNER, None)

    @property
    def engine(self) -> str | None:
        return self._runner.engine if self._runner else None

    @property
    def cases(self) -> list[str]:
        return self._runner.cases if self._runner else ["tiny"]

    @property
    def precision(self) -> str:
        return self._runner.precision if self._runner else "float32"

    def check(self, engine=None, case=None, precision=None, **engine_options):
        """`corruptcheck.api.check`; without `engine`, the --corruptcheck-engine one (and its
        --corruptcheck-engine-option values), else the test is skipped."""
        from corruptcheck import api

        case = case or self.cases[0]
        if engine is None:
            if self._runner is None:
                pytest.skip("no engine given: pass one to check() or run pytest with --corruptcheck-engine")
            engine, engine_options = self._runner.engine, {**self._runner.options_for(case), **engine_options}
        settings = self._runner.settings if self._runner else {}
        return api.check(engine, case, precision or self.precision, **{**settings, **engine_options})

    def check_dump(self, path, case=None, precision=None, **options):
        """`corruptcheck.api.check_dump` (the case defaults to the first --corruptcheck-case)."""
        from corruptcheck import api

        return api.check_dump(path, case or self.cases[0], precision, **options)

    def result(self, case=None):
        """The session's result for `case` (the same one the generated items judge), or a skip
        when pytest runs without --corruptcheck-engine."""
        if self._runner is None:
            pytest.skip("corruptcheck is not enabled (run pytest with --corruptcheck-engine)")
        return self._runner.result(case or self.cases[0])
