"""Reports of a compare: the terminal table and the JSON document (stable schema)."""
from __future__ import annotations

import json
import os
import tempfile

from rich.console import Console
from rich.table import Table

REPORT_SCHEMA = 1
_STYLE = {"pass": "green", "fail": "bold red", "missing": "yellow", "not-exercised": "cyan",
          "skipped": "dim", "error": "bold red"}


def to_json(res) -> dict:
    comp = res.comparison
    floats = [p for p in comp.points if p.kind == "float" and p.verdict in ("pass", "fail", "not-exercised")]
    worst = max(floats, key=lambda p: p.metrics.get("rel_l2") or 0.0, default=None)
    return {
        "schema": REPORT_SCHEMA,
        "verdict": comp.verdict,
        "engine": res.engine,
        "case": res.case.name,
        "precision": res.precision,
        "points": [{"name": p.name, "verdict": p.verdict, "layer": p.layer, "kind": p.kind,
                    "metrics": p.metrics, "tolerance": p.tolerance, "reason": p.reason} for p in comp.points],
        "first_divergence": comp.first_divergence,
        "coverage": res.coverage,
        "summary": {
            "compared": comp.compared,
            "failed": len(comp.failed),
            "missing": len(comp.missing),
            "skipped": sum(p.verdict == "skipped" for p in comp.points),
            "not_exercised": sum(p.verdict == "not-exercised" for p in comp.points),
            "worst": {"name": worst.name, "rel_l2": worst.metrics.get("rel_l2")} if worst else None,
        },
        "reference": res.reference,
        "engine_info": res.engine_meta,
        "case_spec": res.case.spec(),
        "timings": res.timings,
    }


def write_json(doc: dict, path: str) -> None:
    """Atomic write: a failed run never leaves a half-written report over a good one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".corruptcheck-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=1, allow_nan=False, default=str)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fmt(v, spec=".2e"):
    return "-" if v is None else format(v, spec)


def print_table(doc: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"corruptcheck compare · engine={doc['engine']} · case={doc['case']} · "
                        f"precision={doc['precision']}", title_justify="left")
    table.add_column("point", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for col in ("rel_l2", "max_abs", "norm_ratio", "tolerance"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("note")
    skipped = [p for p in doc["points"] if p["verdict"] == "skipped"]
    for p in doc["points"]:
        if p["verdict"] == "skipped":
            continue
        m, t = p["metrics"] or {}, p["tolerance"] or {}
        if p["kind"] == "index" and m:
            cells = (f"{m['genuine']} genuine", f"{m['tie_explained']} ties", "-", "0 genuine")
        else:
            cells = (_fmt(m.get("rel_l2")), _fmt(m.get("max_abs")), _fmt(m.get("norm_ratio"), ".6f"),
                     _fmt(t.get("value")) if t else "-")
        table.add_row(p["name"], f"[{_STYLE[p['verdict']]}]{p['verdict']}[/]", *cells, p["reason"])
    console.print(table)
    if skipped:
        groups: dict = {}
        for p in skipped:
            key = "mtp.0.*" if p["name"].startswith("mtp.") else p["name"].split(".", 2)[-1]
            groups[key] = groups.get(key, 0) + 1
        console.print("skipped (finer points this engine does not expose): "
                      + ", ".join(f"{k} x{n}" for k, n in groups.items()), style="dim")
    s, cov = doc["summary"], doc["coverage"]
    console.print(
        f"coverage: {cov['tokens']} tokens in {cov['sequences']} sequence(s), {cov['tokens_beyond_window']} beyond "
        f"the {cov['window']}-token window; {cov['compressed_entries']} compressed entries; indexer pruned "
        f"{cov['indexer_pruning_fraction']:.0%} of available entries; {cov['clamp_hits']} SwiGLU clamp hits; "
        f"attention {'/'.join(cov['attention_types'])}; routing {'/'.join(cov['routing_types'])}")
    console.print(f"reference: float64, {doc['reference']['source']}", style="dim")
    worst = s["worst"]
    line = (f"[{_STYLE[doc['verdict']]}]{doc['verdict'].upper()}[/]: {s['compared']} compared, {s['failed']} failed, "
            f"{s['missing']} missing, {s['skipped']} skipped, {s['not_exercised']} not exercised")
    if worst:
        line += f"; worst {worst['name']} rel_l2 {_fmt(worst['rel_l2'])}"
    if doc["first_divergence"]:
        line += f"; first divergence: {doc['first_divergence']['name']}"
    console.print(line)
