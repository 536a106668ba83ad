"""Command line: `corruptcheck cases`, `corruptcheck compare`."""
from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from corruptcheck.errors import BadInput, EngineUnavailable

PRECISIONS = ["float64", "float32", "bfloat16"]


def _fail(msg: str) -> None:
    click.echo(f"corruptcheck: error: {msg}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


@main.command("compare")
@click.option("--engine", "engine_name", required=True, help="engine to check (hf, reference, ...)")
@click.option("--case", "case_name", default="tiny", show_default=True, help="built-in case")
@click.option("--dtype", "precision", type=click.Choice(PRECISIONS), default="float32", show_default=True,
              help="precision the engine runs in (the reference always runs float64)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the JSON report here")
@click.option("--attn-impl", default="eager", show_default=True, help="hf: transformers attention implementation")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="write JUnit XML (one test per point)")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="write a self-contained HTML report")
@click.option("--teacher-forcing", type=click.Choice(["on-fail", "always", "never"]), default="on-fail",
              show_default=True, help="localize by re-running sub-blocks on the engine's own inputs")
@click.option("--no-golden", is_flag=True, help="compute the reference now instead of using the golden")
@click.option("--quiet", is_flag=True, help="print only the summary line")
def compare_cmd(engine_name, case_name, precision, json_path, junit_path, html_path, attn_impl, teacher_forcing,
                no_golden, quiet):
    """Compare an engine against the reference, point by point. Exit 0 pass, 1 fail, 2 error."""
    from corruptcheck.cases import get_case
    from corruptcheck.compare import compare
    from corruptcheck.html_report import write_html
    from corruptcheck.report import print_table, to_json, write_json, write_junit

    try:
        case = get_case(case_name)
        res = compare(case, engine_name, precision, use_golden=not no_golden, teacher_forcing=teacher_forcing,
                      attn_impl=attn_impl)
    except KeyError as exc:
        _fail(exc.args[0])
    except (BadInput, EngineUnavailable, ValueError) as exc:
        _fail(str(exc))
    doc = to_json(res)
    if quiet:
        s = doc["summary"]
        click.echo(f"{doc['verdict']}: {s['compared']} compared, {s['failed']} failed, {s['missing']} missing")
    else:
        print_table(doc, Console(width=max(Console().width, 120)))
    for path, writer in ((json_path, write_json), (junit_path, write_junit), (html_path, write_html)):
        if path:
            try:
                writer(doc, path)
            except OSError as exc:
                _fail(f"cannot write {path}: {exc}")
    sys.exit({"pass": 0, "fail": 1}.get(doc["verdict"], 2))


def _golden_cases(case_name, all_cases):
    from corruptcheck.cases import CASES, get_case

    if all_cases == bool(case_name):
        _fail("give exactly one of --case NAME or --all")
    try:
        return list(CASES.values()) if all_cases else [get_case(case_name)]
    except KeyError as exc:
        _fail(exc.args[0])


@main.group("golden")
def golden_group():
    """Golden hidden states: generate, verify, show."""


@golden_group.command("generate")
@click.option("--case", "case_name", help="one built-in case")
@click.option("--all", "all_cases", is_flag=True, help="every built-in case")
def golden_generate(case_name, all_cases):
    """Run the float64 reference and write golden/<case>/."""
    from corruptcheck import golden

    for case in _golden_cases(case_name, all_cases):
        m = golden.generate(case)
        files = ", ".join(f"{k} {v['bytes'] / 1e6:.2f} MB" for k, v in m["files"].items())
        click.echo(f"{case.name}: {len(m['points'])} points, full tensors {m['full_tensors']}; {files}")


@golden_group.command("verify")
@click.option("--case", "case_name", help="one built-in case")
@click.option("--all", "all_cases", is_flag=True, help="every built-in case")
def golden_verify(case_name, all_cases):
    """Regenerate and check every point against the golden. Exit 1 on drift, 2 on a
    missing/corrupt/tampered file."""
    from corruptcheck import golden

    for case in _golden_cases(case_name, all_cases):
        try:
            r = golden.verify(case)
        except FileNotFoundError as exc:
            _fail(str(exc))
        except golden.GoldenTampered as exc:
            _fail(str(exc))
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
    from corruptcheck import golden
    from corruptcheck.cases import get_case

    try:
        g = golden.load_manifest(get_case(case_name))
    except KeyError as exc:
        _fail(exc.args[0])
    except (FileNotFoundError, golden.GoldenTampered) as exc:
        _fail(str(exc))
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


if __name__ == "__main__":  # pragma: no cover
    main()
