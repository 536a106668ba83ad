"""The reference itself as an engine (at any precision): the honest-implementation baseline."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, boolean
from corruptcheck.reference import REFERENCE_VERSION, run


class ReferenceEngine(Engine):
    name = "reference"
    options = (Option("sims", boolean, "simulate the release's QAT rounding (FP8 / FP4 weights)"),)

    def run(self, case: Case, precision: str, sims: bool = False, **_options) -> Capture:
        res = run(case.config, case.params(), case.sequences(), precision, sims=sims)
        return Capture(res.points, self.name, res.precision,
                       {"version": REFERENCE_VERSION, "qat_sims": sims})
