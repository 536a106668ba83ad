"""Reports of a compare: the JSON document (stable schema), the terminal table, JUnit XML and
a self-contained HTML page (html_report.py)."""
from __future__ import annotations

import json
import math
from xml.sax.saxutils import quoteattr

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corruptcheck.atomic import atomic_write
from corruptcheck.finite import finite_or_none, finite_values
from corruptcheck.phases import phase_words

REPORT_SCHEMA = 2  # 1 = first differ; 2 adds ratio, local, culprit, tolerance_precision (additive)
_STYLE = {"pass": "green", "fail": "bold red", "missing": "yellow", "not-exercised": "cyan",
          "skipped": "dim", "error": "bold red", "incomplete": "bold yellow"}


def to_json(res) -> dict:
    comp = res.comparison
    floats = [p for p in comp.points if p.kind == "float" and p.verdict in ("pass", "fail", "not-exercised")]
    worst = max(floats, key=lambda p: p.metrics.get("rel_l2") or 0.0, default=None)
    ranked = [p for p in comp.points if p.ratio is not None]
    worst_ratio = max(ranked, key=lambda p: p.ratio, default=None)
    return {
        "schema": REPORT_SCHEMA,
        "verdict": comp.verdict,
        "engine": res.engine,
        "case": res.case.name,
        "precision": res.precision,
        "tolerance_precision": res.tolerance_precision,
        "points": [{"name": p.name, "verdict": p.verdict, "layer": p.layer, "kind": p.kind,
                    "metrics": p.metrics, "tolerance": p.tolerance, "ratio": finite_or_none(p.ratio),
                    "reason": p.reason, "local": _clean_local(p.local)} for p in comp.points],
        "first_divergence": comp.first_divergence,
        "unknown_names": comp.unknown,
        "culprit": res.culprit,
        "teacher_forcing": res.teacher_forcing,
        "coverage": res.coverage,
        "summary": {
            "compared": comp.compared,
            "failed": len(comp.failed),
            "missing": len(comp.missing),
            "skipped": sum(p.verdict == "skipped" for p in comp.points),
            "not_exercised": sum(p.verdict == "not-exercised" for p in comp.points),
            "worst": {"name": worst.name, "rel_l2": worst.metrics.get("rel_l2")} if worst else None,
            "worst_ratio": {"name": worst_ratio.name, "ratio": finite_or_none(worst_ratio.ratio)} if worst_ratio else None,
            "pairs_by_phase": res.served["pairs_by_phase"] if res.served else {
                "prefill": sum(_rows(p) for p in comp.points if p.verdict in ("pass", "fail", "not-exercised")),
                "decode": 0},
        },
        "noise_model": res.noise_source,
        "reference": res.reference,
        "engine_info": res.engine_meta,
        "case_spec": res.case.spec(),
        "timings": res.timings,
        # a served run (schedule.py): the schedule, verdicts by phase, the engine's greedy choices
        "schedule": res.served["schedule"] if res.served else "prefill-only",
        "phases": res.served["phases"] if res.served else [],
        "greedy": res.served["greedy"] if res.served else None,
        "batching": res.served.get("batching") if res.served else None,
    }


def _rows(p) -> int:
    """Token (or entry) rows a judged point compared."""
    m = p.metrics or {}
    return int(m.get("tokens", 0) if p.kind == "index" else m.get("rows_compared", m.get("rows", 0)))


def _clean_local(local):
    if not local:
        return None
    return finite_values(local)


def write_json(doc: dict, path: str) -> None:
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


