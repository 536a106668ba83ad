"""`corruptcheck gate`: a pre-deploy gate. Runs a policy's suite of compares (cases x
precisions x batch sizes x sequence lengths), checks coverage and allowed missing points,
writes JSON + JUnit + HTML per run and a summary, and returns 0 pass / 1 fail / 2 error."""
from __future__ import annotations

import fnmatch
import json
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from itertools import product
from pathlib import Path

from corruptcheck.storage.atomic import atomic_write
from corruptcheck.cases import Case, get_case
from corruptcheck.errors import BadInput, EngineFailed, EngineUnavailable
from corruptcheck.judge.results import Report
from corruptcheck.schedule import Schedule
from corruptcheck.judge.tolerance import FLOOR
from corruptcheck.verdicts import Verdict

DEFAULT_KEYS = {"teacher_forcing", "allowed_missing"}
PRECISIONS = tuple(FLOOR)  # every precision an engine may declare has tolerances
RUN_KEYS = {"case", "cases", "precision", "precisions", "batch_size", "batch_sizes", "seq_lens", "seq_lens_list",
            "schedule", "schedules"}
TOP_KEYS = {"name", "description", "defaults", "coverage", "run"}
COVERAGE_KEYS = {"min_tokens_beyond_window": "tokens_beyond_window",
                 "min_compressed_entries": "compressed_entries",
                 "min_indexer_pruning_fraction": "indexer_pruning_fraction",
                 "min_clamp_hits": "clamp_hits",
                 "min_decode_pairs": "decode_pairs"}  # compared (point, token) pairs of decode steps


@dataclass(frozen=True)
class GateRun:
    case: Case
    precision: str
    batch_size: int = 1
    schedule: object = "case"  # "case" | "prefill-only" | schedule.Schedule

    @property
    def id(self) -> str:
        base = f"{self.case.name}-{self.precision}-b{self.batch_size}"
        if self.schedule == "prefill-only":
            return base + "-prefill"
        if isinstance(self.schedule, Schedule):
            s = self.schedule
            return base + f"-serve{'+'.join(map(str, s.prompt_lens))}d{s.decode_steps}c{s.chunk or 0}"
        return base


@dataclass
class GatePolicy:
    name: str
    runs: list
    teacher_forcing: str = "on-fail"
    allowed_missing: list = field(default_factory=list)
    coverage: dict = field(default_factory=dict)
    source: str = ""


def default_policy_text() -> str:
    return resources.files("corruptcheck").joinpath("policies/deepseek_v4.toml").read_text()


