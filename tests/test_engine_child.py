"""An engine that crashes, hangs or runs out of memory is a verdict (`crash`), never a lost run
(docs/engines.md §Processes). Each crash kind is injected into the hf engine's
child process with `crash=KIND@PHASE` and must end as: exit code 2, verdict crash with kind and
phase, the points delivered before the crash judged, reports and the history row written, and
no process of the child's group left behind."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from corruptcheck.cases import get_case
from corruptcheck.cli import app as cli
from corruptcheck.compare import compare
from corruptcheck.engines import child
from corruptcheck.errors import BadInput
from corruptcheck.schedule import Schedule

pytest.importorskip("transformers")
pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]  # this checkout's package, for the subprocesses
SMALL = Schedule(prompt_lens=(20, 20), decode_steps=2, chunk=8)  # 2 sequences: sequence 0 is delivered first


def _group_gone(pgid: int) -> bool:
    """No process of the child's group exists (not even a zombie)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:
                return False
    return True


def test_cli_segv_in_prefill_is_a_crash_verdict_with_reports_history_and_no_orphan(tmp_path):
    out = {k: tmp_path / f"r.{k}" for k in ("json", "xml", "html")}
    db = tmp_path / "runs.sqlite"
    t0 = time.monotonic()
    res = CliRunner().invoke(cli.main, [
        "compare", "--engine", "hf", "--case", "tiny", "--schedule", "prefill-only", "--quiet",
        "--engine-option", "crash=segv@prefill", "--json", str(out["json"]), "--junit", str(out["xml"]),
        "--html", str(out["html"]), "--record", str(db)])
    elapsed = time.monotonic() - t0
    assert res.exit_code == 2, res.output
    r = json.loads(out["json"].read_text())
    c = r["crash"]
    assert r["verdict"] == "crash" and c["kind"] == "signal" and "SIGSEGV" in c["detail"]
    assert c["exit_code"] == -signal.SIGSEGV and c["phase"].startswith("prefill (sequence 1")
    assert c["delivered"]["sequences"] == 1 and c["delivered"]["of"] == 2 and c["delivered"]["tokens"] == 64
    assert r["summary"]["compared"] == c["delivered"]["points_judged"] > 0 and r["summary"]["failed"] == 0
    assert "in string_at" in c["detail"]  # the native crash's innermost Python frame (ctypes)
    assert _group_gone(c["pid"])
    junit = out["xml"].read_text()
    assert 'errors="1"' in junit and '<error type="crash:signal"' in junit and 'failures="0"' in junit
    assert "CRASH" in out["html"].read_text()
    row = sqlite3.connect(db).execute("select verdict, reason from runs").fetchall()
    assert row[0][0] == "crash" and "SIGSEGV" in row[0][1] and "prefill (sequence 1" in row[0][1]
    assert "corruptcheck: error: engine 'hf' crashed: signal in prefill" in res.output
    print(f"segv@prefill: verdict in {elapsed:.1f} s, {r['summary']['compared']} points judged")


@pytest.mark.parametrize("spec,kind,needle,phase", [
    ("abort@decode", "signal", "SIGABRT", "decode (sequence 1, step 1)"),
    ("raise@prefill", "exception", "InjectedFault", "prefill (sequence 1, chunk 0)"),
    ("exit0@decode", "exit", "status 0 without finishing", "decode (sequence 1, step 1)"),
])
def test_mid_run_crash_kinds_judge_what_was_delivered(spec, kind, needle, phase):
    rep = compare(get_case("tiny"), "hf", "float32", schedule=SMALL, crash=spec).report
    c = rep.crash
    assert rep.verdict == "crash" and c["kind"] == kind and needle in c["detail"] and c["phase"] == phase, c
    assert c["delivered"] == {"sequences": 1, "of": 2, "tokens": 22, "points_judged": rep.summary.compared}
    assert rep.summary.compared > 0 and not rep.failed
    assert _group_gone(c["pid"])


def test_hang_is_killed_after_engine_timeout_with_its_phase():
    t0 = time.monotonic()
    rep = compare(get_case("tiny"), "hf", "float32", schedule="prefill-only", crash="hang@load",
                  engine_timeout=2).report
    c = rep.crash
    assert rep.verdict == "crash" and c["kind"] == "timeout" and c["phase"] == "load", c
    assert "no progress for 2 s" in c["detail"] and c["exit_code"] == -signal.SIGKILL
    assert rep.summary.compared == 0 and rep.missing  # nothing delivered: every point missing
    assert all(p.reason.startswith("not delivered: the engine crashed (timeout)") for p in rep.missing)
    assert 2 <= c["wall_s"] < 60 and time.monotonic() - t0 < 90
    assert _group_gone(c["pid"])


def test_memory_growth_past_engine_memory_is_oom():
    rep = compare(get_case("tiny"), "hf", "float32", schedule="prefill-only", crash="oom@load",
                  engine_memory=0.8).report
    c = rep.crash
    assert rep.verdict == "crash" and c["kind"] == "oom" and "over the --engine-memory bound 0.8 GiB" in c["detail"]
    assert 0.8 * 1024 < c["peak_rss_mib"] < 2 * 0.8 * 1024
    assert _group_gone(c["pid"])


