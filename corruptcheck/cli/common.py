"""What every command shares: the one-line error that ends a run with exit 2, recording a run in
the results store, and printing / writing / exiting by a report."""
from __future__ import annotations

import sys

import click
from rich.console import Console

from corruptcheck.judge.results import Report
from corruptcheck.verdicts import EXIT_CODES, Verdict

# --engine-process / --engine-timeout / --engine-memory: compare and gate take them alike
ENGINE_PROCESS_HELP = ("where the engine runs: auto (a supervised child process for vllm, sglang, trtllm and "
                       "for an injected crash; in-process for hf, reference, dump), child, inline")
ENGINE_TIMEOUT_HELP = "child: kill the engine after this many seconds without progress (verdict crash, kind timeout)"
ENGINE_MEMORY_HELP = "child: kill the engine when its processes hold more than this many GiB (verdict crash, kind oom)"


def engine_process_options(f):
    """The engine-process options of compare and gate."""
    f = click.option("--engine-memory", "engine_memory", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="GIB", help=ENGINE_MEMORY_HELP)(f)
    f = click.option("--engine-timeout", "engine_timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     metavar="S", help=ENGINE_TIMEOUT_HELP)(f)
    return click.option("--engine-process", "engine_process", type=click.Choice(["auto", "child", "inline"]),
                        default="auto", show_default=True, help=ENGINE_PROCESS_HELP)(f)


def fail(msg: str) -> None:
    """Print `corruptcheck: error: msg` to stderr and exit 2 (bad input, engine unavailable)."""
    click.echo(f"corruptcheck: error: {msg}", err=True)
    sys.exit(2)


def record(path: str, write) -> None:
    """Record a run in the results store: write(store module) -> (run id, new). One line on
    stderr; a bad store is one error line and exit 2."""
    from corruptcheck.history import store
    from corruptcheck.errors import BadInput

    try:
        run_id, new = write(store)
    except BadInput as exc:
        fail(str(exc))
    click.echo(f"recorded run {run_id[:10]} in {path}" + ("" if new else " (already there)"), err=True)


def check_store(path: str) -> None:
    """Refuse a results store that cannot be used before any work starts."""
    from corruptcheck.history import store
    from corruptcheck.errors import BadInput

    try:
        store.check(path)
    except BadInput as exc:
        fail(str(exc))


def check_outputs(*paths) -> None:
    """Refuse an output path (--json, --junit, --html) that cannot be written, before any work
    starts: a run never ends by losing its report."""
    from corruptcheck.storage.atomic import check_writable

    for path in paths:
        why = check_writable(path) if path else None
        if why:
            fail(f"cannot write {path}: {why}")


def write_outputs(outputs) -> None:
    """Run each (path, writer) whose path was given; one that cannot be written ends with exit 2."""
    for path, writer in outputs:
        if path:
            try:
                writer(path)
            except OSError as exc:
                fail(f"cannot write {path}: {exc}")


def emit_report(rep: Report, quiet: bool, json_path, junit_path, html_path, record_path, kind: str) -> None:
    """Print a report (table, or one line with --quiet), write its JSON / JUnit / HTML, record
    it, and exit 0 / 1 / 2 by its verdict."""
    from corruptcheck.reports.html import write_html
    from corruptcheck.reports.render import print_table, write_json, write_junit

    if quiet:
        s = rep.summary
        click.echo(f"{rep.verdict}: {s.compared} compared, {s.failed} failed, {s.missing} missing")
    else:
        print_table(rep, Console(width=max(Console().width, 120)))
    write_outputs(((json_path, lambda p: write_json(rep.to_json(), p)), (junit_path, lambda p: write_junit(rep, p)),
                   (html_path, lambda p: write_html(rep, p))))
    if record_path:
        record(record_path, lambda store: store.record_report(record_path, rep.to_json(), kind))
    if rep.unknown_names:
        fail(f"engine produced unknown point name(s): {', '.join(rep.unknown_names[:5])}")
    if rep.verdict == Verdict.ERROR:
        fail("nothing was compared")
    if rep.crash:
        from corruptcheck.reports.render import crash_text

        fail(f"engine {rep.engine!r} crashed: {crash_text(rep.crash)}")
    sys.exit(EXIT_CODES.get(rep.verdict, 2))
