"""The pytest plugin (docs/pytest.md), exercised through `pytester`: one item per case x capture point
plus a verdict item and (served by default) one per phase, pass/fail per point and per phase,
missing points as skips, JUnit through pytest's `--junitxml`, reports, pytest-xdist, an inert
plugin without `--corruptcheck-engine`, and the same report from the CLI, the API and the plugin.
Runs that import torch use subprocesses (a few seconds each), so torch state does not leak."""
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from corruptcheck.api import NOT_JUDGED, check
from corruptcheck.cases import CASES, get_case
from corruptcheck.compare import DEFAULTS, DIAGNOSE, SCHEDULES, TEACHER_FORCING
from corruptcheck.points import capture_points
from corruptcheck.judge.tolerance import SAFETY

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROPPED = "layers.0.moe.weights"  # a required point upstream of the injected fault
ENGINES = f'''
import sys

sys.path.insert(0, {str(Path(__file__).parent)!r})  # tests/: fault_engines

from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.hf_engine import HFEngine
from corruptcheck.faults import FaultyEngine, get_fault
from fault_engines import ScaledAttentionHF


class DecodeScaledHF(FaultyEngine):
    """hf whose decode steps scale one layer's attention output (a decode-only kernel bug)."""

    def __init__(self):
        super().__init__(HFEngine(), get_fault("decode-kernel-scale"))


class ScaledAttnOut(ScaledAttentionHF):
    """hf with layers.1.attn.out scaled by 1.01 (a silent scale bug), without {DROPPED}."""
    name, factor, drop = "hf-scaled", 1.01, ("{DROPPED}",)


class NotInstalled(Engine):
    name = "not-installed"

    def available(self):
        return False, "its runtime is not installed here"


class Crashes(Engine):
    name = "crashes"

    def run(self, case, precision, **options):
        raise RuntimeError("illegal memory access")


class CapturesNothing(Engine):
    name = "captures-nothing"

    def run(self, case, precision, **options):
        return Capture({{}}, self.name, precision)
'''
POINTS = [s.name for s in capture_points(get_case("tiny").config)]
PHASES = [f"{k} {'chunk' if k == 'prefill' else 'step'} {i}" for k, i in get_case("tiny").schedule.phase_labels()]
PREFILL_ITEMS = ["corruptcheck[tiny::verdict]"] + [f"corruptcheck[tiny::{p}]" for p in POINTS]
ITEMS = PREFILL_ITEMS[:1] + [f"corruptcheck[tiny::{p}]" for p in PHASES] + PREFILL_ITEMS[1:]  # served (the default)


def _junit(path) -> dict:
    """testcase name -> (outcome, message, text) from a --junitxml file."""
    out = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        child = next((c for c in tc if c.tag in ("failure", "error", "skipped")), None)
        out[tc.get("name")] = ("passed", "", "") if child is None else (
            child.tag, child.get("message", ""), child.text or "")
    return out


# The in-process compares run in module fixtures, i.e. before `pytester` snapshots sys.modules:
# its restore would otherwise drop transformers' modules and break re-importing them.
@pytest.fixture(scope="module")
def clean():
    pytest.importorskip("transformers")
    return check("hf", "tiny", "float32", schedule="prefill-only")


@pytest.fixture(scope="module")
def faulty():
    pytest.importorskip("transformers")
    namespace = {"__name__": "ccengines_in_process"}
    exec(compile(ENGINES, "ccengines", "exec"), namespace)
    return check(namespace["ScaledAttnOut"](), "tiny", "float32", schedule="prefill-only")


@pytest.fixture
def engines_file(pytester):
    """ccengines.py next to the tests, importable as `ccengines:Class` (also in process)."""
    pytester.makepyfile(ccengines=ENGINES)
    pytester.syspathinsert()


