"""Reports of a compare: the JSON document (stable schema), the terminal table, JUnit XML and
a self-contained HTML page (reports/html.py)."""
from __future__ import annotations

import json
import math
from xml.sax.saxutils import quoteattr

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corruptcheck.storage.atomic import atomic_write
from corruptcheck.judge.coverage import coverage_sentence
from corruptcheck.judge.phases import phase_words, summarize
from corruptcheck.judge.results import Report
from corruptcheck.verdicts import Verdict

# the terminal style of each verdict (the gate's table too)
VERDICT_STYLE = {Verdict.PASS: "green", Verdict.FAIL: "bold red", Verdict.MISSING: "yellow",
                 Verdict.NOT_EXERCISED: "cyan", Verdict.SKIPPED: "dim", Verdict.ERROR: "bold red",
                 Verdict.INCOMPLETE: "bold yellow", Verdict.UNCHECKED: "yellow", Verdict.CRASH: "bold magenta"}


def write_json(doc: dict, path: str) -> None:
    """A JSON document to a file, atomically (a report's is `Report.to_json()`)."""
    atomic_write(path, json.dumps(doc, indent=1, allow_nan=False, default=str))


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def _ratio_cell(r):
    if r is None:
        return "-"
    if not math.isfinite(r):
        return "[bold red]inf[/]"
    style = "bold red" if r > 1 else ("yellow" if r > 0.5 else "green")
    return f"[{style}]{r:.3g}[/]"


def print_table(rep: Report, console: Console | None = None) -> None:
    """The terminal report of a Report."""
    console = console or Console()
    console.print(_points_table(rep))
    _print_skipped(rep, console)
    _print_coverage(rep, console)
    _print_schedule(rep, console)
    _print_verdict(rep, console)


def _points_table(rep: Report) -> Table:
    table = Table(title=f"corruptcheck compare · engine={rep.engine} · case={rep.case} · "
                        f"precision={rep.precision}", title_justify="left")
    for col, just in (("point", "left"), ("verdict", "left"), ("err/tol", "right"), ("rel_l2", "right"),
                      ("tolerance", "right"), ("norm_ratio", "right"), ("local", "right"), ("note", "left")):
        table.add_column(col, justify=just, no_wrap=col != "note")
    points = [p for p in rep.points if p.verdict != Verdict.SKIPPED]
    if rep.verdict == Verdict.FAIL:  # worst first
        points.sort(key=lambda p: -(p.finite_ratio if p.finite_ratio is not None else
                                    (math.inf if p.verdict == Verdict.FAIL else -1)))
    for p in points:
        table.add_row(p.name, f"[{VERDICT_STYLE[p.verdict]}]{p.verdict}[/]", _ratio_cell(p.finite_ratio), *_point_cells(p),
                      p.reason)
    return table


def _point_cells(p) -> tuple:
    """rel_l2, tolerance, norm_ratio and local cells of a point's row."""
    m, t, loc = p.metrics or {}, p.tolerance or {}, p.finite_local or {}
    if p.kind == "index" and m:
        rel, tol, nr = f"{m['genuine']} genuine", f"tie {t.get('tie_margin_rel', 0):.1e}", f"{m['tie_explained']} ties"
    else:
        rel, tol, nr = _fmt(m.get("rel_l2")), _fmt(t.get("value")), _fmt(m.get("norm_ratio"), ".5f")
    local = loc.get("role") or (_fmt(loc.get("ratio"), ".2g") if loc.get("ratio") is not None else "")
    return rel, tol, nr, local


def _print_skipped(rep: Report, console: Console) -> None:
    skipped = [p for p in rep.points if p.verdict == Verdict.SKIPPED]
    if skipped:
        groups: dict = {}
        for p in skipped:
            key = "mtp.0.*" if p.name.startswith("mtp.") else p.name.split(".", 2)[-1]
            groups[key] = groups.get(key, 0) + 1
        console.print("skipped (finer points this engine does not expose): "
                      + ", ".join(f"{k} x{n}" for k, n in groups.items()), style="dim")