def print_table(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"corruptcheck compare · engine={doc['engine']} · case={doc['case']} · "
                        f"precision={doc['precision']}", title_justify="left")
    for col, just in (("point", "left"), ("verdict", "left"), ("err/tol", "right"), ("rel_l2", "right"),
                      ("tolerance", "right"), ("norm_ratio", "right"), ("local", "right"), ("note", "left")):
        table.add_column(col, justify=just, no_wrap=col != "note")
    points = [p for p in doc["points"] if p["verdict"] != "skipped"]
    failing = doc["verdict"] == "fail"
    if failing:  # worst first
        points.sort(key=lambda p: -(p["ratio"] if p["ratio"] is not None else (math.inf if p["verdict"] == "fail" else -1)))
    for p in points:
        m, t, loc = p["metrics"] or {}, p["tolerance"] or {}, p["local"] or {}
        if p["kind"] == "index" and m:
            rel, tol, nr = f"{m['genuine']} genuine", f"tie {t.get('tie_margin_rel', 0):.1e}", f"{m['tie_explained']} ties"
        else:
            rel, tol, nr = _fmt(m.get("rel_l2")), _fmt(t.get("value")), _fmt(m.get("norm_ratio"), ".5f")
        local = loc.get("role") or (_fmt(loc.get("ratio"), ".2g") if loc.get("ratio") is not None else "")
        table.add_row(p["name"], f"[{_STYLE[p['verdict']]}]{p['verdict']}[/]", _ratio_cell(p["ratio"]),
                      rel, tol, nr, local, p["reason"])
    console.print(table)
    skipped = [p for p in doc["points"] if p["verdict"] == "skipped"]
    if skipped:
        groups: dict = {}
        for p in skipped:
            key = "mtp.0.*" if p["name"].startswith("mtp.") else p["name"].split(".", 2)[-1]
            groups[key] = groups.get(key, 0) + 1
        console.print("skipped (finer points this engine does not expose): "
                      + ", ".join(f"{k} x{n}" for k, n in groups.items()), style="dim")
    cov = doc["coverage"]
    console.print(
        f"coverage: {cov['tokens']} tokens in {cov['sequences']} sequence(s), {cov['tokens_beyond_window']} beyond "
        f"the {cov['window']}-token window; {cov['compressed_entries']} compressed entries; indexer pruned "
        f"{cov['indexer_pruning_fraction']:.0%} of available entries; {cov['clamp_hits']} SwiGLU clamp hits; "
        f"attention {'/'.join(cov['attention_types'])}; routing {'/'.join(cov['routing_types'])}")
    console.print(f"reference: float64, {doc['reference']['source']}; tolerances: {doc['tolerance_precision']} "
                  f"noise model ({doc['noise_model']})", style="dim")
    if doc.get("phases"):
        from corruptcheck.phases import summarize

        sched = doc["schedule"]
        console.print(f"schedule: prompts {'+'.join(map(str, sched['prompt_lens']))}, prefill chunk "
                      f"{sched['chunk'] or 'whole prompt'}, {sched['decode_steps']} greedy decode steps; "
                      f"{doc.get('batching') or ''}")
        for line in summarize(doc["phases"]):
            console.print(("[bold red]" if ": FAIL" in line else "[green]") + escape(line) + "[/]")
        g = doc.get("greedy") or {}
        if g.get("disagreements"):
            d = g["disagreements"][0]
            console.print(f"[bold red]greedy:[/] {len(g['disagreements'])} of {g['steps']} decode steps fed a token that is "
                          f"not the reference's argmax beyond a near-tie (first: sequence {d['sequence']} step "
                          f"{d['step']}, engine {d['engine_token']} vs reference {d['reference_token']})")
        elif g:
            console.print(f"greedy: {g['agree']} of {g['steps']} decode tokens are the reference's argmax, "
                          f"{g['near_ties']} near-ties", style="dim")
    elif doc.get("schedule") == "prefill-only":
        note = (doc.get("engine_info") or {}).get("schedule_note")
        if note:
            console.print(f"schedule: prefill only — {note}", style="yellow")
    s = doc["summary"]
    line = (f"[{_STYLE[doc['verdict']]}]{doc['verdict'].upper()}[/]: {s['compared']} compared, {s['failed']} failed, "
            f"{s['missing']} missing, {s['skipped']} skipped, {s['not_exercised']} not exercised")
    if s.get("worst_ratio"):
        wr = s["worst_ratio"]
        line += f"; worst err/tol {_fmt(wr['ratio'], '.3g')} at {wr['name']}"
    if doc["first_divergence"]:
        line += f"; first divergence: {doc['first_divergence']['name']}"
    console.print(line)
    if doc.get("culprit"):
        c = doc["culprit"]
        where = phase_words(c.get("phase"))
        within = f" within {where}" if where else ""
        console.print(f"[bold red]culprit[/] (teacher forcing{within}): {c['name']} — the sub-block's own error is "
                      f"{_fmt(c['local_ratio'], '.3g')}x its local tolerance ({c['reason']})")
    elif failing and doc.get("teacher_forcing") == "run":
        console.print("teacher forcing: no sub-block exceeds its local tolerance on its own input; the failure is "
                      "accumulated drift", style="yellow")


def junit_xml(doc: dict) -> str:
    """One <testcase> per point; fail -> <failure>, missing / not-exercised / skipped ->
    <skipped> (never a pass)."""
    suite = f"corruptcheck.{doc['engine']}.{doc['case']}.{doc['precision']}"
    cases, failures, skipped = [], 0, 0
    for p in doc["points"]:
        attrs = f'classname={quoteattr(suite)} name={quoteattr(p["name"])}'
        if p["verdict"] == "pass":
            cases.append(f"  <testcase {attrs}/>")
            continue
        if p["verdict"] == "fail":
            failures += 1
            loc = p.get("local") or {}
            msg = f"{p['reason']}" + (f"; teacher forcing: {loc['role']}" if loc.get("role") else "")
            detail = json.dumps({"metrics": p["metrics"], "tolerance": p["tolerance"], "local": loc},
                                default=str, indent=1)
            cases.append(f"  <testcase {attrs}>\n    <failure message={quoteattr(msg)}>"
                         f"{_xml_text(detail)}</failure>\n  </testcase>")
        else:
            skipped += 1
            reason = f"{p['verdict']}: {p['reason']}"
            cases.append(f"  <testcase {attrs}>\n    <skipped message={quoteattr(reason)}/>\n  </testcase>")
    head = (f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n<testsuite name={quoteattr(suite)} '
            f'tests="{len(cases)}" failures="{failures}" errors="0" skipped="{skipped}">')
    return head + "\n" + "\n".join(cases) + "\n</testsuite>\n</testsuites>\n"


def _xml_text(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def write_junit(doc: dict, path: str) -> None:
    atomic_write(path, junit_xml(doc))
