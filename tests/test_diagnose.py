"""The diagnosis (docs/diagnosis.md): the injected defect's hypothesis named first and within
the honest noise, its magnitude fitted; no claim when the matching hypothesis is left out, on
an honest engine, or on a defect no hypothesis describes; the report's JSON, terminal line,
HTML and store carry it only when it ran."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from corruptcheck.cli import app as cli
from corruptcheck.compare import compare
from corruptcheck.engines import get_engine
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.faults import FaultyEngine, get_fault
from corruptcheck.judge.diagnose import CLEAR, explains
from corruptcheck.judge.hypotheses import HYPOTHESES, hypotheses_for
from corruptcheck.judge.results import Report

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Fixed(Engine):
    """An engine that returns a capture made earlier (one engine run, several diagnoses)."""
    name = "fixed"

    def __init__(self, cap: Capture):
        self.cap = cap

    def run(self, case, precision, **_):
        return self.cap


@pytest.fixture(scope="module")
def no_clamp_capture(transformers, tiny):
    """transformers with the shared expert's SwiGLU clamp dropped (V4-07), float32."""
    return FaultyEngine(get_engine("hf"), get_fault("shared-expert-no-clamp")).run(tiny, "float32")


def test_explains_rule():
    assert explains(0.5, 10.0, 5.0)
    assert not explains(1.2, 10.0, 5.0)  # not within noise
    assert not explains(0.9, 1.5, 5.0)  # not clearly better than the reference
    assert not explains(0.5, 0.9, 5.0)  # the reference is not failing: nothing to explain
    assert not explains(0.3, 10.0, 0.8)  # the runner-up is within noise too: ambiguous
    assert not explains(0.6, 10.0, 1.1)  # the runner-up is not clearly worse
    assert explains(0.4, 10.0, 1.01)  # a runner-up just outside the noise, more than CLEAR x worse
    assert not explains(0.9, CLEAR * 0.9 - 1e-9, 5.0) and explains(0.9, CLEAR * 0.9, 5.0)  # the factor, at its edge


def test_hf_fault_named_first_within_noise_and_not_claimed_when_left_out(tiny, no_clamp_capture):
    rep = compare(tiny, "hf", "float32", engine=Fixed(no_clamp_capture)).report
    assert rep.verdict == "fail" and rep.culprit.name == "layers.0.moe.out"
    best = rep.diagnosis[0]
    assert best.hypothesis == "shared-expert-no-clamp" and best.explains and rep.explained is best
    assert best.point == "layers.0.moe.out" and best.sub_block == "layers.0.ffn"
    assert best.residual_ratio <= 1.0 < best.reference_ratio
    assert abs(best.params["m"] - 1.0) <= 0.1  # the whole clamp dropped
    assert sum(d.explains for d in rep.diagnosis) == 1
    ev = best.evidence  # the tokens that fail are the tokens the missing clamp changes
    assert ev["failing"] > 0 and ev["failing_explained"] == ev["failing"] == ev["failing_and_changed"]

    left = compare(tiny, "hf", "float32", engine=Fixed(no_clamp_capture),
                   hypotheses=hypotheses_for(without=("shared-expert-no-clamp",))).report
    assert left.diagnosis and not any(d.explains for d in left.diagnosis)
    assert all(d.hypothesis != "shared-expert-no-clamp" for d in left.diagnosis)
    assert left.diagnosis[0].residual_ratio > 1.0


def test_fitted_magnitude_recovers_the_defect_size(tiny):
    """The softmax scale error at half size: m fitted near 0.5, the factor near its value."""
    fault = get_fault("yarn-mscale-softmax").at(0.5)
    hyps = hypotheses_for(["yarn-mscale-softmax", "window-off-by-one", "hca-causal-off-by-one"])
    rep = compare(tiny, "reference", "float32", engine=FaultyEngine(get_engine("reference"), fault), hypotheses=hyps).report
    best = rep.diagnosis[0]
    assert best.hypothesis == "yarn-mscale-softmax" and best.explains, rep.diagnosis
    assert abs(best.params["m"] - 0.5) <= 0.1
    full = HYPOTHESES["yarn-mscale-softmax"].params(1.0, tiny.config)["softmax_scale_factor"]
    assert math.isclose(best.params["softmax_scale_factor"], 1 + 0.5 * (full - 1), rel_tol=0.05)