def _table(doc: dict, key: str, source: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise BadInput(f"{source}: {key} must be a table")
    return value


def _schedule(value, source: str):
    """"case", "prefill-only", or a table {prompt_lens = [...], decode_steps = N, chunk = C,
    arrivals = [...]}."""
    if value in ("case", "prefill-only"):
        return value
    keys = {"prompt_lens", "decode_steps", "chunk", "arrivals"}
    if not isinstance(value, dict) or set(value) - keys or "prompt_lens" not in value:
        raise BadInput(f"{source}: schedule must be \"case\", \"prefill-only\" or a table with prompt_lens "
                       f"(and decode_steps, chunk, arrivals), got {value!r}")
    lens, arrivals = value["prompt_lens"], value.get("arrivals")
    if not isinstance(lens, list) or not isinstance(arrivals, (list, type(None))):
        raise BadInput(f"{source}: schedule prompt_lens and arrivals must be lists of integers")
    return Schedule(prompt_lens=tuple(lens), decode_steps=value.get("decode_steps", 16), chunk=value.get("chunk"),
                    arrivals=tuple(arrivals) if arrivals is not None else None)


def _as_list(table: dict, one: str, many: str, default=None) -> list:
    if one in table and many in table:
        raise BadInput(f"policy run: give {one!r} or {many!r}, not both")
    if many in table:
        value = table[many]
        if not isinstance(value, list) or not value:
            raise BadInput(f"policy run: {many!r} must be a non-empty list")
        return value
    if one in table:
        return [table[one]]
    if default is None:
        raise BadInput(f"policy run: missing {one!r}")
    return default


def _derived_case(case: Case, seq_lens) -> Case:
    if not isinstance(seq_lens, list) or not seq_lens or not all(isinstance(n, int) and n > 0 for n in seq_lens):
        raise BadInput(f"policy run: seq_lens must be a list of positive integers, got {seq_lens!r}")
    return replace(case, name=f"{case.name}@{'+'.join(map(str, seq_lens))}", seq_lens=tuple(seq_lens),
                   description=f"{case.description} (sequence lengths {seq_lens})")


def parse_policy(text: str, source: str = "<policy>") -> GatePolicy:
    doc = _read_toml(text, source)
    defaults = _table(doc, "defaults", source)
    bad_defaults = set(defaults) - DEFAULT_KEYS
    if bad_defaults:
        raise BadInput(f"{source}: unknown default(s): {', '.join(sorted(bad_defaults))}")
    coverage = _coverage_minimums(doc, source)
    runs = _runs(doc, source)
    tf = defaults.get("teacher_forcing", "on-fail")
    if tf not in ("on-fail", "always", "never"):
        raise BadInput(f"{source}: teacher_forcing must be on-fail, always or never")
    allowed = defaults.get("allowed_missing", [])
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise BadInput(f"{source}: allowed_missing must be a list of glob patterns")
    return GatePolicy(doc.get("name", source), runs, tf, allowed, coverage, source)


def _read_toml(text: str, source: str) -> dict:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInput(f"{source}: not valid TOML ({exc})") from None
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise BadInput(f"{source}: unknown policy key(s): {', '.join(sorted(unknown))}")
    for key in ("name", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise BadInput(f"{source}: {key} must be a string")
    return doc


def _coverage_minimums(doc: dict, source: str) -> dict:
    coverage = _table(doc, "coverage", source)
    bad_cov = set(coverage) - set(COVERAGE_KEYS)
    if bad_cov:
        raise BadInput(f"{source}: unknown coverage requirement(s): {', '.join(sorted(bad_cov))}")
    for key, minimum in coverage.items():
        if isinstance(minimum, bool) or not isinstance(minimum, (int, float)) or not minimum >= 0:
            raise BadInput(f"{source}: coverage {key} must be a non-negative number, got {minimum!r}")
    return coverage


def _runs(doc: dict, source: str) -> list:
    """Every [[run]] table expanded over its lists (cases x precisions x batch sizes x sequence
    lengths x schedules)."""
    run_tables = doc.get("run", [])
    if not isinstance(run_tables, list) or not all(isinstance(t, dict) for t in run_tables):
        raise BadInput(f"{source}: run must be an array of tables ([[run]])")
    runs = []
    for table in run_tables:
        bad = set(table) - RUN_KEYS
        if bad:
            raise BadInput(f"{source}: unknown run key(s): {', '.join(sorted(bad))}")
        cases = _as_list(table, "case", "cases")
        precisions = _as_list(table, "precision", "precisions")
        batches = _as_list(table, "batch_size", "batch_sizes", [1])
        lens = _as_list(table, "seq_lens", "seq_lens_list", [None])
        schedules = [_schedule(s, source) for s in _as_list(table, "schedule", "schedules", ["case"])]
        runs += [_gate_run(*combo, source) for combo in product(cases, precisions, batches, lens, schedules)]
    if not runs:
        raise BadInput(f"{source}: the policy has no [[run]]")
    return runs


def _gate_run(case_name, prec, batch, seq_lens, sched, source: str) -> GateRun:
    if not isinstance(case_name, str):
        raise BadInput(f"{source}: case names must be strings, got {case_name!r}")
    try:
        case = get_case(case_name)
    except BadInput as exc:
        raise BadInput(f"{source}: {exc}") from None
    if not isinstance(prec, str) or prec not in PRECISIONS:
        raise BadInput(f"{source}: unknown precision {prec!r} (one of {', '.join(PRECISIONS)})")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise BadInput(f"{source}: batch sizes must be positive integers, got {batch!r}")
    if batch > 1 and sched != "prefill-only" and not (sched == "case" and case.schedule is None):
        sched = "prefill-only"  # a right-padded batch is one prefill forward
    return GateRun(_derived_case(case, seq_lens) if seq_lens else case, prec, batch, sched)


def load_policy(path: str | None) -> GatePolicy:
    if path is None:
        return parse_policy(default_policy_text(), "default policy (deepseek_v4.toml)")
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"policy file {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"policy file {p}: {exc}") from None
    return parse_policy(text, str(p))


def coverage_problems(cov: dict, required: dict) -> list[str]:
    problems = []
    for key, minimum in required.items():
        value = cov.get(COVERAGE_KEYS[key], 0)
        if value < minimum:
            problems.append(f"{COVERAGE_KEYS[key]} {value} < {minimum}")
    return problems


@dataclass
class RunOutcome:
    run: GateRun
    verdict: Verdict  # pass | fail | error | crash (the engine's process died; its report is written)
    reasons: list
    report: Report | None = None  # None: the compare itself could not run

    def summary(self) -> dict:
        rep = self.report
        sched = self.run.schedule
        return {"run": self.run.id, "case": self.run.case.name, "precision": self.run.precision,
                "batch_size": self.run.batch_size, "schedule": sched.to_dict() if isinstance(sched, Schedule) else sched,
                "phases": [{"phase": p.phase, "step": p.step, "chunk": p.chunk, "verdict": p.verdict,
                            "worst_ratio": p.worst_ratio}
                           for p in (rep.phases if rep else []) if p.verdict == Verdict.FAIL],
                "verdict": self.verdict, "reasons": self.reasons,
                "first_divergence": rep.first_divergence if rep else None,
                "culprit": rep.culprit.to_json() if rep and rep.culprit else None,
                "worst_ratio": rep.summary.worst_ratio if rep else None,
                "missing": [p.name for p in (rep.points if rep else []) if p.verdict == Verdict.MISSING],
                **({"crash": rep.crash} if rep and rep.crash else {})}


def judge(run: GateRun, rep: Report, policy: GatePolicy) -> RunOutcome:
    reasons = []
    if rep.verdict == Verdict.CRASH:  # never judged by the policy: whatever it delivered, the run did not complete
        from corruptcheck.errors import crash_line

        return RunOutcome(run, Verdict.CRASH, [f"engine {crash_line(rep.crash or {})}"], rep)
    # incomplete = nothing failed but points are missing: the policy's allowed_missing judges those
    verdict = Verdict.PASS if rep.verdict == Verdict.INCOMPLETE else rep.verdict
    if verdict == Verdict.ERROR:
        why = (f"unknown point name(s): {', '.join(rep.unknown_names[:5])}" if rep.unknown_names
               else "nothing was compared")
        return RunOutcome(run, Verdict.ERROR, [why], rep)
    if verdict == Verdict.FAIL:
        name = rep.culprit.name if rep.culprit else (rep.first_divergence or {}).get("name")
        reasons.append(f"corruption at {name}" + (" (teacher-forcing culprit)" if rep.culprit else ""))
    missing = [p.name for p in rep.points if p.verdict == Verdict.MISSING]
    disallowed = [m for m in missing if not any(fnmatch.fnmatchcase(m, pat) for pat in policy.allowed_missing)]
    if disallowed:
        verdict = Verdict.FAIL
        reasons.append(f"{len(disallowed)} required point(s) missing: {', '.join(disallowed[:4])}"
                       + (" ..." if len(disallowed) > 4 else ""))
    served = {"decode_pairs": rep.summary.pairs_by_phase.get("decode", 0)}
    cov = coverage_problems({**rep.coverage, **served}, policy.coverage)
    note = (rep.engine_info or {}).get("schedule_note")
    if note and run.schedule != "prefill-only":
        reasons.append(f"not served: {note}")
    if cov:
        verdict = Verdict.FAIL
        reasons.append("coverage not met: " + "; ".join(cov))
    return RunOutcome(run, verdict, reasons, rep)


def run_gate(engine_name: str, policy: GatePolicy, out_dir: Path, progress=None, engine=None, settings=None,
             engine_options: dict | None = None) -> list[RunOutcome]:
    """Every run of the policy, each written as it ends; a run whose engine crashed is a
    `crash` outcome with its report, and the next run starts. `settings`: compare.RunSettings
    (its engine_process / engine_timeout / engine_memory apply; the policy sets the rest)."""
    from corruptcheck.compare import DEFAULTS, compare
    from corruptcheck.reports.html import write_html
    from corruptcheck.reports.render import write_json, write_junit

    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for run in policy.runs:
        if progress:
            progress(run)
        try:
            st = settings or DEFAULTS
            res = compare(run.case, engine_name, run.precision, teacher_forcing=policy.teacher_forcing,
                          engine=engine, schedule=run.schedule, engine_process=st.engine_process,
                          engine_timeout=st.engine_timeout, engine_memory=st.engine_memory,
                          **dict(engine_options or {}), **({"batch": True} if run.batch_size > 1 else {}))
        except (BadInput, EngineUnavailable, EngineFailed) as exc:
            outcomes.append(RunOutcome(run, Verdict.ERROR, [str(exc)]))
            continue
        rep = res.report
        rep.gate = {"policy": policy.name, "run": run.id, "batch_size": run.batch_size}
        write_json(rep.to_json(), str(out_dir / f"{run.id}.json"))
        write_junit(rep, str(out_dir / f"{run.id}.xml"))
        write_html(rep, str(out_dir / f"{run.id}.html"))
        outcomes.append(judge(run, rep, policy))
    return outcomes


def overall(outcomes: list[RunOutcome]) -> str:
    """error > crash > fail > pass: a suite with a crashed run is never a pass (exit 2)."""
    verdicts = {o.verdict for o in outcomes}
    return next((v for v in (Verdict.ERROR, Verdict.CRASH, Verdict.FAIL) if v in verdicts), Verdict.PASS)


def write_summary(engine_name: str, policy: GatePolicy, outcomes: list[RunOutcome], out_dir: Path) -> dict:
    summary = {"engine": engine_name, "policy": policy.name, "policy_source": policy.source,
               "verdict": overall(outcomes), "runs": [o.summary() for o in outcomes]}
    atomic_write(str(out_dir / "summary.json"), json.dumps(summary, indent=1, default=str, allow_nan=False))
    return summary
