"""Shape sweep (docs/faults.md): the same architecture at several hidden sizes, compared at each.

A kernel guard that holds for some widths only (V4-01: the fused mHC kernel compiled for 4096
and run at 7168) passes every test at the widths someone thought of. The sweep builds the
`pro-slice` architecture (2 layers: HCA m=128 then CSA with the indexer, real head_dim 512,
rope 64, window 128, hc_mult 4, one hash-routed layer) at each requested hidden size, with the
other widths narrowed and the MTP block left out (transformers has none; its two hidden x
hidden projections would double the cost), so one size runs in well under a minute on two
cores, and compares the engine at each. No golden exists for these cases: the reference is computed and the noise
model measured on the fly for the requested precision only.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from corruptcheck.cases import PRO_SLICE, Case
from corruptcheck.compare import compare
from corruptcheck.engines import get_engine
from corruptcheck.errors import BadInput
from corruptcheck.faults import Fault, FaultyEngine
from corruptcheck.verdicts import Verdict

SWEEP_SEED = 20260427
SWEEP_TOKENS = 160  # > window (128); 40 CSA entries > index_topk (16): the indexer prunes; 1 HCA entry
DEFAULT_HIDDEN = (4096, 5120, 6144, 7168)
MIN_HIDDEN = 64


def sweep_case(hidden: int, tokens: int = SWEEP_TOKENS) -> Case:
    """pro-slice's architecture at `hidden`; heads, ranks, experts and vocabulary narrowed
    (the same at every size, so the hidden size is the only thing that changes)."""
    if hidden < MIN_HIDDEN or hidden % 2:
        raise BadInput(f"hidden size {hidden} is not usable: give an even size >= {MIN_HIDDEN}")
    cfg = PRO_SLICE.config.replace(
        name=f"sweep-h{hidden}", hidden_size=hidden, vocab_size=512, num_heads=8, q_lora_rank=256,
        o_lora_rank=256, moe_inter_dim=64, index_n_heads=8, num_mtp_layers=0)
    return Case(f"sweep-h{hidden}", f"pro-slice architecture at hidden {hidden} (narrowed heads/ranks/experts), "
                                    f"{tokens} tokens", cfg, SWEEP_SEED, (tokens,))


def parse_hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise BadInput(f"--hidden takes comma-separated integers, got {text!r}") from None
    if not sizes:
        raise BadInput("--hidden needs at least one size")
    return sizes


@dataclass
class SweepRow:
    hidden: int
    verdict: Verdict
    first: str | None
    culprit: str | None
    culprit_local_ratio: float | None
    worst: str | None
    worst_ratio: float | None
    fault_fired: int | None
    fault_where: str | None
    seconds: float

    def line(self, fault: Fault | None) -> str:
        head = f"hidden {self.hidden:>6}  {self.verdict.upper() if self.verdict == Verdict.FAIL else self.verdict:<5}"
        if self.verdict == Verdict.FAIL:
            loc = f" (local err/tol {self.culprit_local_ratio:.3g})" if self.culprit_local_ratio is not None else ""
            body = f"first divergence {self.first}, culprit {self.culprit or 'not localized'}{loc}"
        else:
            body = f"worst err/tol {self.worst_ratio:.3g} at {self.worst}" if self.worst else "nothing compared"
        tail = ""
        if fault is not None:
            tail = (f"  [{fault.name}: fired at {self.fault_where}]" if self.fault_fired
                    else f"  [{fault.name}: not triggered]")
        return f"{head}  {body}{tail}  ({self.seconds:.1f} s)"


def run_size(hidden: int, engine: str, fault: Fault | None = None, precision: str = "float32",
             tokens: int = SWEEP_TOKENS) -> SweepRow:
    case = sweep_case(hidden, tokens)
    eng = get_engine(engine)
    if fault is not None:
        eng = FaultyEngine(eng, fault)
    t0 = time.perf_counter()
    rep = compare(case, engine, precision, engine=eng).report
    ranked = [p for p in rep.points if p.ratio is not None]
    worst = max(ranked, key=lambda p: p.ratio, default=None)
    state = getattr(eng, "state", None)
    return SweepRow(
        hidden=hidden, verdict=rep.verdict, first=rep.first_divergence["name"] if rep.first_divergence else None,
        culprit=rep.culprit.name if rep.culprit else None,
        culprit_local_ratio=rep.culprit.local_ratio if rep.culprit else None,
        worst=worst.name if worst else None, worst_ratio=worst.ratio if worst else None,
        fault_fired=state.fired if state else None, fault_where=state.where if state else None,
        seconds=time.perf_counter() - t0)


def run_sweep(engine: str, hiddens=DEFAULT_HIDDEN, fault: Fault | None = None, precision: str = "float32",
              tokens: int = SWEEP_TOKENS, progress=None) -> list[SweepRow]:
    for h in hiddens:
        sweep_case(h, tokens)  # validate every size before the first (slow) run
    rows = []
    for h in hiddens:
        row = run_size(h, engine, fault, precision, tokens)
        rows.append(row)
        if progress:
            progress(row)
    return rows


def to_json(rows, engine: str, fault: Fault | None, precision: str) -> dict:
    verdicts = {r.verdict for r in rows}
    verdict = (Verdict.FAIL if Verdict.FAIL in verdicts else
               Verdict.ERROR if verdicts - {Verdict.PASS} else Verdict.PASS)
    return {"engine": engine, "fault": fault.name if fault else None, "precision": precision, "verdict": verdict,
            "sizes": [asdict(r) for r in rows]}
