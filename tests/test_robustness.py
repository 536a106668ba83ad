"""The tool stays standing when the engine is most wrong, and a defect in the tool never reads
as a verdict: the routing fault that once crashed the differ, and the CLI's last line of defence."""
import json

import pytest
import torch
from click.testing import CliRunner

from corruptcheck.cli import app as cli
from corruptcheck.engines.base import Capture, Engine


def _engine_from(points, edit):
    class Edited(Engine):
        name = "edited"

        def run(self, case, precision, **_):
            pts = {k: v.float() if v.is_floating_point() else v.clone() for k, v in points.items()
                   if not k.startswith("mtp.")}
            edit(pts)
            return Capture(pts, self.name, precision)

    return Edited()


def test_every_token_choosing_other_experts_is_a_verdict(tiny, tiny_ref, monkeypatch, tmp_path):
    """Every token of the first learned-routing layer routed to other experts (the fault that
    crashed `float_metrics` on an empty selection): exit 1, the routing point fails with its
    reason, and so does `moe.weights`, with nothing left to compare."""
    from corruptcheck import compare as compare_mod

    points, _ = tiny_ref
    layer = tiny.config.num_hash_layers
    n = tiny.config.n_routed_experts

    def rotate(pts):
        pts[f"layers.{layer}.moe.experts"] = (pts[f"layers.{layer}.moe.experts"] + 1) % n

    monkeypatch.setattr(compare_mod, "get_engine", lambda name: _engine_from(points, rotate))
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "edited", "--case", "tiny", "--json", str(out)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    doc = json.loads(out.read_text())
    by = {p["name"]: p for p in doc["points"]}
    experts, weights = by[f"layers.{layer}.moe.experts"], by[f"layers.{layer}.moe.weights"]
    assert experts["verdict"] == "fail" and experts["metrics"]["genuine"] == sum(tiny.seq_lens)
    assert weights["verdict"] == "fail" and weights["metrics"]["rows_compared"] == 0
    assert weights["reason"].startswith("no token chose the reference's experts (0 of 105 rows agree)")
    assert doc["first_divergence"]["name"] == f"layers.{layer}.moe.experts"


def test_internal_error_is_one_line_exit_2_with_traceback_file(tmp_path, monkeypatch):
    """A bug in the tool: one line naming it, the traceback in a file, exit 2, and the good report
    from an earlier run left alone."""
    import corruptcheck.compare as compare_mod

    def broken(*a, **k):
        return 1 / 0

    out = tmp_path / "r.json"
    out.write_text('{"verdict": "pass"}')
    monkeypatch.setattr(compare_mod, "compare", broken)
    monkeypatch.setenv("CORRUPTCHECK_CRASH_DIR", str(tmp_path / "crash"))
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--case", "tiny", "--json", str(out)])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert lines[0].startswith("corruptcheck: internal error (a bug in corruptcheck, not a verdict): "
                               "ZeroDivisionError: division by zero at test_robustness.py:")
    crash = list((tmp_path / "crash").glob("corruptcheck-crash-*.txt"))
    assert len(crash) == 1 and str(crash[0]) in lines[0]
    text = crash[0].read_text()
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError" in text and "compare --engine" in text
    assert out.read_text() == '{"verdict": "pass"}'


def test_bad_input_escaping_a_command_is_one_line(monkeypatch):
    from corruptcheck.errors import BadInput
    import corruptcheck.cases as cases_mod

    monkeypatch.setattr(cases_mod, "CASES", type("Boom", (), {"values": lambda self: (_ for _ in ()).throw(
        BadInput("case table unreadable"))})())
    res = CliRunner().invoke(cli.main, ["cases"])
    assert res.exit_code == 2 and res.stderr.strip() == "corruptcheck: error: case table unreadable"


def test_interrupt_is_not_an_internal_error(monkeypatch):
    import corruptcheck.cases as cases_mod

    def interrupt(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(cases_mod, "CASES", type("Stop", (), {"values": interrupt})())
    res = CliRunner().invoke(cli.main, ["cases"])
    assert res.exit_code != 0 and "internal error" not in res.output


@pytest.mark.parametrize("args,needle", [
    (["--engine", "hf", "--engine-option", "bogus=1"], "engine 'hf' has no option 'bogus' (its options: attn_impl, batch, crash)"),
    (["--engine", "vllm", "--engine-option", "max_num_batched_tokens=lots"],
     "engine option max_num_batched_tokens='lots': expected a positive integer (the scheduler's token budget"),
    (["--engine", "vllm", "--engine-option", "kv_cache_gib=-1"], "expected a positive finite number"),
    (["--engine", "vllm", "--engine-option", "fix=everything"], "expected one of routed-swiglu-clamp"),
    (["--engine", "vllm", "--engine-option", "kv_cache_dtype=fp8", "--engine-option", "kv_cache_dtype=auto"],
     "given 2 times"),
])
def test_bad_engine_options_stop_before_the_engine_starts(args, needle):
    res = CliRunner().invoke(cli.main, ["compare", "--case", "flash-engine", *args])
    assert res.exit_code == 2 and needle in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
