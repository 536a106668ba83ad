import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from corruptcheck.cli import app as cli
pytest.importorskip("transformers")


def _cc(*args, **kw):
    return subprocess.run([sys.executable, "-m", "corruptcheck", *args], capture_output=True, text=True, **kw)


def test_compare_hf_tiny_json(tmp_path):
    out = tmp_path / "r.json"
    r = _cc("compare", "--engine", "hf", "--case", "tiny", "--dtype", "float32", "--json", str(out))
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "pass" and doc["engine"] == "hf" and doc["case"] == "tiny"
    assert doc["precision"] == "float32" and doc["first_divergence"] is None
    assert set(doc["summary"]) >= {"compared", "failed", "missing"}
    assert doc["summary"]["compared"] >= 80 and doc["summary"]["failed"] == 0
    p = next(p for p in doc["points"] if p["name"] == "layers.3.out")
    assert set(p) >= {"name", "verdict", "metrics", "tolerance"}
    assert set(p["metrics"]) >= {"rel_l2", "max_abs", "norm_ratio"}
    assert doc["coverage"]["indexer_pruning_fraction"] > 0
    assert "PASS" in r.stdout


def test_cases_lists_builtins():
    r = _cc("cases")
    assert r.returncode == 0
    for name in ("tiny", "flash-slice", "pro-slice"):
        assert name in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["compare", "--engine", "nope"], "unknown engine"),
    (["compare", "--engine", "hf", "--case", "nope"], "unknown case"),
    (["compare", "--engine", "hf", "--dtype", "fp7"], "Invalid value"),
])
def test_bad_input_exits_2_with_one_line(args, needle):
    r = _cc(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_fail_exits_1_and_keeps_good_report(tmp_path, monkeypatch, tiny_ref):
    """An engine with one corrupted point fails with exit 1 naming it."""
    from corruptcheck import compare as compare_mod
    from corruptcheck.engines.base import Capture, Engine

    points, _ = tiny_ref

    class Corrupt(Engine):
        name = "corrupt"

        def run(self, case, precision, **_):
            pts = {k: v.float() if v.is_floating_point() else v for k, v in points.items() if not k.startswith("mtp.")}
            pts["layers.2.attn.out"] = pts["layers.2.attn.out"] * 1.01
            return Capture(pts, self.name, precision)

    monkeypatch.setattr(compare_mod, "get_engine", lambda name: Corrupt())
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "corrupt", "--case", "tiny", "--json", str(out)])
    assert res.exit_code == 1, res.output
    doc = json.loads(out.read_text())
    assert doc["verdict"] == "fail" and doc["first_divergence"]["name"] == "layers.2.attn.out"

    # a run that errors never overwrites the good report
    before = out.read_bytes()
    monkeypatch.setattr(compare_mod, "get_engine", lambda name: (_ for _ in ()).throw(
        __import__("corruptcheck.errors", fromlist=["BadInput"]).BadInput("broken engine output")))
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "corrupt", "--json", str(out)])
    assert res.exit_code == 2 and "broken engine output" in res.output
    assert out.read_bytes() == before


def test_unwritable_report_path_exits_2(tmp_path):
    target = tmp_path / "ro"
    target.mkdir()
    os.chmod(target, 0o500)
    try:
        if os.access(target, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        r = _cc("compare", "--engine", "reference", "--case", "tiny", "--json", str(target / "r.json"))
        assert r.returncode == 2 and "cannot write" in r.stderr
    finally:
        os.chmod(target, 0o700)


def test_reference_engine_float32_passes_quietly():
    """The reference's own float32 run agrees with its float64 run (no false alarm)."""
    r = _cc("compare", "--engine", "reference", "--case", "tiny", "--dtype", "float32", "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("pass")


def test_uninstalled_gpu_engine_exits_2_with_install_hint():
    r = _cc("compare", "--engine", "sglang", "--case", "tiny")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "pip install 'corruptcheck[sglang]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cc("engines")
    assert r.returncode == 0
    for name in ("reference", "hf", "dump", "vllm", "sglang", "trtllm"):
        assert name in r.stdout
    assert "corruptcheck[trtllm]" in r.stdout


@pytest.mark.parametrize("args", [
    ["compare", "--engine", "reference", "--case", "tiny"],
    ["selftest", "--engine", "reference", "--cases", "tiny", "--faults", "sinkhorn-19-iters", "--no-benign"],
    ["sensitivity", "--engine", "reference", "--case", "tiny", "--faults", "sinkhorn-19-iters"],
    ["sweep", "--engine", "reference", "--hidden", "256"],
])
@pytest.mark.parametrize("where", ["/proc/nope/r.json", "{tmp}/file/r.json"])
def test_unwritable_output_is_refused_before_any_work(args, where, tmp_path, monkeypatch):
    """An output path that cannot be written ends the command with one line and exit 2 before
    the engine runs (compare here would raise if it ran), and leaves nothing behind."""
    import corruptcheck.compare as compare_mod
    from corruptcheck.selftest import runner, sensitivity, sweep

    def ran(*a, **k):
        raise AssertionError("ran")

    for module in (compare_mod, runner, sensitivity, sweep):  # every binding of compare, restored after
        monkeypatch.setattr(module, "compare", ran)
    (tmp_path / "file").write_text("x")  # {tmp}/file/r.json: its parent is a file
    path = where.format(tmp=tmp_path)
    res = CliRunner().invoke(cli.main, [*args, "--json", path])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"corruptcheck: error: cannot write {path}: "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_writable_probes_and_leaves_nothing(tmp_path):
    from corruptcheck.storage.atomic import check_writable

    assert check_writable(tmp_path / "a" / "b" / "r.json") is None and list(tmp_path.iterdir()) == []
    assert check_writable(tmp_path) == "it is a directory"
    (tmp_path / "f").write_text("x")
    assert check_writable(tmp_path / "f" / "r.json") == f"{tmp_path / 'f'} is not a directory"
    assert check_writable("/proc/nope/r.json")


def test_gate_refuses_an_unwritable_out_dir_before_any_run(tmp_path):
    (tmp_path / "file").write_text("x")
    res = CliRunner().invoke(cli.main, ["gate", "--engine", "reference", "--out", str(tmp_path / "file" / "gate")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"corruptcheck: error: cannot write {tmp_path / 'file' / 'gate' / 'summary.json'}: {tmp_path / 'file'} is not a directory"]


def test_the_cli_names_no_engine():
    """compare's and dump's help name no engine's own flags (the engines declare their options);
    the old flags still work as aliases of declared options, and one an engine does not declare
    is one line, exit 2, before anything runs."""
    for cmd in ("compare", "dump"):
        res = CliRunner().invoke(cli.main, [cmd, "--help"])
        assert res.exit_code == 0
        for flag in ("--attn-impl", "--batch", "--path", "--format", "hf:", "dump:"):
            assert flag not in res.output, (cmd, flag)
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--batch", "--quiet"])
    assert res.exit_code == 2 and "batch" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--engine-option", "attn_impl=sdpa"])
    assert res.exit_code == 2 and "attn_impl" in res.output