def _corrupt_engine(points, factor):
    class Corrupt(Engine):
        name = "corrupt"

        def run(self, case, precision, **_):
            pts = {k: v.float() if v.is_floating_point() else v for k, v in points.items() if not k.startswith("mtp.")}
            pts["layers.2.attn.out"] = pts["layers.2.attn.out"] * factor
            return Capture(pts, self.name, precision)
    return Corrupt()


def test_cli_unexplained_defect_and_json(tmp_path, monkeypatch, tiny_ref):
    """An output scaled by 1.01 (no hypothesis describes it): a ranked list, nothing explains,
    the terminal says 'unexplained'; --diagnose never writes no diagnosis."""
    from corruptcheck import compare as compare_mod

    monkeypatch.setattr(compare_mod, "get_engine", lambda name: _corrupt_engine(tiny_ref[0], 1.01))
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "corrupt", "--case", "tiny", "--json", str(out),
                                        "--html", str(html)])
    assert res.exit_code == 1, res.output
    doc = json.loads(out.read_text())
    assert doc["diagnosis"] and not any(d["explains"] for d in doc["diagnosis"])
    for d in doc["diagnosis"]:
        assert {"hypothesis", "point", "params", "residual_ratio", "reference_ratio", "explains"} <= set(d)
        assert d["point"] == "layers.2.attn.out" and d["reference_ratio"] > 1
    ratios = [d["residual_ratio"] for d in doc["diagnosis"]]
    assert ratios == sorted(ratios) and ratios[0] > 1
    assert "diagnosis: unexplained at layers.2.attn.out" in " ".join(res.output.split())
    assert "Diagnosis" in html.read_text()
    assert Report.from_json(doc).diagnosis[0].hypothesis == doc["diagnosis"][0]["hypothesis"]

    res = CliRunner().invoke(cli.main, ["compare", "--engine", "corrupt", "--case", "tiny", "--json", str(out),
                                        "--diagnose", "never"])
    assert res.exit_code == 1 and "diagnosis" not in json.loads(out.read_text())


def test_pass_has_no_diagnosis_and_always_claims_nothing(tmp_path):
    out = tmp_path / "r.json"
    args = ["compare", "--engine", "reference", "--case", "tiny", "--dtype", "float32", "--schedule", "prefill-only",
            "--json", str(out)]
    res = CliRunner().invoke(cli.main, args + ["--quiet"])
    assert res.exit_code == 0 and "diagnosis" not in json.loads(out.read_text())
    res = CliRunner().invoke(cli.main, args + ["--diagnose", "always"])
    doc = json.loads(out.read_text())
    assert res.exit_code == 0 and doc["diagnosis"] and not any(d["explains"] for d in doc["diagnosis"])
    assert "diagnosis: nothing to explain at" in " ".join(res.output.split())
    assert all(d["reference_ratio"] <= 1 for d in doc["diagnosis"])


def test_hypotheses_command_and_bad_choice():
    res = CliRunner().invoke(cli.main, ["hypotheses"])
    assert res.exit_code == 0
    for name in HYPOTHESES:
        assert name in res.output
    res = CliRunner().invoke(cli.main, ["compare", "--engine", "reference", "--diagnose", "sometimes"])
    assert res.exit_code == 2 and "Traceback" not in res.output


def test_store_records_the_diagnosis(tmp_path):
    from corruptcheck.history import store

    doc = {"engine": "e", "verdict": "fail", "points": [], "diagnosis": [
        {"hypothesis": "a", "explains": False}, {"hypothesis": "b", "explains": True}]}
    assert store.diagnosis_of(doc) == "b"
    assert store.diagnosis_of({**doc, "diagnosis": [{"hypothesis": "a", "explains": False}]}) == "unexplained"
    assert store.diagnosis_of({"verdict": "pass"}) is None
    db = tmp_path / "s.db"
    store.record_report(db, doc)
    assert [r["diagnosis"] for r in store.list_runs(db)] == ["b"]
