"""Commands `corruptcheck selftest`, `corruptcheck sweep` and `corruptcheck sensitivity`
(docs/faults.md); registered on the main group in cli/app.py."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corruptcheck.finite import fmt_number
from corruptcheck.cli.common import check_outputs, check_store, fail, record, write_outputs as _write
from corruptcheck.errors import BadInput, EngineFailed, EngineUnavailable
from corruptcheck.verdicts import EXIT_CODES, SelftestStatus


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [s for s in text.replace(" ", "").split(",") if s]


@contextmanager
def _one_line_errors():
    """Bad input (an unknown case, fault, engine or precision; an engine that cannot run) ends
    the command with one line and exit 2."""
    try:
        yield
    except KeyError as exc:
        fail(exc.args[0])
    except (BadInput, EngineUnavailable, EngineFailed, ValueError) as exc:
        fail(str(exc))


def _console() -> Console:
    return Console(width=max(Console().width, 160))


def _num(v, spec=".3g") -> str:
    return fmt_number(v, spec)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


_STATUS = {SelftestStatus.DETECTED: "green", SelftestStatus.MISSED: "bold red", SelftestStatus.NOT_EXERCISED: "cyan",
           SelftestStatus.ERROR: "bold red", SelftestStatus.PASS: "green", SelftestStatus.FLAGGED: "bold red"}


def _progress_line(row) -> str:
    from corruptcheck.selftest.runner import FaultRow

    if isinstance(row, FaultRow):
        what = f"{row.fault} @ {row.case} {row.precision}"
        if row.status == SelftestStatus.NOT_EXERCISED:
            return f"  {what}: not exercised"
        loc = "" if row.localized is None else (" localized" if row.localized else f" culprit {row.culprit}")
        return f"  {what}: {row.status}{loc if row.status == SelftestStatus.DETECTED else ''} ({row.seconds:.1f} s)"
    return f"  benign {row.variant} @ {row.case} {row.precision}: {row.status} ({row.seconds:.1f} s)"


def print_matrix(res, console: Console) -> None:
    effects = {(e["fault"], e["case"]): e for e in res.bf16_effects()}
    table = Table(title=f"corruptcheck selftest · engine={res.engine} · faults", title_justify="left")
    for col in ("fault", "class", "case", "dtype", "status", "first failing point", "culprit", "expected",
                "loc", "effect/noise", "s"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("first failing point", "culprit", "expected"))
    for r in res.faults:
        style = _STATUS.get(r.status, "")
        loc = "-" if r.localized is None else ("[green]yes[/]" if r.localized else "[bold red]no[/]")
        ratio = "-"
        if r.precision == "bfloat16" and (r.fault, r.case) in effects:
            ratio = _num(effects[(r.fault, r.case)]["effect_over_noise"])
        elif r.effect is not None and r.noise:
            ratio = _num(r.effect / r.noise)
        table.add_row(r.fault, r.klass, r.case, r.precision, f"[{style}]{r.status}[/]", escape(r.first or "-"),
                      escape(r.culprit or "-"), escape(r.expected or "-"), loc, ratio, f"{r.seconds:.1f}")
    console.print(table)
    if res.benign:
        bt = Table(title="benign variants (must pass)", title_justify="left")
        for col in ("variant", "case", "dtype", "status", "worst err/tol", "at", "note"):
            bt.add_column(col, no_wrap=col != "note")
        for r in res.benign:
            bt.add_row(r.variant, r.case, r.precision, f"[{_STATUS.get(r.status, '')}]{r.status}[/]",
                       _num(r.worst_ratio), escape(r.worst or "-"), escape(r.note))
        console.print(bt)
    print_totals(res, console)


def print_totals(res, console: Console) -> None:
    t = res.totals()
    for prec in res.precisions:
        b = t[prec]
        console.print(f"{prec}: {b['detected']}/{b['exercised']} exercised (fault, case) pairs detected "
                      f"(recall {_pct(b['recall'])}), localized {b['localized']}/{b['exercised']} "
                      f"({_pct(b['localization_accuracy'])}; {b['localized_at_expected']} at the expected point, "
                      f"{b['localized'] - b['localized_at_expected']} at a documented equivalent); "
                      f"{b['not_exercised']} not exercised"
                      + (f"; {b['errors']} errors" if b['errors'] else ""))
        for m in b["missed"]:
            console.print(f"  missed: {m}")
        for m in b["mislocalized"]:
            console.print(f"  mislocalized: {escape(m)}")
    if "bfloat16" in t:
        for e in t["bfloat16"]["below_floor_misses"]:
            console.print(f"  bf16 miss below the 3x noise floor: {e['fault']}@{e['case']} at {e['point']}: "
                          f"effect/noise {_num(e['effect_over_noise'])}")
        for e in t["bfloat16"]["above_floor_misses"]:
            console.print(f"  [bold red]bf16 miss above the 3x noise floor[/]: {e['fault']}@{e['case']} at "
                          f"{e['point']}: effect/noise {_num(e['effect_over_noise'])}")
    bn = t["benign"]
    console.print(f"benign: {bn['false_positives']} false positives in {bn['runs']} runs"
                  + (f"; {bn['errors']} errors" if bn['errors'] else ""))
    for f in bn["flagged"]:
        console.print(f"  flagged: {escape(f)}")
    console.print("selftest: " + ("[green]PASS[/]" if res.ok else "[bold red]FAIL[/]"))


@click.command("selftest")
@click.option("--engine", "engine_name", default="hf", show_default=True, help="engine to test (hf, reference, vllm)")
@click.option("--cases", "cases", default=None, help="comma-separated built-in cases [default: all]")
@click.option("--faults", "faults", default=None, help="comma-separated faults [default: all]")
@click.option("--dtypes", "dtypes", default="float32,bfloat16", show_default=True, help="precisions for the faults")
@click.option("--benign", "benign", default=None, help="comma-separated benign variants [default: all for the engine]")
@click.option("--no-benign", is_flag=True, help="skip the benign variants")
@click.option("--list", "list_only", is_flag=True, help="print the engine's faults, one per line, and exit")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the matrix as JSON")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="write the matrix as an HTML page")
@click.option("--quiet", is_flag=True, help="no progress lines")
@click.option("--record", "record_path", type=click.Path(dir_okay=False),
              help="also record the matrix in this SQLite results store (corruptcheck history)")
def selftest(engine_name, cases, faults, dtypes, benign, no_benign, list_only, json_path, html_path, quiet,
             record_path):
    """Re-enact real silent-corruption bugs and check that they are caught and located, and
    that honest variants are not flagged. Exit 0 pass, 1 a fault missed at float32 or a benign
    variant flagged, 2 error."""
    from corruptcheck.faults import faults_for

    if list_only:
        for f in faults_for(engine_name).values():
            click.echo(f.describe())
        return
    check_outputs(json_path, html_path)
    if record_path:
        check_store(record_path)
    from corruptcheck.reports.render import write_json
    from corruptcheck.selftest.runner import run_selftest
    from corruptcheck.selftest.html import write_html

    console = _console()
    progress = None if quiet else (lambda row: click.echo(_progress_line(row), err=True))
    with _one_line_errors():
        res = run_selftest(engine_name, cases=_names(cases), precisions=tuple(_names(dtypes) or ()),
                           faults=_names(faults), benign=() if no_benign else _names(benign), progress=progress)
    print_matrix(res, console)
    _write(((json_path, lambda p: write_json(res.to_json(), p)), (html_path, lambda p: write_html(res, p))))
    if record_path:
        record(record_path, lambda store: store.record_selftest(record_path, res.to_json()))
    sys.exit(0 if res.ok else 1)


@click.command("sweep")
@click.option("--engine", "engine_name", required=True, help="engine to check (hf, reference, ...)")
@click.option("--hidden", "hidden", default="4096,5120,6144,7168", show_default=True,
              help="comma-separated hidden sizes")
@click.option("--fault", "fault_name", default=None, help="run the engine with this fault active (see selftest --list)")
@click.option("--dtype", "precision", type=click.Choice(["float64", "float32", "bfloat16"]), default="float32",
              show_default=True, help="precision the engine runs in (noise is measured for it on the fly)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the sweep as JSON")
def sweep(engine_name, hidden, fault_name, precision, json_path):
    """The pro-slice architecture at several hidden sizes, compared at each (one line per
    size): how a kernel guard that holds for some widths only shows up. Exit 0 every size
    passes, 1 some size fails, 2 error."""
    from corruptcheck.faults import get_fault
    from corruptcheck.reports.render import write_json
    from corruptcheck.selftest.sweep import parse_hidden, run_sweep, to_json

    check_outputs(json_path)
    with _one_line_errors():
        sizes = parse_hidden(hidden)
        fault = get_fault(fault_name) if fault_name else None
        rows = run_sweep(engine_name, sizes, fault, precision, progress=lambda r: click.echo(r.line(fault)))
    doc = to_json(rows, engine_name, fault, precision)
    _write(((json_path, lambda p: write_json(doc, p)),))
    sys.exit(EXIT_CODES.get(doc["verdict"], 2))


def _step_line(fam, step) -> str:
    if step is None:
        return f"  {fam.family}: {fam.note}"
    what = "detected" if step.localized else ("flagged, not localized" if step.flagged else "not detected")
    return f"  {fam.family} at m={step.m:.3g}: {what} ({step.seconds:.1f} s)"


def print_sensitivity(res, console: Console) -> None:
    table = Table(title=f"corruptcheck sensitivity · engine={res.engine} · case={res.case} · {res.precision}",
                  title_justify="left")
    for col in ("family", "class", "point", "detected at m", "flagged at m", "effect", "noise", "MDE (noise units)",
                "loc", "note"):
        table.add_column(col, overflow="fold", no_wrap=col not in ("point", "note"))
    for f in res.families:
        loc = "[green]yes[/]" if f.localized else ("[bold red]no[/]" if f.point else "-")
        table.add_row(f.family, f.klass, escape(f.point or "-"), _num(f.detected_at), _num(f.flagged_at),
                      _num(f.effect), _num(f.noise), _num(f.mde_noise_units), loc, escape(f.note))
    console.print(table)
    ht = Table(title="honest runs (must pass)", title_justify="left")
    for col in ("variant", "worst err/tol", "at", "note"):
        ht.add_column(col, no_wrap=col != "note")
    for h in res.honest:
        ht.add_row(h.variant, _num(h.worst_ratio), escape(h.worst_point or "-"), escape(h.note))
    console.print(ht)
    found = [f for f in res.families if f.mde_noise_units is not None]
    console.print(f"{len(found)}/{len(res.families)} families detected and localized; honest max err/tol "
                  f"{_num(res.honest_max_ratio)}; {res.seconds:.1f} s")


@click.command("sensitivity")
@click.option("--engine", "engine_name", required=True, help="engine to measure (hf, reference, vllm)")
@click.option("--case", "case_name", required=True, help="built-in case")
@click.option("--dtype", "precision", default="float32", show_default=True, help="precision: float32 or bfloat16")
@click.option("--faults", "faults", default=None, help="comma-separated fault families [default: all of the engine]")
@click.option("--steps", "steps", default="7", show_default=True, help="bisection steps in log space over [1e-4, 1]")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the result as JSON")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="write an HTML page: the table and each family's bisection curve")
@click.option("--teacher-forcing", type=click.Choice(["on-fail", "always"]), default="on-fail", show_default=True,
              help="how each compare judges: always also fails a point on its teacher-forced local excess")
@click.option("--quiet", is_flag=True, help="no progress lines")
def sensitivity(engine_name, case_name, precision, faults, steps, json_path, html_path, teacher_forcing, quiet):
    """Minimum detectable effect of each fault family on a case: the smallest magnitude of its
    knob that compare still flags and localizes, and its effect there in units of the honest
    noise at the strike point (docs/faults.md). Exit 0 when it ran, 2 on bad input."""
    from corruptcheck.reports.render import write_json
    from corruptcheck.selftest.sensitivity import run_sensitivity
    from corruptcheck.selftest.sensitivity_html import write_html

    if not steps.isdigit() or int(steps) < 1:
        fail(f"--steps must be a positive integer, not {steps!r}")
    check_outputs(json_path, html_path)
    progress = None if quiet else (lambda fam, step: click.echo(_step_line(fam, step), err=True))
    with _one_line_errors():
        res = run_sensitivity(engine_name, case_name, precision, faults=_names(faults), steps=int(steps),
                              progress=progress, teacher_forcing=teacher_forcing)
    print_sensitivity(res, _console())
    _write(((json_path, lambda p: write_json(res.to_json(), p)), (html_path, lambda p: write_html(res, p))))
