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
@click.option("--quiet", is_flag=True, help="print only the summary line")
def compare_cmd(engine_name, case_name, precision, json_path, attn_impl, quiet):
    """Compare an engine against the reference, point by point. Exit 0 pass, 1 fail, 2 error."""
    from corruptcheck.cases import get_case
    from corruptcheck.compare import compare
    from corruptcheck.report import print_table, to_json, write_json

    try:
        case = get_case(case_name)
        res = compare(case, engine_name, precision, attn_impl=attn_impl)
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
    if json_path:
        try:
            write_json(doc, json_path)
        except OSError as exc:
            _fail(f"cannot write {json_path}: {exc}")
    sys.exit({"pass": 0, "fail": 1}.get(doc["verdict"], 2))


if __name__ == "__main__":  # pragma: no cover
    main()
