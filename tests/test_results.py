"""Typed results (results.py): the report document round-trips through Report, and every
renderer gives the same bytes from the judged Report as from the Report read back from its JSON."""
import io
import json

import pytest
from rich.console import Console

from corruptcheck.compare import compare
from corruptcheck.reports.html import render
from corruptcheck.reports.render import junit_xml, print_table
from corruptcheck.reports.results import Culprit, Phase, Point, Report, Summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _terminal(rep) -> str:
    buf = io.StringIO()
    print_table(rep, Console(file=buf, width=160, force_terminal=True))
    return buf.getvalue()


def test_report_round_trips_and_renders_the_same(tiny):
    res = compare(tiny, "reference", "float64")
    rep = Report.from_result(res)
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
