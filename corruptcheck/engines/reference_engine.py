"""The reference itself as an engine (at any precision): the honest-implementation baseline.
Served (a schedule), it runs its own incremental path (`reference/decode.py`): chunked prefill
and greedy decode with carried KV / compressor / indexer state."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, boolean
from corruptcheck.reference import REFERENCE_VERSION, Precision, run
from corruptcheck.reference.decode import serve


class ReferenceEngine(Engine):
    name = "reference"
    options = (Option("sims", boolean, "simulate the release's QAT rounding (FP8 / FP4 weights)"),)
    serves = True

    def run(self, case: Case, precision: str, sims: bool = False, schedule=None, **_options) -> Capture:
        meta = {"version": REFERENCE_VERSION, "qat_sims": sims}
        if schedule is None:
            res = run(case.config, case.params(), case.sequences(), precision, sims=sims)
            return Capture(res.points, self.name, res.precision, meta)
        from corruptcheck.reference.model import _concat
        from corruptcheck.schedule import row_labels

        per_seq, sequences = [], []
        for prompt in case.sequences():  # the schedule's prompts (compare passes the prompt case)
            points, fed = serve(case.config, case.params(), prompt, schedule.prefill_chunks(len(prompt)),
                                schedule.decode_steps, precision, sims=sims)
            per_seq.append(points)
            sequences.append(fed)
        points = {n: _concat([s[n] for s in per_seq if n in s]) for n in per_seq[0]}
        meta["served"] = {"sequences": sequences, "rows": row_labels(schedule, [len(s) for s in sequences]),
                          "batching": "one sequence at a time (the reference's incremental path)"}
        return Capture(points, self.name, Precision.of(precision).name, meta)
