"""Served compares (schedule.py, phases.py): chunked prefill + greedy decode, judged by phase.
Honest engines pass every phase; faults that only a served model shows are silent in a
prefill-only compare and caught with the schedule, naming the phase and the point."""
import json

import pytest
from click.testing import CliRunner

from corruptcheck.cli import app as cli
from corruptcheck.compare import compare
from corruptcheck.engines import get_engine
from corruptcheck.faults import FaultyEngine
from corruptcheck.judge.phases import point_labels, summarize
from corruptcheck.schedule import Schedule, row_labels
from corruptcheck.faults import faults_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_tiny_schedule_exercises_what_served_models_break(tiny):
    s = tiny.schedule
    cfg = tiny.config
    assert len(s.prompt_lens) >= 3 and s.decode_steps >= 16
    assert all(n > cfg.window for n in s.prompt_lens[:2])  # prompts cross the sliding window
    ratios = {cfg.compress_ratio(i) for i in range(cfg.num_layers)} - {0}
    assert all(s.chunk % m for m in ratios)  # the chunk splits every compression block size
    for p in s.prompt_lens:  # decode crosses a CSA block boundary
        assert (p + s.decode_steps) // cfg.csa_ratio > p // cfg.csa_ratio


def test_row_labels_and_entry_labels(tiny):
    s = Schedule(prompt_lens=(10, 5), decode_steps=3, chunk=4)
    labels = row_labels(s, [13, 8])
    assert labels[:13] == [("prefill", 0)] * 4 + [("prefill", 1)] * 4 + [("prefill", 2)] * 2 + [
        ("decode", 1), ("decode", 2), ("decode", 3)]
    assert labels[13:] == [("prefill", 0)] * 4 + [("prefill", 1)] + [("decode", k) for k in (1, 2, 3)]
    # CSA entries (m=4) close at positions 3, 7, 11 of sequence 0 and 3, 7 of sequence 1
    ent = point_labels(tiny.config, "layers.1.attn.compressed_kv", 5, labels, [13, 8])
    assert ent == [("prefill", 0), ("prefill", 1), ("decode", 2), ("prefill", 0), ("decode", 3)]
    with pytest.raises(Exception, match="prompt lengths"):
        Schedule(prompt_lens=(0,))


@pytest.fixture(scope="module")
def served_hf(tiny):
    return compare(tiny, "hf", "float32", schedule="case")


def test_hf_serves_the_schedule_and_passes(served_hf, tiny):
    r = served_hf.report
    assert r.verdict == "pass" and r.summary.compared == 81
    phases = r.phases
    assert [(p.phase, p.chunk) for p in phases][:4] == [("prefill", 0), ("prefill", 1), ("prefill", 2), ("prefill", 3)]
    assert [p.step for p in phases if p.phase == "decode"] == list(range(1, 17))
    assert all(p.verdict == "pass" and p.worst_ratio < 1 for p in phases)
    pairs = r.summary.pairs_by_phase
    assert pairs["prefill"] > 5000 and pairs["decode"] > 3000
    g = r.greedy
    assert g["steps"] == 48 and g["agree"] + g["near_ties"] == 48 and not g["disagreements"]
    # the case the run was judged on holds the engine's own decoded tokens
    assert [len(s) for s in served_hf.case.sequences()] == [n + 16 for n in tiny.schedule.prompt_lens]


@pytest.mark.parametrize("engine,precision", [("reference", "bfloat16"), ("reference", "fp8-serving"),
                                              ("hf", "bfloat16")])
def test_honest_served_runs_have_no_false_alarm(tiny, engine, precision):
    r = compare(tiny, engine, precision, schedule="case").report
    assert r.verdict == "pass", [p.name for p in r.failed]
    assert all(p.verdict == "pass" for p in r.phases), summarize(r.phases)
    assert not r.greedy["disagreements"]


@pytest.mark.parametrize("name", sorted(faults_for("hf", served=True)))
def test_serving_fault_is_silent_prefill_only_and_caught_served(tiny, name):
    fault = faults_for("hf", served=True)[name]
    engine = FaultyEngine(get_engine("hf"), fault)
    before = compare(tiny, "hf", "float32", engine=engine, schedule="prefill-only").report
    assert before.verdict == "pass" and engine.state.fired == 0  # today's compare cannot see it
    after = compare(tiny, "hf", "float32", engine=engine, schedule="case").report
    assert engine.state.fired > 0 and after.verdict == "fail"
    first = after.first_divergence["name"]
    assert first.split(".", 2)[-1] in fault.points, first
    assert (after.culprit.name if after.culprit else "").split(".", 2)[-1] in fault.points
    failing = [p for p in after.phases if p.verdict == "fail"]
    assert failing
    if name in ("stale-indexer-rows", "decode-kernel-scale"):  # decode only: every prefill chunk passes
        assert {p.phase for p in failing} == {"decode"}
    else:  # carried state across chunks: from a later prefill chunk on, never the first
        assert failing[0].phase == "prefill" and failing[0].chunk >= 1
    # teacher forcing ran within the first failing phase and says so
    assert after.culprit.phase == {"phase": failing[0].phase, "step": failing[0].step, "chunk": failing[0].chunk}


