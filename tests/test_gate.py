import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from corruptcheck import gate
from corruptcheck.errors import BadInput

TESTS = Path(__file__).parent


def _gate(*args, tmp):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "corruptcheck", "gate", *args, "--out", str(tmp)],
                          capture_output=True, text=True, env=env)


def test_default_policy_covers_pro_width():
    policy = gate.load_policy(None)
    widths = {r.case.config.hidden_size for r in policy.runs}
    assert 7168 in widths and 4096 in widths
    assert {r.precision for r in policy.runs} == {"float32", "bfloat16"}
    assert any(r.batch_size > 1 for r in policy.runs)


@pytest.mark.parametrize("text,needle", [
    ("[[run]]\ncase='tiny'\nprecision='fp7'\n", "unknown precision"),
    ("[[run]]\ncase='nope'\nprecision='float32'\n", "unknown case"),
    ("name='x'\n", "no [[run]]"),
    ("[[run]]\ncase='tiny'\nprecisions=['float32']\nbogus=1\n", "unknown run key"),
    ("[coverage]\nmin_magic=1\n[[run]]\ncase='tiny'\nprecision='float32'\n", "unknown coverage"),
    ("[[run]\n", "not valid TOML"),
])
def test_bad_policies(text, needle):
    with pytest.raises(BadInput, match=needle.replace("[", r"\[")):
        gate.parse_policy(text)


def test_coverage_requirement_and_missing_points_fail_a_run(tiny, tiny_ref, tmp_path):
    policy = gate.parse_policy("[coverage]\nmin_clamp_hits = 1000000\n[[run]]\ncase='tiny'\nprecision='float32'\n")
    outcomes = gate.run_gate("reference", policy, tmp_path)
    assert outcomes[0].verdict == "fail" and "coverage not met: clamp_hits" in outcomes[0].reasons[0]


def _default_policy_tiny_runs() -> str:
    """The default policy with only its `tiny` runs (its defaults, coverage requirements,
    precisions and batch sizes for tiny; the wide runs left out)."""
    head, *runs = re.split(r"(?m)^\[\[run\]\]", gate.default_policy_text())
    tiny = ["[[run]]" + r for r in runs if tomllib.loads("[[run]]" + r)["run"][0]["cases"] == ["tiny"]]
    assert tiny
    return head + "".join(tiny)


@pytest.mark.usefixtures("transformers")
def test_gate_default_policy_tiny_runs_pass_then_fault_fails_naming_culprit(tmp_path):
    """The fast form of the next test: the default policy's tiny runs through the CLI."""
    policy = tmp_path / "tiny.toml"
    policy.write_text(_default_policy_tiny_runs())
    parsed = gate.parse_policy(policy.read_text())
    default = gate.load_policy(None)
    assert (parsed.coverage, parsed.teacher_forcing, parsed.allowed_missing) == (
        default.coverage, default.teacher_forcing, default.allowed_missing)
    assert [r.id for r in parsed.runs] == [r.id for r in default.runs if r.case.name == "tiny"]
    r = _gate("--engine", "hf", "--policy", str(policy), tmp=tmp_path / "ok")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["verdict"] == "pass" and len(summary["runs"]) == len(parsed.runs) == 4
    for run in summary["runs"]:
        for ext in ("json", "xml", "html"):
            assert (tmp_path / "ok" / f"{run['run']}.{ext}").is_file()

    policy.write_text("[[run]]\ncases=['tiny']\nprecisions=['float32']\n")
    r = _gate("--engine", "fault_engines:ScaledAttentionHF", "--policy", str(policy), tmp=tmp_path / "bad")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["verdict"] == "fail"
    assert [run["culprit"]["name"] for run in summary["runs"]] == ["layers.1.attn.out"]


@pytest.mark.slow  # the default policy's wide runs (flash-slice, pro-slice) through transformers
@pytest.mark.usefixtures("transformers")
def test_gate_default_policy_passes_then_fault_fails_naming_culprit(tmp_path):
    r = _gate("--engine", "hf", tmp=tmp_path / "ok")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["verdict"] == "pass" and len(summary["runs"]) == 7
    for run in summary["runs"]:
        for ext in ("json", "xml", "html"):
            assert (tmp_path / "ok" / f"{run['run']}.{ext}").is_file()

    policy = tmp_path / "p.toml"
    policy.write_text("[[run]]\ncases=['tiny', 'pro-slice']\nprecisions=['float32']\n")
    r = _gate("--engine", "fault_engines:ScaledAttentionHF", "--policy", str(policy), tmp=tmp_path / "bad")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["verdict"] == "fail"
    assert {run["culprit"]["name"] for run in summary["runs"]} == {"layers.1.attn.out"}
    assert "layers.1.attn.out" in r.stdout


def test_gate_bad_policy_exits_2(tmp_path):
    r = _gate("--engine", "hf", "--policy", str(tmp_path / "missing.toml"), tmp=tmp_path / "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