def _print_coverage(rep: Report, console: Console) -> None:
    cov = rep.coverage
    console.print(f"coverage: {coverage_sentence(cov)}")
    console.print(f"reference: float64, {rep.reference['source']}; tolerances: {rep.tolerance_precision} "
                  f"noise model ({rep.noise_model})", style="dim")


def _print_schedule(rep: Report, console: Console) -> None:
    if rep.phases:
        sched = rep.schedule
        console.print(f"schedule: prompts {'+'.join(map(str, sched['prompt_lens']))}, prefill chunk "
                      f"{sched['chunk'] or 'whole prompt'}, {sched['decode_steps']} greedy decode steps; "
                      f"{rep.batching or ''}")
        for line in summarize(rep.phases):
            console.print(("[bold red]" if ": FAIL" in line else "[green]") + escape(line) + "[/]")
        _print_greedy(rep.greedy or {}, console)
    elif rep.schedule == "prefill-only":
        note = (rep.engine_info or {}).get("schedule_note")
        if note:
            console.print(f"schedule: prefill only — {note}", style="yellow")


def _print_greedy(g: dict, console: Console) -> None:
    if g.get("disagreements"):
        d = g["disagreements"][0]
        console.print(f"[bold red]greedy:[/] {len(g['disagreements'])} of {g['steps']} decode steps fed a token that is "
                      f"not the reference's argmax beyond a near-tie (first: sequence {d['sequence']} step "
                      f"{d['step']}, engine {d['engine_token']} vs reference {d['reference_token']})")
    elif g:
        console.print(f"greedy: {g['agree']} of {g['steps']} decode tokens are the reference's argmax, "
                      f"{g['near_ties']} near-ties", style="dim")


def _print_verdict(rep: Report, console: Console) -> None:
    s = rep.summary
    line = (f"[{VERDICT_STYLE[rep.verdict]}]{rep.verdict.upper()}[/]: {s.compared} compared, {s.failed} failed, "
            f"{s.missing} missing, {s.skipped} skipped, {s.not_exercised} not exercised")
    if s.worst_ratio:
        line += f"; worst err/tol {_fmt(s.worst_ratio['ratio'], '.3g')} at {s.worst_ratio['name']}"
    if rep.first_divergence:
        line += f"; first divergence: {rep.first_divergence['name']}"
    console.print(line)
    if rep.crash:
        console.print(f"[bold magenta]engine crashed[/] ({escape(crash_text(rep.crash))})")
    c = rep.culprit
    if c:
        where = phase_words(c.phase)
        within = f" within {where}" if where else ""
        console.print(f"[bold red]culprit[/] (teacher forcing{within}): {c.name} — the sub-block's own error is "
                      f"{_fmt(c.local_ratio, '.3g')}x its local tolerance ({c.reason})")
    elif rep.verdict == Verdict.FAIL and rep.teacher_forcing == "run":
        console.print("teacher forcing: no sub-block exceeds its local tolerance on its own input; the failure is "
                      "accumulated drift", style="yellow")
    for i, line in enumerate(diagnosis_lines(rep.diagnosis)):
        console.print(("[bold red]" if i == 0 and rep.explained else "") + escape(line) + ("[/]" if i == 0 and rep.explained else ""))


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def diagnosis_lines(diagnosis, closest: int = 3) -> list[str]:
    """The diagnosis in words (docs/diagnosis.md): the explaining hypothesis with its fitted
    parameters, residual and the runner-up, or 'unexplained' with the closest ones; then the
    per-token evidence."""
    if diagnosis is None:
        return []
    if not diagnosis:
        return ["diagnosis: no hypothesis applies to the failing sub-block"]
    first = diagnosis[0]
    same = [d for d in diagnosis if d.sub_block == first.sub_block]
    runner = same[1] if len(same) > 1 else None
    best = next((d for d in diagnosis if d.explains), None)
    if best is not None:
        rest = f"; runner-up {runner.hypothesis} {_fmt(runner.residual_ratio, '.3g')}x" if best is first and runner else ""
        lines = [f"diagnosis: {best.hypothesis} ({_params(best.params)}) explains {best.point}: the engine is within "
                 f"{_fmt(best.residual_ratio, '.3g')}x the local tolerance of it, vs "
                 f"{_fmt(best.reference_ratio, '.3g')}x of the reference{rest}"]
    else:
        near = ", ".join(f"{d.hypothesis} {_fmt(d.residual_ratio, '.3g')}x" for d in same[:closest])
        within = first.reference_ratio is not None and first.reference_ratio <= 1
        lines = [f"diagnosis: {'nothing to explain' if within else 'unexplained'} at {first.point} (reference "
                 f"{_fmt(first.reference_ratio, '.3g')}x its local tolerance); closest: {near}"]
        best = first
    ev = best.evidence
    if ev:
        lines.append(f"  evidence at {ev['point']}: {ev['failing']} of {ev['tokens']} tokens fail against the reference, "
                     f"the hypothesis changes {ev['changed_by_hypothesis']}, explains {ev['failing_explained']} of the "
                     f"failing ({ev['failing_unexplained']} not; first failing tokens {ev['first_failing_tokens']})")
    return lines