def test_cli_default_schedule_json_and_prefill_only(tmp_path):
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--case", "tiny", "--dtype", "float64",
                                        "--json", str(out), "--html", str(html)])
    assert res.exit_code == 0, res.output
    page = html.read_text()
    assert "By phase" in page and "prefill chunk 3" in page and "decode step 16" in page
    assert "prefill chunks 0-3: pass" in res.output and "decode steps 1-16: pass" in res.output
    doc = json.loads(out.read_text())
    assert doc["schedule"]["decode_steps"] == 16 and len(doc["phases"]) == 20
    assert set(doc["summary"]["pairs_by_phase"]) == {"prefill", "decode"} and doc["summary"]["pairs_by_phase"]["decode"]
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--case", "tiny", "--dtype", "float64",
                                        "--schedule", "prefill-only", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert res.exit_code == 0 and doc["schedule"] == "prefill-only" and doc["phases"] == []
    assert doc["summary"]["pairs_by_phase"]["decode"] == 0


def test_an_engine_that_cannot_serve_says_what_was_not_checked(tmp_path, tiny):
    from corruptcheck.storage.dump import write_dump
    from corruptcheck.reference import run

    pts = run(tiny.config, tiny.params(), tiny.sequences(), "float32").points
    d = write_dump(pts, tiny, tmp_path / "D", engine={"name": "x"}, precision="float32")
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "dump", "--path", str(d)])
    assert res.exit_code == 0, res.output
    assert "schedule: prefill only — engine 'dump' has no scheduled capture yet" in " ".join(res.output.split())


def test_a_point_failing_only_in_a_phase_fails_the_run():
    """A decode-only error diluted among the prefill rows passes the whole run; its phase
    verdict decides (phases.fail_by_phase), and the reason says both."""
    from corruptcheck.judge.differ import Comparison
    from corruptcheck.judge.phases import fail_by_phase
    from corruptcheck.judge.results import Phase, Point

    comp = Comparison([Point("layers.1.attn.out", "pass", 1, "float", ratio=0.6),
                       Point("layers.1.out", "pass", 1, "float", ratio=0.3)], "fp8-serving")
    assert comp.verdict == "pass"
    decode_1 = Phase("decode", 1, None, 3, "fail", 8.41, "layers.1.attn.out", 30, None)
    fail_by_phase(comp, {"layers.1.attn.out": {"ratio": 8.41, "phase": decode_1}})
    assert comp.verdict == "fail" and comp.first_divergence["name"] == "layers.1.attn.out"
    p = comp.points[0]
    assert p.ratio == 8.41 and p.reason == ("within tolerance over the whole run (err/tol 0.6) but fails in "
                                            "decode step 1 (err/tol 8.41)")
    assert comp.points[1].verdict == "pass"


def test_staggered_arrivals_in_the_schedule_and_the_gate():
    from corruptcheck.errors import BadInput
    from corruptcheck.gate import parse_policy

    s = Schedule(prompt_lens=(10, 5, 4), arrivals=(0, 2, 2))
    assert [s.arrival(i) for i in range(3)] == [0, 2, 2] and s.to_dict()["arrivals"] == [0, 2, 2]
    assert "arriving at engine steps 0/2/2" in s.describe()
    assert Schedule(prompt_lens=(3,)).arrival(0) == 0
    for bad in ((0, 1), (0, -1, 2), (0, 1.5, 2)):
        with pytest.raises(BadInput, match="arrivals"):
            Schedule(prompt_lens=(10, 5, 4), arrivals=bad)
    (run,) = parse_policy('[[run]]\ncase = "tiny"\nprecision = "float32"\n'
                          'schedule = {prompt_lens = [40, 29, 22], chunk = 10, arrivals = [0, 0, 3]}\n').runs
    assert run.schedule.arrivals == (0, 0, 3)
    with pytest.raises(BadInput, match="arrivals"):
        parse_policy('[[run]]\ncase = "tiny"\nprecision = "float32"\nschedule = {prompt_lens = [40, 29], arrivals = 3}\n')
