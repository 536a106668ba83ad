"""compare: the reference (float64, from the golden when valid) against an engine on a case,
every point diffed with precision-aware tolerances, then localized by teacher forcing.

The result is the typed Report (judge/results.py: what every renderer, the API, the plugin,
the gate and the store take). `CompareResult` adds to it only the Case object it was judged on,
because a report holds a case by name and spec, not its tokens and weights (a served run's
decoded tokens, a llama.cpp run's rounded weights)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from corruptcheck.cases import Case
from corruptcheck.judge.differ import Comparison, compare_points
from corruptcheck.engines import Capture, get_engine
from corruptcheck.engines.child import ChildLimits
from corruptcheck.engines.child_engine import PROCESSES, ChildEngine, wants_child
from corruptcheck.errors import BadInput, EngineCrashed, EngineFailed, EngineUnavailable, crash_line, one_line
from corruptcheck.judge.diagnose import diagnose as diagnose_run
from corruptcheck.judge.localize import attach, teacher_force
from corruptcheck.judge.noise import measure
from corruptcheck.judge.phases import (MIN_MEASURED_TOKENS, fail_by_phase, first_failing_phase, judge_phases, label_key,
                                       pairs_by_phase, phase_rows)
from corruptcheck.judge.results import Point, Report
from corruptcheck.points import capture_points
from corruptcheck.reference import REFERENCE_VERSION, Precision
from corruptcheck.judge.reference_data import (ReferenceData, golden_noise, noise_for, reference_for,  # noqa: F401
                                               reference_run)
from corruptcheck.schedule import check_prompts, decoded_case, prompt_case
from corruptcheck.verdicts import Verdict

TEACHER_FORCING = ("on-fail", "always", "never")
DIAGNOSE = ("on-fail", "always", "never")
SCHEDULES = ("case", "prefill-only")


@dataclass(frozen=True)
class RunSettings:
    """How a front door runs a compare: one definition, one set of defaults, shared by the CLI,
    the API, the gate and the pytest plugin. `schedule`: "case" serves the case's schedule
    (chunked prefill, batching, greedy decode, judged by phase) where the case has one and the
    engine can serve it; "prefill-only" runs one forward per sequence. `teacher_forcing`:
    when to localize (on-fail, always, never). `use_golden`: the reference from the golden when
    it is valid. `diagnose`: when to rank the defect hypotheses on the failing sub-blocks
    (judge/diagnose.py; on-fail, always, never)."""
    schedule: str = "case"
    teacher_forcing: str = "on-fail"
    use_golden: bool = True
    diagnose: str = "on-fail"
    # where the engine runs (engines/child_engine.py): auto = a child process for the real engines
    # (vllm, sglang, trtllm) and for an injected crash, in-process otherwise; child; inline.
    # engine_timeout: seconds without progress before the child is killed (crash "timeout");
    # engine_memory: GiB of resident memory the child's process tree may hold (crash "oom")
    engine_process: str = "auto"
    engine_timeout: float | None = None
    engine_memory: float | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise BadInput(f"schedule must be one of {', '.join(SCHEDULES)}, not {self.schedule!r}")
        if self.teacher_forcing not in TEACHER_FORCING:
            raise BadInput(f"teacher_forcing must be one of {', '.join(TEACHER_FORCING)}, not {self.teacher_forcing!r}")
        if self.diagnose not in DIAGNOSE:
            raise BadInput(f"diagnose must be one of {', '.join(DIAGNOSE)}, not {self.diagnose!r}")
        if self.engine_process not in PROCESSES:
            raise BadInput(f"engine_process must be one of {', '.join(PROCESSES)}, not {self.engine_process!r}")
        for name in ("engine_timeout", "engine_memory"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")):
                raise BadInput(f"{name} must be a positive number, not {v!r}")

    def compare(self, case: Case, engine_name: str, precision, engine=None, **engine_options) -> "CompareResult":
        return compare(case, engine_name, precision, use_golden=self.use_golden, teacher_forcing=self.teacher_forcing,
                       engine=engine, schedule=self.schedule, diagnose=self.diagnose,
                       engine_process=self.engine_process, engine_timeout=self.engine_timeout,
                       engine_memory=self.engine_memory, **engine_options)


DEFAULTS = RunSettings()


@dataclass
class CompareResult:
    """A judged compare: its report, and the Case it was judged on (the case, its weights as the
    engine read them, or for a served run the tokens the engine decoded)."""
    report: Report
    case: Case


def compare(case: Case, engine_name: str, precision: str, use_golden: bool = True,
            teacher_forcing: str = "on-fail", engine=None, schedule=None, diagnose: str = "on-fail",
            hypotheses=None, engine_process: str = "auto", engine_timeout: float | None = None,
            engine_memory: float | None = None, **engine_options) -> CompareResult:
    """`schedule`: a schedule.Schedule to serve the case with (chunked prefill + greedy decode,
    judged by phase), "case" (the case's own schedule when it has one and the engine can serve
    it; otherwise prefill-only, and the report says what was not checked), or None /
    "prefill-only" (one forward per sequence). `diagnose`: on-fail (a failing compare whose
    teacher forcing ran), always, never; `hypotheses`: the ones to rank (default: the registry,
    judge/hypotheses.py). `engine_process`, `engine_timeout`, `engine_memory`: see RunSettings;
    an engine whose child process dies gives the verdict `crash`, with what it delivered before
    it died judged (`_compare_crashed`)."""
    if diagnose not in DIAGNOSE:
        raise BadInput(f"diagnose must be one of {', '.join(DIAGNOSE)}, not {diagnose!r}")
    precision = Precision.of(precision).name if precision else None  # None: the engine declares it
    engine = engine or get_engine(engine_name)
    crash = engine_options.pop("crash", None)  # test-only fault injection, KIND@PHASE (engines/progress.py)
    case = engine.weights_case(case, **engine_options)  # e.g. the case as a Q8_0 GGUF holds it
    if getattr(engine, "supervises_own_child", False) and engine_process != "inline" and not crash:
        # an engine that already runs in a worker process of its own (llama.cpp): the same
        # supervisor and limits watch that worker
        engine_options["_limits"] = ChildLimits(engine_timeout, engine_memory)
    elif wants_child(engine, engine_name, engine_process, crash):
        engine = ChildEngine(engine, engine_name, ChildLimits(engine_timeout, engine_memory), crash)
    note = ""
    if isinstance(schedule, str):
        schedule, note = resolve_schedule(case, engine, schedule)
    t0 = time.perf_counter()
    try:
        if schedule is not None:
            res, comp, engine_points, noise = _compare_served(case, engine_name, engine, precision, schedule,
                                                              teacher_forcing, engine_options)
        else:
            res, comp, engine_points, noise = _compare_prefill(case, engine_name, engine, precision, use_golden,
                                                               teacher_forcing, engine_options)
    except EngineCrashed as exc:
        res, engine_points = _compare_crashed(case, engine_name, exc, precision, schedule, t0), None
    finally:
        if isinstance(engine, ChildEngine):
            engine.close()
    rep = res.report
    if note:
        rep.engine_info["schedule_note"] = note
    if engine_points is not None and (diagnose == "always" or (diagnose == "on-fail" and rep.verdict == Verdict.FAIL
                                                                and rep.teacher_forcing == "run")):
        _diagnose(res, comp, engine_points, noise, diagnose == "always", hypotheses)
    return res


def _compare_crashed(case: Case, engine_name: str, exc: EngineCrashed, precision, schedule, t0: float) -> CompareResult:
    """The engine's process died. The sequences it delivered before dying are judged like any
    capture (reference and noise computed now on exactly those tokens); every point it did not
    deliver is `missing`; the verdict is `crash` whatever the delivered points say."""
    t1 = time.perf_counter()
    partial = exc.partial
    tol_prec = Precision.of(partial["precision"] if partial else (precision or "float32")).name
    specs = capture_points(case.config)
    why = f"not delivered: the engine {crash_line(exc.crash)}"
    if partial:
        dcase = decoded_case(case, partial["sequences"])  # the case's name, the tokens it delivered
        ref = ReferenceData(*reference_run(dcase), "computed (float64 on the sequences the engine delivered "
                                                   "before it crashed)")
        noise = None if tol_prec == "float64" else golden_noise(case, tol_prec)
        noise_source = "golden noise of the case (the delivered tokens are a subset)" if noise is not None else ""
        if noise is None and tol_prec != "float64":
            noise, noise_source = measure(dcase, ref.points, tol_prec), "measured now on the delivered tokens"
        comp = compare_points(specs, ref.points, partial["points"], tol_prec, ref.coverage, noise)
        coverage, report_case = ref.coverage, dcase
        tokens = dcase.num_tokens
    else:
        comp = Comparison([Point(s.name, Verdict.MISSING if s.required else Verdict.SKIPPED, s.layer, s.kind,
                                 reason=why) for s in specs], tol_prec)
        coverage, report_case, tokens = {}, case, 0
    for p in comp.points:
        if p.verdict == Verdict.MISSING:
            p.reason = why
    t2 = time.perf_counter()
    n_seq = len(schedule.prompt_lens) if schedule is not None else len(case.seq_lens)
    crash = {**exc.crash, "delivered": {"sequences": len(partial["sequences"]) if partial else 0, "of": n_seq,
                                        "tokens": tokens, "points_judged": comp.compared}}
    process = {k: crash[k] for k in ("pid", "wall_s", "peak_rss_mib") if k in crash}
    return CompareResult(Report.judged(
        comp, case=report_case, engine=engine_name, coverage=coverage,
        reference={"version": REFERENCE_VERSION, "precision": "float64",
                   "source": ref.source if partial else "not run (nothing delivered)", "golden_digest": None},
        engine_info={"process": {"mode": "child", **process}},
        timings={"engine_s": t1 - t0, "reference_s": 0.0, "noise_s": 0.0, "diff_s": t2 - t1, "localize_s": 0.0},
        noise_model=(noise_source or "float64: floor tolerance") if partial else "none", crash=crash,
    ), report_case)


def _diagnose(res: CompareResult, comp: Comparison, engine_points: dict, noise, always: bool, hypotheses) -> None:
    """Rank the hypotheses on the failing sub-blocks (judge/diagnose.py) into the report's
    diagnosis; with `always`, teacher forcing is run first where it was not (to find those
    sub-blocks)."""
    t0 = time.perf_counter()
    rep = res.report
    if rep.teacher_forcing != "run":
        rep.culprit = attach(comp, teacher_force(res.case, engine_points, comp.precision, noise))
        rep.teacher_forcing = "run"
    rep.diagnosis = diagnose_run(res.case, engine_points, comp.precision, noise, comp, hypotheses, always)
    rep.timings["diagnose_s"] = time.perf_counter() - t0


def _compare_prefill(case: Case, engine_name: str, engine, precision, use_golden: bool, teacher_forcing: str,
                     engine_options: dict) -> tuple:
    """(the result, the comparison, the engine's points, the noise model): the last three for the
    diagnosis."""
    # the engine first, then the reference: a real engine's memory is freed before the float64
    # reference of a wide case is loaded, so the peak is the larger of the two, not their sum
    t0 = time.perf_counter()
    if isinstance(engine, ChildEngine):
        # the engine's own process: the reference loads here while the child starts and runs
        # (this process's peak stays the reference plus one engine point; the two processes add)
        engine.start(case, precision, **engine_options)
        ref = reference_for(case) if use_golden else ReferenceData(*reference_run(case), "computed (--no-golden)")
        t_ref = time.perf_counter() - t0
    cap: Capture = run_engine(engine, engine_name, case, precision, **engine_options)
    t1 = time.perf_counter()
    if not isinstance(engine, ChildEngine):
        ref = reference_for(case) if use_golden else ReferenceData(*reference_run(case), "computed (--no-golden)")
    t2 = time.perf_counter()
    tol_prec = Precision.of(cap.precision).name
    noise, noise_source = noise_for(case, ref, tol_prec)
    t3 = time.perf_counter()
    comp = compare_points(capture_points(case.config), ref.points, cap.points, tol_prec, ref.coverage, noise,
                          cap.meta.get("capture", {}).get("skipped"))
    t4 = time.perf_counter()
    culprit, tf = None, "not run"
    if teacher_forcing == "always" or (teacher_forcing == "on-fail" and comp.verdict == Verdict.FAIL):
        culprit = attach(comp, teacher_force(case, cap.points, tol_prec, noise), judge=teacher_forcing == "always")
        tf = "run"
    t5 = time.perf_counter()
    return CompareResult(Report.judged(
        comp, case=case, engine=engine_name, coverage=ref.coverage,
        reference={"version": REFERENCE_VERSION, "precision": "float64", "source": ref.source,
                   "golden_digest": ref.digest},
        engine_info=cap.meta,
        timings={"engine_s": t1 - t0, "reference_s": t2 - t1 if not isinstance(engine, ChildEngine) else t_ref,
                 "noise_s": t3 - t2, "diff_s": t4 - t3, "localize_s": t5 - t4,
                 **({"reference_overlapped_engine": True} if isinstance(engine, ChildEngine) else {})},
        noise_model=noise_source, culprit=culprit, teacher_forcing=tf,
    ), case), comp, cap.points, noise


SCHEDULES = ("case", "prefill-only")


def run_engine(engine, engine_name: str, case: Case, precision, **options) -> Capture:
    """engine.run; an exception the engine itself raises becomes EngineFailed (one line naming
    the engine, the exception and where it was raised; the original is chained)."""
    try:
        return engine.run(case, precision, **options)
    except (BadInput, EngineUnavailable, EngineFailed):
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the engine raises is a result about the engine
        raise EngineFailed(f"engine {engine_name!r} raised {one_line(exc)} "
                           "(the engine crashed: not a verdict on its numbers)") from exc


def resolve_schedule(case: Case, engine, choice: str):
    """(schedule or None, note): "case" serves the case's schedule when it has one and the engine
    can run it; otherwise the compare is prefill-only and the note says what was not checked."""
    if choice not in SCHEDULES:
        raise BadInput(f"unknown schedule {choice!r} (one of {', '.join(SCHEDULES)})")
    if choice == "prefill-only" or case.schedule is None:
        return None, "" if choice == "prefill-only" else f"case {case.name} has no serving schedule"
    if not getattr(engine, "serves", False):
        return None, (f"engine {getattr(engine, 'name', '') or type(engine).__name__!r} has no scheduled capture yet: "
                      "decode steps, chunked prefill and batching were not checked")
    return case.schedule, ""


def _compare_served(case: Case, engine_name: str, engine, precision, schedule, teacher_forcing: str,
                    engine_options: dict) -> tuple:
    """(result, comparison, engine points, noise) as _compare_prefill. The engine serves the
    schedule's prompts and decodes greedily; the reference runs on the
    tokens it fed (the decoded case, float64, computed now: no golden covers the engine's own
    tokens); every point is judged on the whole run and per phase."""
    if not getattr(engine, "serves", False):
        raise EngineUnavailable(f"engine {engine_name!r} has no scheduled capture (chunked prefill / decode) yet; "
                                "compare it with --schedule prefill-only")
    t0 = time.perf_counter()
    cap: Capture = run_engine(engine, engine_name, prompt_case(case, schedule), precision, schedule=schedule,
                              **engine_options)
    t1 = time.perf_counter()
    served = cap.meta.get("served") or {}
    if "sequences" not in served or "rows" not in served:
        raise BadInput(f"engine {engine_name!r} returned no served sequences / row labels for the schedule")
    check_prompts(served["sequences"], prompt_case(case, schedule).sequences())
    dcase = decoded_case(case, served["sequences"])
    ref = ReferenceData(*reference_run(dcase), "computed (float64 on the engine's own decoded tokens)")
    rows = [tuple(r) for r in served["rows"]]
    if len(rows) != dcase.num_tokens:
        raise BadInput(f"engine {engine_name!r} labelled {len(rows)} rows for {dcase.num_tokens} tokens")
    t2 = time.perf_counter()
    tol_prec = Precision.of(cap.precision).name
    rows_by_phase = phase_rows(case.config, ref.points, rows, list(dcase.seq_lens))
    noise, noise_source = _served_noise(dcase, ref, tol_prec, rows_by_phase)
    t3 = time.perf_counter()
    specs = capture_points(case.config)
    skips = cap.meta.get("capture", {}).get("skipped")
    comp = compare_points(specs, ref.points, cap.points, tol_prec, ref.coverage, noise, skips)
    phases, phase_failures = judge_phases(specs, ref.points, cap.points, rows_by_phase, case.config,
                                          list(dcase.seq_lens), tol_prec, ref.coverage, noise, skips)
    fail_by_phase(comp, phase_failures)
    t4 = time.perf_counter()
    culprit, tf = None, "not run"
    if teacher_forcing == "always" or (teacher_forcing == "on-fail" and comp.verdict == Verdict.FAIL):
        culprit, tf = _localize_served(dcase, cap.points, tol_prec, noise, comp, phases, rows_by_phase)
    t5 = time.perf_counter()
    greedy = greedy_choices(ref.points.get("logits"), served["sequences"], schedule,
                            ((noise or {}).get("free", {}).get("logits") or {}).get("token_rel"))
    meta = {k: v for k, v in cap.meta.items() if k != "served"}
    return CompareResult(Report.judged(
        comp, case=dcase, engine=engine_name, coverage=ref.coverage,
        reference={"version": REFERENCE_VERSION, "precision": "float64", "source": ref.source, "golden_digest": None},
        engine_info=meta,
        timings={"engine_s": t1 - t0, "reference_s": t2 - t1, "noise_s": t3 - t2, "diff_s": t4 - t3,
                 "localize_s": t5 - t4},
        noise_model=noise_source, culprit=culprit, teacher_forcing=tf,
        # a served run (schedule.py): the schedule, verdicts by phase, the engine's greedy choices
        schedule=schedule.to_dict(), phases=phases, pairs_by_phase=pairs_by_phase(phases), greedy=greedy,
        batching=served.get("batching"),
    ), dcase), comp, cap.points, noise


def _localize_served(dcase: Case, engine_points: dict, precision: str, noise, comp, phases: list, rows_by_phase: dict):
    """Teacher forcing within the first failing phase (its rows, per-token bounds): the culprit
    of the step where the divergence appeared, with that phase on it. When no phase fails or
    nothing local fails there (a phase of a few tokens has generous per-token bounds), the
    whole run is localized."""
    first = first_failing_phase(phases)
    if first is not None:
        culprit = attach(comp, teacher_force(dcase, engine_points, precision, noise, rows=rows_by_phase[first.label],
                                             group=label_key(first.label)))
        if culprit is not None:
            culprit.phase = first.where
            return culprit, "run"
    return attach(comp, teacher_force(dcase, engine_points, precision, noise)), "run"


def _served_noise(dcase: Case, ref: ReferenceData, precision: str, rows_by_phase: dict) -> tuple[dict | None, str]:
    """Measured now on the decoded tokens, for the whole run and for each phase's rows
    (phases.phase_noise), which a golden of other tokens cannot hold."""
    if precision == "float64":
        return None, "float64: floor tolerance (exact engine)"
    groups = {label_key(lab): rows_of for lab, rows_of in rows_by_phase.items()  # smaller phases: per-token bound
              if len(rows_of.get("embed", ())) >= MIN_MEASURED_TOKENS}
    return measure(dcase, ref.points, precision, groups=groups), "measured now on the decoded tokens, per phase"


def greedy_choices(logits, sequences, schedule, token_rel: float | None) -> dict:
    """Each decode step fed the engine's own greedy token; where it is not the reference's argmax
    at the previous position, say by how much. A swap of two logits needs them to move apart by
    the reference's margin, and an honest engine moves a pair by at most sqrt(2) x its per-token
    logits error (<= token_rel x ||row||, measured); so within SAFETY x that it is a near-tie,
    beyond it a real disagreement (float64: any swap beyond 1e-12 of the row). Never re-aligned."""
    from corruptcheck.judge.tolerance import SAFETY

    out = {"steps": 0, "agree": 0, "near_ties": 0, "disagreements": [],
           "tie_bound": "exact (float64)" if token_rel is None else
           f"sqrt(2) x {SAFETY:g} x honest per-token logits error ({token_rel:.3g}) x ||row||"}
    if logits is None:
        return out
    at = 0
    for i, (seq, prompt) in enumerate(zip(sequences, schedule.prompt_lens)):
        for pos in range(prompt, len(seq)):
            row = logits[at + pos - 1].double()
            chosen, best = int(seq[pos]), int(row.argmax())
            out["steps"] += 1
            if chosen == best:
                out["agree"] += 1
                continue
            norm = float(row.norm()) or 1.0
            rel = float(row[best] - row[chosen]) / norm
            if rel <= (math.sqrt(2) * SAFETY * token_rel if token_rel is not None else 1e-12):
                out["near_ties"] += 1
            else:
                out["disagreements"].append({"sequence": i, "step": pos - prompt + 1, "position": pos,
                                             "engine_token": chosen, "reference_token": best,
                                             "margin_rel_to_row_norm": rel})
        at += len(seq)
    return out