def test_clean_engine_all_items_pass_under_xdist_with_junit_and_reports(clean, pytester, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two workers: one BLAS thread each
    expected = clean
    pytester.makepyfile(test_engine_ci='''
        def test_fixture_gives_the_session_result(corruptcheck):
            res = corruptcheck.result("tiny")
            assert corruptcheck.engine == "hf" and res.passed
            assert res.point("layers.1.attn.out").verdict == "pass"

        def test_fixture_check_uses_the_command_line_engine(corruptcheck):
            res = corruptcheck.check(case="tiny")
            assert (res.engine, res.verdict, res.phases) == ("hf", "pass", [])  # the session's prefill-only
            res.assert_ok()
    ''')
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "-v", "--corruptcheck-engine", "hf", "--corruptcheck-case", "tiny",
        "--corruptcheck-schedule", "prefill-only",
        f"--junitxml={junit}", "--corruptcheck-report", "reports", "--corruptcheck-record", "runs.sqlite")
    judged = [p for p in expected.points if p.verdict not in NOT_JUDGED]
    assert all(p.verdict == "pass" for p in judged)
    result.assert_outcomes(passed=len(judged) + 3, skipped=len(expected.points) - len(judged))
    result.stdout.fnmatch_lines(["*created: 2/2 workers*"])
    out = result.stdout.str()
    assert "PASSED corruptcheck::corruptcheck[tiny::layers.1.attn.out]" in out
    cases = _junit(junit)
    assert set(cases) == set(PREFILL_ITEMS) | {"test_fixture_gives_the_session_result",
                                       "test_fixture_check_uses_the_command_line_engine"}
    for p in expected.points:
        outcome, message, _ = cases[f"corruptcheck[tiny::{p.name}]"]
        if p.verdict in NOT_JUDGED:  # MTP and finer points hf does not expose: skips, never passes
            assert (outcome, message) == ("skipped", f"{p.verdict}: {p.reason}")
        else:
            assert outcome == "passed", p.name
    assert cases["corruptcheck[tiny::mtp.0.logits]"][1] == "skipped: finer point the engine does not expose"
    assert json.loads((pytester.path / "reports" / "tiny.json").read_text())["verdict"] == "pass"
    assert (pytester.path / "reports" / "tiny.html").stat().st_size > 1000
    from corruptcheck.history.store import list_runs  # each xdist worker that ran the case recorded its run
    runs = list_runs(pytester.path / "runs.sqlite")
    assert 1 <= len(runs) <= 2 and {(r["kind"], r["engine"], r["case_name"], r["verdict"]) for r in runs} == {
        ("pytest", "hf", "tiny", "pass")}


def test_fault_fails_exactly_the_failing_points_and_names_the_culprit(faulty, pytester, engines_file, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # `tiny` gains nothing from more threads
    expected = faulty  # the same compare, in process
    assert expected.culprit["name"] == "layers.1.attn.out"
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:xdist", "-rs", "--corruptcheck-engine", "ccengines:ScaledAttnOut",
        "--corruptcheck-schedule", "prefill-only", f"--junitxml={junit}")
    cases = _junit(junit)
    assert sorted(cases) == sorted(PREFILL_ITEMS)
    failing = {name for name, (outcome, _, _) in cases.items() if outcome == "failure"}
    assert failing == {f"corruptcheck[tiny::{p.name}]" for p in expected.failed} | {"corruptcheck[tiny::verdict]"}
    assert "corruptcheck[tiny::layers.1.attn.out]" in failing and "corruptcheck[tiny::logits]" in failing
    assert "corruptcheck[tiny::layers.1.attn_norm]" not in failing  # upstream of the fault
    result.assert_outcomes(failed=len(failing), passed=sum(p.verdict == "pass" for p in expected.points),
                           skipped=sum(p.verdict in NOT_JUDGED for p in expected.points))
    # the culprit's own item: point, metric, value, tolerance and its derivation, worst token, role
    _, _, text = cases["corruptcheck[tiny::layers.1.attn.out]"]
    assert text.startswith("layers.1.attn.out: FAIL (engine 'ccengines:ScaledAttnOut', case 'tiny'")
    assert "metric: rel_l2 = 0.01 > tolerance" in text
    assert f"max({SAFETY:g} x worst free rel_l2 of honest float32 runs" in text
    assert "worst token: token " in text and "teacher forcing: CULPRIT" in text
    assert "first divergence layers.1.attn.out; culprit layers.1.attn.out" in text
    # a downstream item says it only inherits the drift
    _, _, text = cases["corruptcheck[tiny::layers.3.out]"]
    assert "teacher forcing: inherited" in text and "(culprit layers.1.attn.out)" in text
    # the verdict item carries the headline
    _, _, text = cases["corruptcheck[tiny::verdict]"]
    assert f"FAIL (80 compared, {len(expected.failed)} failed, 1 missing" in text
    # the missing point is a skip with its reason, in JUnit and in the terminal summary
    assert cases[f"corruptcheck[tiny::{DROPPED}]"][:2] == ("skipped", "missing: engine did not capture this point")
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] *missing: engine did not capture this point"])


