"""Command line: `corruptcheck cases`, `corruptcheck compare`."""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from corruptcheck.cli.common import (check_outputs, check_store as _check_store, emit_report, engine_process_options,
                                     fail, record as _record)
from corruptcheck.errors import BadInput, EngineFailed, EngineUnavailable, one_line
from corruptcheck.judge.tolerance import FLOOR
from corruptcheck.verdicts import EXIT_CODES

PRECISIONS = list(FLOOR)  # every precision with tolerances


def crash_report_path() -> Path:
    """Where the full traceback of an internal error goes (CORRUPTCHECK_CRASH_DIR, else the
    system temporary directory)."""
    root = Path(os.environ.get("CORRUPTCHECK_CRASH_DIR") or tempfile.gettempdir())
    return root / f"corruptcheck-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"


def _internal_error(exc: BaseException, command: str) -> None:
    """One line naming the defect and where it happened, the traceback in a file, exit 2: a bug
    in the tool must never read as a pass or a fail."""
    path = crash_report_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{command}\n\n" + "".join(traceback.format_exception(exc)))
        pointer = f"full traceback in {path}"
    except OSError as write_exc:
        pointer = f"the traceback could not be written to {path} ({write_exc})"
    click.echo(f"corruptcheck: internal error (a bug in corruptcheck, not a verdict): {one_line(exc)}; {pointer}",
               err=True)
    sys.exit(2)


class _Main(click.Group):
    """The command group; turns what escapes a command into exit 2 with one line."""

    def invoke(self, ctx):
        import warnings

        with warnings.catch_warnings():  # click 8.2+ deprecates protected_args; it still holds the subcommand
            warnings.simplefilter("ignore", DeprecationWarning)
            command = " ".join(["corruptcheck", *getattr(ctx, "protected_args", []), *ctx.args])
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except (BadInput, EngineUnavailable, EngineFailed) as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the one place every defect is caught
            _internal_error(exc, command)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corruptcheck")
def main():
    """Silent-corruption detector for DeepSeek V4 inference engines."""


@main.command("cases")
def cases_cmd():
    """List the built-in cases."""
    from corruptcheck.cases import CASES

    table = Table(title="built-in cases", title_justify="left")
    for col in ("case", "hidden", "layers (attention)", "tokens", "description"):
        table.add_column(col)
    for c in CASES.values():
        cfg = c.config
        kinds = ", ".join(cfg.layer_type(i) for i in range(cfg.num_layers))
        table.add_row(c.name, str(cfg.hidden_size), f"{cfg.num_layers} ({kinds}) + MTP",
                      "+".join(map(str, c.seq_lens)), c.description)
    Console().print(table)