def crash_text(crash: dict) -> str:
    """A crash record in words: kind, phase, detail, what it delivered."""
    d = crash.get("delivered") or {}
    return (f"{crash.get('kind')} in {crash.get('phase')}: {crash.get('detail')}; delivered {d.get('sequences', 0)} of "
            f"{d.get('of', '?')} sequence(s), {d.get('points_judged', 0)} point(s) judged")


def junit_xml(rep: Report) -> str:
    """One <testcase> per point; fail -> <failure>, missing / not-exercised / skipped ->
    <skipped> (never a pass). A crashed engine adds one <testcase name="engine"> with an
    <error> (the run did not complete: an error, not a failure)."""
    suite = f"corruptcheck.{rep.engine}.{rep.case}.{rep.precision}"
    cases, failures, skipped, errors = [], 0, 0, 0
    if rep.crash:
        errors = 1
        detail = "\n".join((rep.crash.get("stderr_tail") or [])[-12:])
        cases.append(f"  <testcase classname={quoteattr(suite)} name=\"engine\">\n    <error type={quoteattr('crash:' + str(rep.crash.get('kind')))} "
                     f"message={quoteattr('engine crashed: ' + crash_text(rep.crash))}>{_xml_text(detail)}</error>\n  </testcase>")
    for p in rep.points:
        attrs = f'classname={quoteattr(suite)} name={quoteattr(p.name)}'
        if p.verdict == Verdict.PASS:
            cases.append(f"  <testcase {attrs}/>")
            continue
        if p.verdict == Verdict.FAIL:
            failures += 1
            loc = p.finite_local or {}
            msg = f"{p.reason}" + (f"; teacher forcing: {loc['role']}" if loc.get("role") else "")
            detail = json.dumps({"metrics": p.metrics, "tolerance": p.tolerance, "local": loc},
                                default=str, indent=1)
            cases.append(f"  <testcase {attrs}>\n    <failure message={quoteattr(msg)}>"
                         f"{_xml_text(detail)}</failure>\n  </testcase>")
        else:
            skipped += 1
            reason = f"{p.verdict}: {p.reason}"
            cases.append(f"  <testcase {attrs}>\n    <skipped message={quoteattr(reason)}/>\n  </testcase>")
    head = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n<testsuite name={quoteattr(suite)} '
            f'tests="{len(cases)}" failures="{failures}" errors="{errors}" skipped="{skipped}">')
    return head + "\n" + "\n".join(cases) + "\n</testsuite>\n</testsuites>\n"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_junit(rep: Report, path: str) -> None:
    atomic_write(path, junit_xml(rep))
