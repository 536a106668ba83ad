"""`corruptcheck sensitivity` (corruptcheck/selftest/sensitivity.py, docs/faults.md §Magnitude knobs and
minimum detectable effect): the smallest magnitude of each fault's knob that compare still flags
and localizes, and its effect there in units of the honest noise. The reference engine on tiny
at float32, a few families and few bisection steps, keep it short."""
import json
import math

import pytest
from click.testing import CliRunner

from corruptcheck.cases import get_case
from corruptcheck.cli.app import main
from corruptcheck.faults import get_fault
from corruptcheck.selftest.runner import fault_run
from corruptcheck.selftest.sensitivity import M_LO, run_sensitivity
from corruptcheck.selftest.sensitivity_html import render_html

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = ["sinkhorn-19-iters", "window-off-by-one"]


@pytest.fixture(scope="module")
def sens():
    return run_sensitivity("reference", "tiny", "float32", faults=FAMILIES, steps=3)


def test_every_family_gets_a_finite_mde(sens):
    assert [f.family for f in sens.families] == FAMILIES and sens.precision == "float32"
    for f in sens.families:
        assert f.localized and 0 < f.detected_at <= 1, f.family
        assert f.mde_noise_units is not None and math.isfinite(f.mde_noise_units) and f.mde_noise_units > 0
        assert f.mde_noise_units == pytest.approx(f.effect / f.noise)
        assert len(f.steps) == 4 and f.steps[0].m == 1.0  # m = 1, then 3 bisection steps
        assert f.flagged_at is not None and f.flagged_at <= f.detected_at
        # the point is where it was caught: an accepted strike point, in a layer where it fired
        fault = get_fault(f.family)
        assert f.point.split(".", 2)[-1] in fault.points + fault.also
        # effects grow with m at that point; the one at m* is the family's effect
        by_m = sorted(f.steps, key=lambda s: s.m)
        assert [s.effect for s in by_m] == sorted(s.effect for s in by_m)
        assert next(s for s in f.steps if s.m == f.detected_at).effect == f.effect


def test_detected_at_m_star_and_not_one_step_below(sens):
    """An independent faulty run at m* fails and localizes; one at the bisection's lower end
    (the largest magnitude it found undetected) does not, unless that end is M_LO untried."""
    case = get_case("tiny")
    for f in sens.families:
        row, _ = fault_run(case, "reference", get_fault(f.family).at(f.detected_at), "float32")
        assert row.verdict == "fail" and row.localized, f.family
        if f.undetected_at is None:
            assert f.detected_at < 3 * M_LO
            continue
        assert f.undetected_at < f.detected_at
        row, _ = fault_run(case, "reference", get_fault(f.family).at(f.undetected_at), "float32")
        assert not row.localized, f.family


def test_honest_side(sens):
    assert [h.variant for h in sens.honest] == ["clean", "fp32-split-k4"]  # the reference's float32 variants
    assert all(h.worst_ratio is not None and h.worst_ratio < 1 for h in sens.honest)
    assert sens.honest_max_ratio == max(h.worst_ratio for h in sens.honest) < 1


def test_a_family_that_does_not_fire_has_no_mde():
    res = run_sensitivity("reference", "tiny", "float32", faults=["router-split-k-tail"], steps=1)
    (f,) = res.families
    assert f.mde_noise_units is None and f.detected_at is None and not f.steps
    assert "trigger never fires" in f.note
    assert render_html(res).count("<svg") == 0


def test_cli_json_schema_and_html(tmp_path):
    j, h = tmp_path / "s.json", tmp_path / "s.html"
    r = CliRunner().invoke(main, ["sensitivity", "--engine", "reference", "--case", "tiny", "--faults",
                                  "window-off-by-one", "--steps", "1", "--quiet", "--json", str(j), "--html", str(h)])
    assert r.exit_code == 0, r.output
    assert "window-off-by-one" in r.output and "honest max err/tol" in r.output
    doc = json.loads(j.read_text())
    assert {"engine", "case", "precision", "families", "honest_max_ratio", "honest", "seconds"} <= set(doc)
    assert (doc["engine"], doc["case"], doc["precision"]) == ("reference", "tiny", "float32")
    (fam,) = doc["families"]
    assert {"family", "point", "mde_noise_units", "detected_at", "localized", "flagged_at", "effect", "noise", "knob",
            "note"} <= set(fam)
    # one step: m = 1 detected, m = sqrt(1e-4 x 1) = 0.01 touches no row past the window
    assert fam["family"] == "window-off-by-one" and fam["localized"] is True
    assert (fam["detected_at"], fam["undetected_at"]) == (1.0, 0.01) and fam["mde_noise_units"] > 1
    assert fam["knob"] == get_fault("window-off-by-one").knob
    assert all({"variant", "worst_ratio", "worst_point"} <= set(x) for x in doc["honest"])
    assert doc["honest_max_ratio"] < 1
    page = h.read_text()
    assert page.count("<svg") == 1 and "m*=1<" in page and "window-off-by-one" in page


@pytest.mark.parametrize("args, msg", [
    (["--case", "nope"], "unknown case"),
    (["--faults", "nope"], "unknown fault"),
    (["--dtype", "float16"], "unknown precision"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--engine", "nope"], "unknown engine"),
])
def test_cli_bad_input_exit_2(args, msg):
    base = {"--engine": "reference", "--case": "tiny", "--faults": "window-off-by-one"}
    base.update(dict(zip(args[::2], args[1::2])))
    r = CliRunner().invoke(main, ["sensitivity", *[x for kv in base.items() for x in kv], "--quiet"])
    assert r.exit_code == 2 and msg in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
