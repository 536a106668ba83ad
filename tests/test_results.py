"""Typed results (judge/results.py): the report document round-trips through Report, and every
renderer gives the same bytes from the judged Report as from the Report read back from its JSON,
also where the judge's numbers are not finite."""
import io
import json
import math

import pytest
from rich.console import Console

from corruptcheck.compare import compare
from corruptcheck.reports.html import render
from corruptcheck.reports.render import junit_xml, print_table
from corruptcheck.judge.differ import Comparison
from corruptcheck.judge.results import Culprit, Phase, Point, Report, Summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _terminal(rep) -> str:
    buf = io.StringIO()
    print_table(rep, Console(file=buf, width=160, force_terminal=True))
    return buf.getvalue()


def test_report_round_trips_and_renders_the_same(tiny):
    res = compare(tiny, "reference", "float64")
    rep = res.report
    doc = rep.to_json()
    again = Report.from_json(json.loads(json.dumps(doc)))
    assert json.dumps(again.to_json()) == json.dumps(doc)
    assert all(isinstance(p, Point) for p in again.points) and isinstance(again.summary, Summary)
    for renderer in (render, junit_xml, _terminal):
        assert renderer(rep) == renderer(again)


def test_optional_keys_are_written_only_with_a_value():
    c = Culprit("layers.1.attn.out", 1, 3.0, 0.1, 1.0, "why")
    assert "phase" not in c.to_json()
    assert Culprit.from_json({**c.to_json(), "phase": {"phase": "decode", "step": 2, "chunk": None}}).phase["step"] == 2
    p = Phase("decode", 2, None, 3, "pass", 0.5, "embed", 30, None)
    assert list(p.to_json()) == ["phase", "step", "chunk", "tokens", "verdict", "worst_ratio", "worst_point", "pairs",
                                 "first_divergence"]


def test_non_finite_numbers_stay_the_judges_and_are_written_as_null(tiny):
    """A point the judge found infinitely over (NaN/Inf parity) keeps ratio inf on the typed
    report; its JSON, and every renderer, show it as the document does (null / "-"), the same
    from the judged report as from the one read back."""
    parity = Point("layers.1.attn.out", "fail", 1, "float", {"rel_l2": None, "norm_ratio": None}, None, math.inf,
                   "NaN/Inf parity", {"verdict": "fail", "ratio": math.inf, "rel_l2": math.nan, "role": "culprit"})
    ok = Point("embed", "pass", None, "float", {"rel_l2": 0.0, "norm_ratio": 1.0}, {"value": 1e-9}, 0.5, "", {})
    comp = Comparison([ok, parity], "float32")
    rep = Report.judged(comp, case=tiny, engine="e", coverage={}, reference={"source": "s"}, engine_info={},
                        timings={}, noise_model="n", culprit=Culprit(parity.name, 1, None, None, None, "x"),
                        teacher_forcing="run")
    assert rep.points[1] is parity and parity.ratio == math.inf and parity.local["ratio"] == math.inf
    assert (parity.finite_ratio, parity.finite_local["ratio"], parity.finite_local["rel_l2"]) == (None, None, None)
    assert ok.finite_local is None  # an empty local result is written as null
    doc = rep.to_json()
    assert doc["points"][1]["ratio"] is None and doc["points"][1]["local"]["ratio"] is None
    assert doc["summary"]["worst_ratio"] == {"name": parity.name, "ratio": None}  # inf is the worst, written null
    json.dumps(doc, allow_nan=False)
    again = Report.from_json(json.loads(json.dumps(doc)))
    for renderer in (render, junit_xml, _terminal):
        assert renderer(rep) == renderer(again)
