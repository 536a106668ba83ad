"""The Python API for engine tests (docs/pytest.md): check an engine by name, class or instance, or a
dump directory, against a case; the result's verdict, points, culprit and `assert_ok()`."""
import json
import re

import pytest

from corruptcheck.judge.tolerance import SAFETY

from corruptcheck.cases import get_case
from corruptcheck.api import (CheckResult, CorruptionDetected, MissingPoints, NothingCompared, check,
                              check_dump)
from corruptcheck.engines import engines
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.reference_engine import ReferenceEngine
from corruptcheck.errors import BadInput, EngineUnavailable

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DROPPED = "layers.0.moe.weights"  # a required point


class DropsOnePoint(ReferenceEngine):
    """The reference as an in-process engine object that does not expose one required point."""
    name = "drops-one"

    def run(self, case, precision, **options):
        cap = super().run(case, precision, **options)
        del cap.points[DROPPED]
        return cap


class CapturesNothing(Engine):
    name = "captures-nothing"

    def run(self, case, precision, **options):
        return Capture({}, self.name, precision)


class NotInstalled(Engine):
    name = "not-installed"

    def available(self):
        return False, "its runtime is not installed here"


@pytest.fixture(scope="module")
def scaled_attn_out():
    """hf with layers.1.attn.out scaled by 1.01, handed over as an Engine instance."""
    pytest.importorskip("transformers")
    from fault_engines import ScaledAttentionHF

    class ScaledAttnOut(ScaledAttentionHF):
        name, factor = "hf-scaled", 1.01

    return check(ScaledAttnOut(), "tiny", "float32", schedule="prefill-only")


def test_clean_engine_by_name_passes():
    pytest.importorskip("transformers")
    res = check("hf", "tiny", "float32")  # the default: the case's served schedule, judged by phase
    assert isinstance(res, CheckResult)
    assert res.to_json()["schedule"] != "prefill-only"
    assert [(p.phase, p.verdict) for p in res.phases] == [
        (k, "pass") for k, _ in get_case("tiny").schedule.phase_labels()]
    assert (res.verdict, res.passed, res.engine, res.case, res.precision) == ("pass", True, "hf", "tiny", "float32")
    assert res.culprit is None and res.first_divergence is None and res.failed == []
    assert res.assert_ok() is res
    verdicts = {p.verdict for p in res.points}
    assert verdicts == {"pass", "skipped"}  # hf exposes no MTP / q / kv points: skipped, never passed
    assert res.point("layers.1.attn.out").verdict == "pass"
    assert res.to_json()["verdict"] == "pass"
    assert res.summary().endswith(f"PASS ({res.report.summary.compared} compared, 0 failed, 0 missing, "
                                  f"{sum(p.verdict == 'skipped' for p in res.points)} skipped)")


def test_fault_raises_with_point_metric_tolerance_token_and_culprit(scaled_attn_out):
    res = scaled_attn_out
    assert res.verdict == "fail" and not res.passed
    assert res.first_divergence["name"] == "layers.1.attn.out"
    assert res.culprit["name"] == "layers.1.attn.out"
    with pytest.raises(CorruptionDetected) as info:
        res.assert_ok()
    assert isinstance(info.value, AssertionError)
    msg = str(info.value)
    p = res.point("layers.1.attn.out")
    lines = msg.splitlines()
    assert lines[0].startswith("corruptcheck: engine 'hf-scaled' on case 'tiny' at float32: FAIL")
    assert "first divergence layers.1.attn.out; culprit layers.1.attn.out" in lines[0]
    assert lines[1].startswith("layers.1.attn.out: FAIL")
    assert f"metric: rel_l2 = {p.metrics['rel_l2']:.3g} > tolerance {p.tolerance['value']:.3g}" in msg
    assert f"max({SAFETY:g} x worst free rel_l2 of honest float32 runs" in msg  # how the tolerance was derived
    token = p.metrics["worst_token"]
    assert re.search(rf"worst token: token {token} \(sequence [01], position \d+\)", msg)
    assert "teacher forcing: CULPRIT" in msg
    assert f"failing points ({len(res.failed)}): layers.1.attn.out, " in msg


def test_downstream_points_are_explained_as_inherited(scaled_attn_out):
    res = scaled_attn_out
    later = [p for p in res.failed if p.layer is not None and p.layer >= 2]
    assert later
    for p in later[:3]:
        text = res.explain(p.name)
        assert text.startswith(f"{p.name}: FAIL")
        assert "teacher forcing: inherited" in text and "(culprit layers.1.attn.out)" in text


def test_engine_class_and_missing_point(tmp_path):
    res = check(DropsOnePoint, "tiny", "float32", schedule="prefill-only")  # an Engine subclass works as well
    # nothing fails, but a missing point is never a pass: the run is incomplete
    assert res.verdict == "incomplete" and not res.passed
    assert [p.name for p in res.missing] == [DROPPED]
    assert res.point(DROPPED).verdict == "missing"
    assert "INCOMPLETE (" in res.summary()
    with pytest.raises(MissingPoints, match=rf"missing points \(1\): {re.escape(DROPPED)}"):
        res.assert_ok()
    res.assert_ok(allow_missing=True)  # ... unless the test accepts missing points explicitly
    paths = res.write_reports(tmp_path / "reports")
    doc = json.loads(paths["json"].read_text())
    assert paths["json"].name == "tiny.json" and doc["engine"] == "drops-one" and doc["summary"]["missing"] == 1
    assert paths["html"].name == "tiny.html" and "<html" in paths["html"].read_text()[:200].lower()


def test_nothing_compared_is_an_error():
    res = check(CapturesNothing(), "tiny", "float32")
    assert res.verdict == "error" and not res.passed
    with pytest.raises(NothingCompared, match="nothing compared"):
        res.assert_ok()


@pytest.mark.parametrize("kwargs,error,text", [
    ({"engine": "reference", "case": "no-such-case"}, BadInput, "unknown case 'no-such-case'"),
    ({"engine": "no-such-engine"}, BadInput, "unknown engine 'no-such-engine'"),
    ({"engine": "reference", "precision": "float7"}, BadInput, "unknown precision 'float7'"),
    ({"engine": object()}, BadInput, "engine must be a name, an Engine subclass or an Engine instance"),
    ({"engine": NotInstalled()}, EngineUnavailable, "its runtime is not installed here"),
    ({"engine": "reference", "teacher_forcing": "sometimes"}, BadInput, "teacher_forcing must be one of"),
    ({"engine": "reference", "schedule": "decode-only"}, BadInput, "schedule must be one of case, prefill-only"),
])
def test_bad_input_raises(kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        check(**kwargs)


@pytest.mark.skipif("dump" not in engines(), reason="the dump engine is not registered in this checkout")
def test_check_dump(tmp_path):
    from corruptcheck.cases import get_case
    from corruptcheck.storage.dump import write_dump

    case = get_case("tiny")
    cap = ReferenceEngine().run(case, "float32")
    write_dump(cap.points, case, tmp_path / "dump", engine={"name": "reference", "version": "test"},
               precision="float32")
    res = check_dump(tmp_path / "dump", "tiny")
    assert (res.engine, res.verdict, res.precision) == ("dump", "pass", "float32")
    assert not res.missing