@pytest.mark.parametrize("kwargs,needle", [
    ({"crash": "bogus@prefill"}, "expected KIND@PHASE"),
    ({"crash": "oom@load"}, "give --engine-memory"),
    ({"crash": "segv@load", "engine_process": "inline"}, "needs --engine-process child"),
    ({"engine_process": "thread"}, "engine process must be one of"),
])
def test_bad_child_settings_are_one_line(kwargs, needle):
    with pytest.raises(BadInput, match=needle):
        compare(get_case("tiny"), "hf", "float32", **kwargs)


def test_bad_settings_on_the_command_line_exit_2_in_one_line(tmp_path):
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "hf", "--engine-option", "crash=segv@nowhere"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "crash='segv@nowhere'" in res.output


def test_killed_parent_leaves_no_orphan_and_keeps_the_previous_report(tmp_path):
    good = tmp_path / "r.json"
    good.write_text('{"verdict": "pass"}\n')
    parent = subprocess.Popen([sys.executable, "-m", "corruptcheck", "compare", "--engine", "hf", "--case", "tiny",
                               "--engine-option", "crash=hang@load", "--json", str(good)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    kid, workdir, deadline = None, None, time.monotonic() + 120
    while kid is None and time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if entry.name.isdigit() and int(stat[stat.rindex(")") + 2:].split()[1]) == parent.pid \
                    and b"corruptcheck.engines.child_main" in cmd:
                kid, workdir = int(entry.name), Path(cmd[-2].decode())
        time.sleep(0.2)
    assert kid is not None, "the engine child never started"
    while (child.read_json(workdir / child.PROGRESS) or {}).get("phase") != "load" and time.monotonic() < deadline:
        time.sleep(0.2)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    gone = time.monotonic() + 10
    while not _group_gone(kid) and time.monotonic() < gone:
        time.sleep(0.1)
    assert _group_gone(kid), "the engine child outlived its killed parent"
    assert good.read_text() == '{"verdict": "pass"}\n'  # never truncated, never replaced
    assert workdir.exists() and workdir in child.sweep_stale()  # the next run removes the leftovers
    assert not workdir.exists()


def test_pytest_plugin_reports_the_crash_on_the_items_and_the_session_goes_on(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_other="def test_after_the_crash():\n    assert True\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-rf", "--corruptcheck-engine", "hf", "--corruptcheck-case", "tiny",
        "--corruptcheck-schedule", "prefill-only", "--corruptcheck-engine-option", "crash=segv@load",
        "--corruptcheck-record", "runs.sqlite")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] == 1 and outcomes["failed"] > 1  # the verdict item and every required point
    out = result.stdout.str()
    assert "PASSED" not in out or "test_after_the_crash" in out
    assert "FAILED corruptcheck::corruptcheck[tiny::verdict]" in out and "SIGSEGV" in out
    assert "CRASH: the engine's process died: signal in load" in out
    row = sqlite3.connect(pytester.path / "runs.sqlite").execute("select verdict, reason from runs").fetchall()
    assert row == [("crash", row[0][1])] and "SIGSEGV" in row[0][1]


def test_gate_lists_the_crashed_run_and_completes_the_others(tmp_path):
    policy = tmp_path / "p.toml"
    policy.write_text("[[run]]\ncase = 'tiny'\nprecision = 'float32'\nschedule = 'prefill-only'\n"
                      "[[run]]\ncase = 'tiny'\nprecision = 'float32'\n"
                      "schedule = {prompt_lens = [20, 20], decode_steps = 2, chunk = 8}\n")
    res = CliRunner().invoke(cli.main, ["gate", "--engine", "hf", "--policy", str(policy), "--out",
                                        str(tmp_path / "g"), "--engine-option", "crash=segv@decode",
                                        "--record", str(tmp_path / "runs.sqlite")])
    assert res.exit_code == 2, res.output
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["verdict"] == "crash"
    first, second = summary["runs"]
    assert first["verdict"] == "pass" and "crash" not in first
    clean = json.loads((tmp_path / "g" / f"{first['run']}.json").read_text())  # a child that finished
    proc = clean["engine_info"]["process"]
    assert proc["mode"] == "child" and proc["peak_rss_mib"] > 100 and _group_gone(proc["pid"])
    assert proc["injected_crash"] == "crash=segv@decode not reached: the run never entered phase 'decode'"
    assert second["verdict"] == "crash" and second["crash"]["kind"] == "signal"
    assert second["reasons"][0].startswith("engine crashed (signal) in decode (sequence 1, step 1): killed by SIGSEGV")
    crashed = json.loads((tmp_path / "g" / f"{second['run']}.json").read_text())
    assert crashed["verdict"] == "crash" and crashed["case"] == "tiny" and crashed["summary"]["compared"] > 0
    assert 'errors="1"' in (tmp_path / "g" / f"{second['run']}.xml").read_text()
    rows = sqlite3.connect(tmp_path / "runs.sqlite").execute("select verdict from runs order by recorded").fetchall()
    assert [v for (v,) in rows] == ["pass", "crash"]