def test_inert_without_engine_option(pytester):
    pytester.makepyfile('''
        import sys

        def test_nothing_heavy_is_imported(corruptcheck):
            assert "torch" not in sys.modules and "corruptcheck.api" not in sys.modules
            assert corruptcheck.engine is None

        def test_session_result_skips(corruptcheck):
            corruptcheck.result()

        def test_check_without_an_engine_skips(corruptcheck):
            corruptcheck.check()
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(["plugins:*corruptcheck*", "collected 3 items"])
    assert "corruptcheck is not enabled" in result.stdout.str() and "no engine given" in result.stdout.str()
    result.stdout.no_fnmatch_line("*corruptcheck[[]*")


@pytest.mark.parametrize("engine,error,traceback", [
    ("NotInstalled", "EngineUnavailable: engine 'ccengines:NotInstalled' is not available: "
                     "its runtime is not installed here", False),
    ("Crashes", "RuntimeError: illegal memory access", True),
])
@pytest.mark.parametrize("on_ci", [False, True])
def test_engine_that_cannot_run_fails_every_item(pytester, monkeypatch, engines_file, engine, error, traceback,
                                                 on_ci):
    # on CI ($CI set) pytest prints each failure's whole message in the -rf summary, not a trimmed line
    if on_ci:
        monkeypatch.setenv("CI", "1")
    else:
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.delenv("BUILD_NUMBER", raising=False)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-rf",
                                          "--corruptcheck-engine", f"ccengines:{engine}")
    result.assert_outcomes(failed=len(ITEMS))
    headline = f"corruptcheck could not compare engine 'ccengines:{engine}' on case 'tiny': {error}"
    assert sum(line.startswith(headline) for line in result.outlines) == len(ITEMS)  # one line per item
    # an unexpected error: the verdict item (only) shows where the engine raised it, in its
    # failure section; the -rf summary keeps to the headline
    assert result.stdout.str().count("ccengines.py:") == (1 if traceback else 0)
    summary = [line for line in result.outlines if line.startswith("FAILED corruptcheck::")]
    assert len(summary) == len(ITEMS)
    if on_ci:
        assert f"FAILED corruptcheck::corruptcheck[tiny::verdict] - {headline}" in summary


def test_nothing_compared_fails_the_verdict_item_and_marker_selects(pytester, engines_file):
    pytester.makepyfile(test_other="def test_other():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", "-m", "corruptcheck", "-rf",
                                          "--corruptcheck-engine", "ccengines:CapturesNothing")
    # it cannot serve: the phase items are skips (not served), never passes
    result.assert_outcomes(failed=1, skipped=len(POINTS) + len(PHASES), deselected=1)
    result.stdout.fnmatch_lines(["corruptcheck: engine 'ccengines:CapturesNothing' on case 'tiny' at float32: "
                                 "nothing compared: the engine captured none of the case's points*",
                                 "FAILED corruptcheck::corruptcheck[[]tiny::verdict[]] - corruptcheck: *"])


@pytest.mark.parametrize("args,text", [
    (["--corruptcheck-engine", "hf", "--corruptcheck-case", "no-such-case"], "unknown case 'no-such-case'"),
    (["--corruptcheck-engine", "no-such-engine"], "unknown engine 'no-such-engine'"),
    (["--corruptcheck-engine", "hf", "--corruptcheck-precision", "float7"], "unknown precision 'float7'"),
    (["--corruptcheck-case", "tiny"], "--corruptcheck-case only take effect with --corruptcheck-engine"),
    (["--corruptcheck-engine", "hf", "--corruptcheck-schedule", "decode-only"], "invalid choice: 'decode-only'"),
    (["--corruptcheck-schedule", "prefill-only"], "--corruptcheck-schedule only take effect with --corruptcheck-engine"),
])
def test_usage_errors(pytester, args, text):
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert text in result.stderr.str()


def test_plugin_choices_are_the_tools():
    """The plugin names cases and settings without importing torch; they are the tool's own."""
    from corruptcheck import pytest_plugin

    assert pytest_plugin.CASE_NAMES == tuple(CASES)
    assert pytest_plugin.SCHEDULE_CHOICES == SCHEDULES and pytest_plugin.TEACHER_FORCING_CHOICES == TEACHER_FORCING
    assert pytest_plugin.DIAGNOSE_CHOICES == DIAGNOSE
    assert (DEFAULTS.schedule, DEFAULTS.teacher_forcing, DEFAULTS.use_golden, DEFAULTS.diagnose) == (
        "case", "on-fail", True, "on-fail")


def test_served_by_default_a_decode_only_fault_fails_its_phase_items(pytester, engines_file, monkeypatch):
    """The default run serves the case's schedule: one item per phase; a defect only in decode
    steps fails the decode step items and the verdict, while every prefill chunk item passes."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    junit = pytester.path / "junit.xml"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--corruptcheck-engine",
                                  "ccengines:DecodeScaledHF", f"--junitxml={junit}", "--corruptcheck-report", "reports")
    cases = _junit(junit)
    assert sorted(cases) == sorted(ITEMS)
    phase = {p: cases[f"corruptcheck[tiny::{p}]"][0] for p in PHASES}
    assert {p: o for p, o in phase.items() if p.startswith("prefill")} == {
        p: "passed" for p in PHASES if p.startswith("prefill")}
    assert "failure" in [o for p, o in phase.items() if p.startswith("decode")]
    assert cases["corruptcheck[tiny::verdict]"][0] == "failure"
    doc = json.loads((pytester.path / "reports" / "tiny.json").read_text())
    assert doc["schedule"] != "prefill-only" and doc["verdict"] == "fail"
    assert [p["verdict"] for p in doc["phases"] if p["phase"] == "decode"] == [
        "fail" if o == "failure" else "pass" for p, o in phase.items() if p.startswith("decode")]


def _strip_timings(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k != "timings"}


@pytest.fixture(scope="module")
def api_docs(one_torch_thread):
    """The API's report of hf on tiny per schedule setting (the API's default: served), computed
    before `pytester` snapshots sys.modules (see `clean`)."""
    pytest.importorskip("transformers")
    return {"case": check("hf", "tiny", "float32").to_json(),
            "prefill-only": check("hf", "tiny", "float32", schedule="prefill-only").to_json()}


@pytest.mark.parametrize("schedule", ["case", "prefill-only"])
def test_cli_api_and_plugin_write_the_same_report(schedule, api_docs, pytester, monkeypatch):
    """The three front doors give byte-identical report JSON (timings aside) for the same
    settings, so they cannot drift apart: hf on tiny, served (the default) and prefill-only."""
    import subprocess
    import sys

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    extra = [] if schedule == "case" else ["--schedule", "prefill-only"]
    cli_json = pytester.path / "cli.json"
    run = subprocess.run([sys.executable, "-m", "corruptcheck", "compare", "--engine", "hf", "--case", "tiny",
                          "--json", str(cli_json), "--quiet", *extra], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    api_doc = api_docs[schedule]
    plugin_args = [] if schedule == "case" else ["--corruptcheck-schedule", schedule]
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", "--corruptcheck-engine", "hf",
                                  "--corruptcheck-report", "reports", *plugin_args)
    docs = [json.loads(cli_json.read_text()), json.loads(json.dumps(api_doc)),
            json.loads((pytester.path / "reports" / "tiny.json").read_text())]
    texts = [json.dumps(_strip_timings(d), sort_keys=False) for d in docs]
    assert texts[0] == texts[1] == texts[2]
    assert (docs[0]["schedule"] == "prefill-only") == (schedule == "prefill-only")
