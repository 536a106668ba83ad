"""`corruptcheck checkpoint` (write a case as a release checkpoint) and `corruptcheck check`
(an engine dump against a release checkpoint, unit by unit, locally or on Ray):
docs/checkpoints.md."""
from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from corruptcheck.cli.common import check_outputs, check_store, emit_report, fail
from corruptcheck.errors import BadInput


@click.command("checkpoint")
@click.option("--case", "case_name", required=True, help="built-in case (tiny-release and pro-release are release-exact)")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="checkpoint directory to write")
@click.option("--experts", type=click.Choice(["fp4", "fp8"]), default="fp4", show_default=True,
              help="routed experts: MXFP4 (I8 + E8M0 per 32) or FP8 (F8_E4M3 + F32 128x128, as Base releases)")
@click.option("--shards", default=4, show_default=True, help="number of safetensors shards")
def checkpoint(case_name, out_dir, experts, shards):
    """Write a case's weights as a DeepSeek V4 release checkpoint (sharded safetensors + index +
    config.json), then read it back and say whether it holds the case's exact numbers."""
    from corruptcheck.cases import get_case
    from corruptcheck.release.writer import write_release_checkpoint

    try:
        summary = write_release_checkpoint(get_case(case_name), out_dir, experts, shards)
    except BadInput as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out_dir}: {exc}")
    click.echo(f"wrote {summary['tensors']} tensors ({summary['bytes'] / 2**30:.2f} GiB) of case {case_name} in "
               f"{summary['shards']} shards to {summary['path']} (experts {experts})")
    if summary["exact"]:
        click.echo("read back: every parameter equals the case's (a dump of the case checks clean against it)")
    else:
        click.echo(f"warning: case {case_name} is not exact in this format: stored values differ from the case's by up "
                   f"to {summary['max_rel_difference']:.3g} (relative); a dump of the case will not match this "
                   "checkpoint (the release-exact cases are tiny-release and pro-release)", err=True)


class _Bar:
    """A progress bar on stderr: one step per unit, the last unit's verdict beside it."""

    def __init__(self, quiet: bool):
        self.progress = Progress(TextColumn("check"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=Console(stderr=True),
                                 transient=True, disable=quiet)
        self.task = None

    def started(self, total: int) -> None:
        self.task = self.progress.add_task("", total=total)

    def finished(self, res) -> None:
        self.progress.update(self.task, advance=1, description=f"{res.unit}: {res.verdict} ({res.seconds:.1f} s)")


@click.command("check")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(),
              help="release-format checkpoint directory (config.json, model.safetensors.index.json, shards)")
@click.option("--dump", "dump_dir", required=True, type=click.Path(), help="engine dump directory (docs/dump.md)")
@click.option("--layers", default=None, help="only these units: layer indices and ranges (0,2-5) and embed, head, mtp.0")
@click.option("--ray", "ray_address", default=None, metavar="auto|ADDRESS",
              help="run each unit as a Ray task: auto (a running cluster, else a local one) or a cluster address")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="write the JSON report here")
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="write JUnit XML (one test per point)")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="write a self-contained HTML report")
@click.option("--quiet", is_flag=True, help="print only the summary line (no progress bar)")
@click.option("--record", "record_path", type=click.Path(dir_okay=False),
              help="also record the run in this SQLite results store (corruptcheck history)")
def check(checkpoint_dir, dump_dir, layers, ray_address, json_path, junit_path, html_path, quiet, record_path):
    """Check an engine dump against a release checkpoint, unit by unit (embedding, each layer,
    head, MTP), teacher-forced, without a full forward. Exit 0 pass, 1 fail or incomplete, 2 error."""
    from corruptcheck.release.check import check as run_check

    check_outputs(json_path, junit_path, html_path)
    if record_path:
        check_store(record_path)
    try:
        bar = _Bar(quiet)
        with bar.progress:
            rep = run_check(checkpoint_dir, dump_dir, layers, ray_address, progress=bar)
    except BadInput as exc:
        fail(str(exc))
    emit_report(rep, quiet, json_path, junit_path, html_path, record_path, "check")
