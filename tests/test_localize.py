"""Precision-aware tolerances, tie-aware discrete checks and teacher-forced localization
(docs/tolerances.md): no false alarm on honest precision changes, detection and localization of
injected faults, reports."""
import json
import xml.etree.ElementTree as ET

import pytest

from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.engines.hf import OutputPatch
from corruptcheck.reports.html import render
from corruptcheck.reports.render import junit_xml
from fault_engines import scale_attn_out


def _point(rep, name):
    return next(p for p in rep.points if p.name == name)


def _max_ratio(rep):
    return max(p.ratio for p in rep.points if p.ratio is not None)


@pytest.mark.usefixtures("transformers")
def test_bf16_engine_is_no_false_alarm_on_tiny(tiny):
    rep = compare(tiny, "hf", "bfloat16", teacher_forcing="always").report
    assert rep.verdict == "pass", [(p.name, p.reason) for p in rep.failed]
    assert _max_ratio(rep) < 0.5
    assert rep.culprit is None
    # teacher forcing on an honest engine: every sub-block is within its local tolerance
    locals_ = [p.local for p in rep.points if p.local and p.local.get("ratio") is not None]
    assert locals_ and max(l["ratio"] for l in locals_) < 1


def test_reference_bf16_variants_pass_in_both_directions(tiny):
    """The reference's own bf16 run (one of the noise variants) passes; a float32 run judged
    at bfloat16 passes too (more precise than declared is fine)."""
    assert compare(tiny, "reference", "bfloat16").report.verdict == "pass"


@pytest.mark.usefixtures("transformers")
@pytest.mark.parametrize("precision,factor", [("float32", 1.01), ("bfloat16", 1.05)])
def test_scale_error_is_caught_and_localized(tiny, precision, factor):
    rep = compare(tiny, "hf", precision, patches=[scale_attn_out(1, factor)]).report
    assert rep.verdict == "fail"
    p = _point(rep, "layers.1.attn.out")
    assert p.verdict == "fail"
    assert rep.first_divergence["name"] == "layers.1.attn.out"
    assert rep.culprit.name == "layers.1.attn.out"
    assert p.local["role"] == "culprit"
    # cosine alone would have passed this scale error
    assert p.metrics["cosine"] > 0.99
    assert abs(p.metrics["norm_ratio"] - factor) < 0.5 * (factor - 1)


@pytest.mark.usefixtures("transformers")
def test_later_layers_inherit_drift(tiny):
    rep = compare(tiny, "hf", "float32", patches=[scale_attn_out(1, 1.01)]).report
    later = [p for p in rep.failed if p.layer is not None and p.layer >= 2]
    assert later, "a 1% error must drift past the fp32 tolerance downstream"
    roles = {p.local["role"] for p in later}
    assert roles == {"inherited"}
    culprit_block = [p for p in rep.failed if p.local["role"].startswith("culprit")]
    assert all(p.layer == 1 for p in culprit_block)


@pytest.mark.usefixtures("transformers")
def test_reports_for_a_failing_run(tiny, tmp_path):
    rep = compare(tiny, "hf", "float32", patches=[scale_attn_out(2, 1.01)]).report
    doc = rep.to_json()
    json.dumps(doc, allow_nan=False)
    # schema 1 fields are still there
    assert {"verdict", "engine", "case", "precision", "points", "first_divergence", "coverage", "summary"} <= set(doc)
    assert {"compared", "failed", "missing"} <= set(doc["summary"])
    assert doc["culprit"]["name"] == "layers.2.attn.out"
    p = next(p for p in doc["points"] if p["name"] == "layers.2.attn.out")
    assert p["tolerance"]["derivation"] and p["tolerance"]["value"] > 0 and p["ratio"] > 1
    root = ET.fromstring(junit_xml(rep))
    cases = root.findall(".//testcase")
    assert len(cases) == len(doc["points"])
    failed = [c for c in cases if c.find("failure") is not None]
    assert len(failed) == doc["summary"]["failed"]
    assert any("culprit" in c.find("failure").get("message") for c in failed)
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert len(skipped) == sum(p["verdict"] in ("missing", "skipped", "not-exercised") for p in doc["points"])
    page = render(rep)
    assert "culprit: layers.2.attn.out" in page and "<svg" in page and "<script" not in page


def test_not_compared_is_error(tiny, monkeypatch):
    from corruptcheck.engines.base import Capture, Engine

    class Empty(Engine):
        name = "empty"

        def run(self, case, precision, **_):
            return Capture({}, self.name, precision)

    assert compare(tiny, "empty", "float32", engine=Empty()).report.verdict == "error"


@pytest.mark.slow
@pytest.mark.usefixtures("transformers")
@pytest.mark.parametrize("name", ["flash-slice", "pro-slice"])
def test_bf16_no_false_alarm_on_wide_slices(name):
    rep = compare(get_case(name), "hf", "bfloat16").report
    assert rep.verdict == "pass", [(p.name, p.reason) for p in rep.failed]
    assert _max_ratio(rep) < 0.5
    topk = [p for p in rep.points if p.name.endswith("indexer_topk")]
    assert all(p.metrics["genuine"] == 0 for p in topk)


@pytest.mark.slow
@pytest.mark.usefixtures("transformers")
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_pro_slice_last_1024_channels_corrupted(precision):
    """Corrupt hidden channels 6144..7167 of layer 0's FFN mHC-pre output (a kernel that only
    handles 6144 of 7168 channels): fails at that point, in both precisions."""
    case = get_case("pro-slice")

    def drop_tail(t):
        t = t.clone()
        t[..., 6144:] = 0
        return t

    patch = OutputPatch("model.layers.0.ffn_hc", drop_tail, index=2, label="zero channels 6144: of ffn_hc.collapsed")
    rep = compare(case, "hf", precision, patches=[patch]).report
    assert rep.verdict == "fail"
    assert rep.first_divergence["name"] == "layers.0.ffn_hc.collapsed"
    assert rep.culprit.name == "layers.0.ffn_hc.collapsed"