def parse_engine_options(items) -> dict:
    """KEY=VALUE strings -> options; a key given twice becomes a list (fix=A fix=B)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"engine option {item!r} is not KEY=VALUE")
        if key in out:
            out[key] = (out[key] if isinstance(out[key], list) else [out[key]]) + [value]
        else:
            out[key] = value
    return out


def _resolve_case(case_name, engine_case=None):
    """The case to compare: --case, else the one the engine's input names (a dump's own
    manifest: Engine.default_case), else the default case."""
    from corruptcheck.cases import DEFAULT_CASE, get_case

    return get_case(case_name or engine_case or DEFAULT_CASE)


def engine_settings(engine_name: str, aliases: dict, pairs) -> tuple[type, dict]:
    """(the engine's class, its options): --engine-option KEY=VALUE pairs and the older flags
    that alias declared options (--attn-impl, --batch, --path, --format), all parsed by the
    engine, which refuses an option it does not declare. The CLI itself names no engine."""
    from corruptcheck.engines import Engine, engine_class

    raw = {k: v for k, v in aliases.items() if v not in (None, False)}
    raw.update(parse_engine_options(pairs))
    if not raw:  # no option to check: an engine unknown here is get_engine's error (or a plug-in's)
        try:
            return engine_class(engine_name), {}
        except (KeyError, BadInput):
            return Engine, {}
    cls = engine_class(engine_name)
    return cls, cls.parse_options(raw)


@main.command("hypotheses")
def hypotheses_cmd():
    """List the defect hypotheses the diagnosis ranks (docs/diagnosis.md)."""
    from corruptcheck.judge.hypotheses import HYPOTHESES

    table = Table(title="defect hypotheses (fault classes run on the reference, magnitude m fitted)",
                  title_justify="left")
    for col in ("hypothesis", "strikes", "class", "what", "fitted m"):
        table.add_column(col)
    for h in HYPOTHESES.values():
        table.add_row(*map(escape, h.describe().split("\t")))
    Console(width=max(Console().width, 140)).print(table)


@main.command("engines")
def engines_cmd():
    """List the engines and whether each can run here."""
    from corruptcheck.engines import engine_class, engines, install_hint

    table = Table(title="engines (entry-point group corruptcheck.engines)", title_justify="left")
    for col in ("engine", "available", "provided by", "note"):
        table.add_column(col)
    for name, target in engines().items():
        try:
            cls = engine_class(name)
            engine = cls()
            ok, why = engine.available()
            note = why if not ok else ""
            if not ok and install_hint(engine):
                note += f"; {install_hint(engine)}"
        except BadInput as exc:
            ok, note = False, str(exc)
        table.add_row(name, "[green]yes[/]" if ok else "[red]no[/]", target, escape(note))
    Console(width=max(Console().width, 120)).print(table)


@main.command("dump")
@click.option("--engine", "engine_name", required=True, help="engine to run (hf, reference, ...)")
@click.option("--case", "case_name", default="tiny", show_default=True, help="built-in case")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="dump directory to write")
@click.option("--dtype", "precision", type=click.Choice(PRECISIONS), default="float32", show_default=True)
@click.option("--engine-option", "engine_option", multiple=True, metavar="KEY=VALUE",
              help="an engine setting, repeatable (see docs/engines.md)")
@click.option("--attn-impl", default=None, hidden=True, help="alias of --engine-option attn_impl=...")
@click.option("--batch", is_flag=True, hidden=True, help="alias of --engine-option batch=true")
def dump_cmd(engine_name, case_name, out_dir, precision, engine_option, attn_impl, batch):
    """Run an engine on a case and write its capture as a dump directory (docs/dump.md)."""
    from corruptcheck.cases import get_case
    from corruptcheck.storage.dump import write_dump
    from corruptcheck.engines import get_engine

    try:
        case = get_case(case_name)
        _, options = engine_settings(engine_name, {"attn_impl": attn_impl, "batch": batch}, engine_option)
        engine = get_engine(engine_name)
        cap = engine.run(case, precision, **options)
        meta = {k: v for k, v in cap.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
        out = write_dump(cap.points, case, out_dir, engine={"name": engine_name, **meta}, precision=cap.precision)
    except KeyError as exc:
        fail(exc.args[0])
    except (BadInput, EngineUnavailable, EngineFailed, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out_dir}: {exc}")
    click.echo(f"wrote {len(cap.points)} points of case {case.name} ({cap.precision}) to {out}")


@main.command("compare")
@click.option("--engine", "engine_name", required=True, help="engine to check (hf, reference, dump, ...)")
@click.option("--case", "case_name", default=None, help="built-in case [default: tiny, or the dump's own case]")
@click.option("--dtype", "precision", type=click.Choice(PRECISIONS), default=None,
              help="precision the engine runs in [default: float32; a dump declares its own]; the reference "
                   "always runs float64")
@click.option("--path", "dump_path", type=click.Path(), hidden=True, help="alias of --engine-option path=DIR")
@click.option("--format", "dump_format", type=click.Choice(["corruptcheck", "sglang"]), default=None, hidden=True,
              help="alias of --engine-option format=...")
@click.option("--batch", is_flag=True, hidden=True, help="alias of --engine-option batch=true")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the JSON report here")
@click.option("--attn-impl", default=None, hidden=True, help="alias of --engine-option attn_impl=...")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="write JUnit XML (one test per point)")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="write a self-contained HTML report")
@click.option("--teacher-forcing", type=click.Choice(["on-fail", "always", "never"]), default="on-fail",
              show_default=True, help="localize by re-running sub-blocks on the engine's own inputs")
@click.option("--diagnose", "diagnose", type=click.Choice(["on-fail", "always", "never"]), default="on-fail",
              show_default=True, help="rank the defect hypotheses (`corruptcheck hypotheses`) on the failing "
                                      "sub-block, each run on the engine's own input (docs/diagnosis.md)")
@click.option("--no-golden", is_flag=True, help="compute the reference now instead of using the golden")
@click.option("--engine-option", "engine_option", multiple=True, metavar="KEY=VALUE",
              help="an engine setting, repeatable: the options the engine declares (docs/engines.md; e.g. path=DIR and "
                   "format=sglang for a dump, weights=q8_0 for llama.cpp; every engine, test only: "
                   "crash=KIND@PHASE, KIND segv|abort|raise|hang|oom|exit0, PHASE load|prefill|decode|forward)")
@click.option("--schedule", "schedule_choice", type=click.Choice(["case", "prefill-only"]), default="case",
              show_default=True, help="serve the case's schedule (chunked prefill + greedy decode, judged by phase) "
                                      "when the engine can; prefill-only: one forward per sequence")
@click.option("--quiet", is_flag=True, help="print only the summary line")
@click.option("--record", "record_path", type=click.Path(dir_okay=False),
              help="also record the run (a crash too) in this SQLite results store (corruptcheck history)")
@engine_process_options
def compare_cmd(engine_name, case_name, precision, dump_path, dump_format, batch, json_path, junit_path, html_path,
                attn_impl, teacher_forcing, diagnose, no_golden, engine_option, schedule_choice, quiet, record_path,
                engine_process, engine_timeout, engine_memory):
    """Compare an engine against the reference, point by point. Exit 0 pass, 1 fail or
    incomplete (required points missing), 2 error or crash (the engine's process died: its
    report says how and in which phase, and judges what it delivered)."""
    from corruptcheck.compare import compare

    check_outputs(json_path, junit_path, html_path)  # refuse them before the engine runs
    if record_path:
        _check_store(record_path)  # refuse a bad store before the engine runs
    try:
        cls, options = engine_settings(engine_name, {"path": dump_path, "format": dump_format, "batch": batch,
                                                     "attn_impl": attn_impl}, engine_option)
        if precision is None and not cls.declares_precision:
            precision = "float32"
        case = _resolve_case(case_name, cls.default_case(options))
        # one right-padded batch is one forward: nothing to serve
        res = compare(case, engine_name, precision, use_golden=not no_golden, teacher_forcing=teacher_forcing,
                      schedule="prefill-only" if options.get("batch") else schedule_choice, diagnose=diagnose,
                      engine_process=engine_process, engine_timeout=engine_timeout, engine_memory=engine_memory,
                      **options)
    except KeyError as exc:
        fail(exc.args[0])
    except EngineFailed as exc:
        _record_crash(record_path, engine_name, case_name, precision, str(exc))
        fail(str(exc))
    except (BadInput, EngineUnavailable, ValueError) as exc:
        fail(str(exc))
    emit_report(res.report, quiet, json_path, junit_path, html_path, record_path, "compare")


def _record_crash(path, engine_name, case_name, precision, reason: str) -> None:
    if path:
        _record(path, lambda store: store.record_crash(path, "compare", engine_name, case_name, precision, reason))


@main.command("gate")
@click.option("--engine", "engine_name", required=True, help="engine to gate (hf, vllm, ..., or module:Class)")
@click.option("--policy", "policy_path", type=click.Path(dir_okay=False), help="policy TOML [default: DeepSeek V4]")
@click.option("--out", "out_dir", default="corruptcheck-gate", show_default=True, type=click.Path(file_okay=False),
              help="directory for the per-run JSON / JUnit / HTML reports and summary.json")
@click.option("--show-policy", is_flag=True, help="print the default policy and exit")
@click.option("--record", "record_path", type=click.Path(dir_okay=False),
              help="also record every run (errors too) in this SQLite results store (corruptcheck history)")
@click.option("--engine-option", "engine_option", multiple=True, metavar="KEY=VALUE",
              help="an engine setting for every run, repeatable (as compare's)")
@engine_process_options
def gate_cmd(engine_name, policy_path, out_dir, show_policy, record_path, engine_option, engine_process,
             engine_timeout, engine_memory):
    """Pre-deploy gate: run a policy's suite, exit 0 pass, 1 fail, 2 error or a crashed engine
    (the other runs still run; the summary lists the crashed one)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from corruptcheck import gate
    from corruptcheck.reports.render import VERDICT_STYLE

    if show_policy:
        click.echo(gate.default_policy_text())
        return
    if record_path:
        _check_store(record_path)
    try:
        policy = gate.load_policy(policy_path)
        from corruptcheck.compare import RunSettings
        from corruptcheck.engines import engine_class

        options = engine_class(engine_name).parse_options(parse_engine_options(engine_option)) if engine_option else {}
        settings = RunSettings(engine_process=engine_process, engine_timeout=engine_timeout,
                               engine_memory=engine_memory)
    except BadInput as exc:
        fail(str(exc))
    console = Console(width=max(Console().width, 120))
    out = Path(out_dir)
    check_outputs(out / "summary.json")  # the reports and the summary go there: refuse it before any run
    with Progress(TextColumn("[bold]gate[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("starting", total=len(policy.runs))
        done = {"n": 0}

        def step(run):
            if done["n"]:
                progress.advance(task)
            done["n"] += 1
            progress.update(task, description=run.id)

        try:
            outcomes = gate.run_gate(engine_name, policy, out, progress=step, settings=settings, engine_options=options)
        except OSError as exc:
            fail(f"cannot write reports to {out}: {exc}")
        progress.update(task, completed=len(policy.runs), description="done")
    summary = gate.write_summary(engine_name, policy, outcomes, out)
    if record_path:
        for o in outcomes:
            if o.report is not None:
                _record(record_path, lambda store, o=o: store.record_report(record_path, o.report.to_json(), "gate"))
            else:
                _record(record_path, lambda store, o=o: store.record_crash(
                    record_path, "gate", engine_name, o.run.case.name, o.run.precision, "; ".join(o.reasons)))
    table = Table(title=f"gate · engine={engine_name} · policy={policy.name}", title_justify="left")
    for col in ("run", "verdict", "worst err/tol", "culprit / first divergence", "reasons"):
        table.add_column(col, no_wrap=col != "reasons")
    for o in summary["runs"]:
        wr = o["worst_ratio"] or {}
        where = (o["culprit"] or o["first_divergence"] or {}).get("name", "")
        table.add_row(o["run"], f"[{VERDICT_STYLE[o['verdict']]}]{o['verdict']}[/]",
                      "-" if wr.get("ratio") is None else f"{wr['ratio']:.3g}", where, "; ".join(o["reasons"]))
    console.print(table)
    console.print(f"[{VERDICT_STYLE[summary['verdict']]}]{summary['verdict'].upper()}[/] — reports in {out}/ "
                  f"(summary.json, <run>.json/.xml/.html)")
    sys.exit(EXIT_CODES.get(summary["verdict"], 2))


def _golden_cases(case_name, all_cases):
    from corruptcheck.cases import CASES, get_case

    if all_cases == bool(case_name):
        fail("give exactly one of --case NAME or --all")
    try:
        return [c for c in CASES.values() if c.golden] if all_cases else [get_case(case_name)]
    except BadInput as exc:
        fail(str(exc))


@main.group("golden")
def golden_group():
    """Golden hidden states: generate, verify, show."""


@golden_group.command("generate")
@click.option("--case", "case_name", help="one built-in case")
@click.option("--all", "all_cases", is_flag=True, help="every built-in case")
def golden_generate(case_name, all_cases):
    """Run the float64 reference and write golden/<case>/."""
    from corruptcheck.judge.reference_data import generate

    for case in _golden_cases(case_name, all_cases):
        m = generate(case)
        files = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in m["files"].items())
        click.echo(f"{case.name}: {len(m['points'])} points, full tensors {m['full_tensors']}; {files}")


@golden_group.command("verify")
@click.option("--case", "case_name", help="one built-in case")
@click.option("--all", "all_cases", is_flag=True, help="every built-in case")
def golden_verify(case_name, all_cases):
    """Regenerate and check every point against the golden. Exit 1 on drift, 2 on a
    missing/corrupt/tampered file."""
    from corruptcheck.storage import golden
    from corruptcheck.judge.reference_data import verify

    for case in _golden_cases(case_name, all_cases):
        try:
            r = verify(case)
        except FileNotFoundError as exc:
            fail(str(exc))
        except golden.GoldenTampered as exc:
            fail(str(exc))
        except golden.GoldenDrift as exc:
            click.echo(f"corruptcheck: {case.name}: DRIFT: {exc}", err=True)
            sys.exit(1)
        extra = "" if r.regenerated_vs_tensors is None else f"; vs committed tensors {r.regenerated_vs_tensors:.2e}"
        click.echo(f"{case.name}: ok, {r.points} points match the golden; worst sketch error "
                   f"{r.worst_rel:.2e} at {r.worst_point}{extra}")


@golden_group.command("show")
@click.option("--case", "case_name", required=True, help="built-in case")
def golden_show(case_name):
    """Points, shapes and coverage recorded in a case's golden."""
    from corruptcheck.storage import golden
    from corruptcheck.cases import get_case

    try:
        g = golden.load_manifest(get_case(case_name))
    except BadInput as exc:
        fail(str(exc))
    except (FileNotFoundError, golden.GoldenTampered) as exc:
        fail(str(exc))
    m = g.manifest
    table = Table(title=f"golden {case_name} · format {m['format']} · reference {m['reference_version']} · "
                        f"full tensors {m['full_tensors']}", title_justify="left")
    for col in ("point", "kind", "shape", "dtype", "l2 / range"):
        table.add_column(col, no_wrap=col != "l2 / range")
    for name, e in g.points.items():
        st = e["stats"]
        summary = f"{st['l2']:.6g}" if "l2" in st else f"[{st['min']}, {st['max']}], {st['none']} none"
        table.add_row(name, e["kind"], "x".join(map(str, e["shape"])), e["dtype"], summary)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    cov = g.coverage
    console.print(f"coverage: {cov['tokens']} tokens, {cov['tokens_beyond_window']} beyond the window, "
                  f"{cov['compressed_entries']} compressed entries, indexer pruning "
                  f"{cov['indexer_pruning_fraction']:.0%}, {cov['clamp_hits']} clamp hits")
    for layer in cov["layers"]:
        console.print(f"  {layer['layer']}: {layer['attention']}, {layer['routing']} routing, "
                      f"{layer['compressed_entries']} entries, pruning {layer['indexer_pruning_fraction']:.0%}, "
                      f"{layer['clamp_hits']} clamp hits, {layer['experts_used']}/{layer['experts_total']} experts")


from corruptcheck.cli.check import check, checkpoint  # noqa: E402
from corruptcheck.cli.history import history, releases  # noqa: E402
from corruptcheck.cli.selftest import selftest, sensitivity, sweep  # noqa: E402
for _command in (selftest, sweep, sensitivity, history, releases, checkpoint, check):
    main.add_command(_command)
if __name__ == "__main__":  # pragma: no cover
    main()
