"""`make bench`: wall time of the reference and of transformers on the same case, in one run,
and their ratio. Numbers only; no assertion (speed goals live here, not in tests)."""
from __future__ import annotations

import argparse
import time

import torch

from corruptcheck.cases import get_case
from corruptcheck.reference import run


def _time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="tiny,flash-slice")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':12s} {'ref fp64 s':>11s} {'ref fp32 s':>11s} {'hf fp32 s':>10s} {'ref64/hf32':>11s}")
    for name in args.cases.split(","):
        case = get_case(name)
        case.params()
        t64 = _time(lambda: run(case.config, case.params(), case.sequences(), "float64"), args.repeat)
        t32 = _time(lambda: run(case.config, case.params(), case.sequences(), "float32"), args.repeat)
        try:
            from corruptcheck.engines.hf import build_model, run_hf

            model = build_model(case, "float32")
            thf = _time(lambda: run_hf(case, "float32", model=model), args.repeat)
        except Exception as exc:  # transformers missing: report, don't fail
            print(f"  hf unavailable: {exc}")
            thf = float("nan")
        print(f"{name:12s} {t64:11.3f} {t32:11.3f} {thf:10.3f} {t64 / thf:11.2f}")


if __name__ == "__main__":
    main()
