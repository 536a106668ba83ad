"""`make bench`: speed and memory of corruptcheck beside its peers, measured in one run on this
machine. Numbers only, no assertions (goals live here, not in tests):

- differ: GB/s against memcpy, a naive float64 norm, torch.testing.assert_close and Polygraphy's
  CompareFunc.simple (optional: `pip install polygraphy`) on the same tensors;
- reference: fp32 wall time against transformers on every case;
- compare: one compare's wall time split into engine / reference / noise / diff / localization
  (with a real engine's start and run time where one is installed), the peak RSS of a dump
  compare against its largest tensor, one teacher-forced layer at V4-Pro width.
"""
from __future__ import annotations

import argparse
import importlib.util
import platform

import torch

from bench import compare_bench, differ_bench, reference_bench

SECTIONS = ("differ", "reference", "compare")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    ap.add_argument("--cases", default=",".join(reference_bench.DEFAULT_CASES), help="cases for the reference section")
    ap.add_argument("--fp64", action="store_true", help="reference section: also the float64 forward (memory-heavy)")
    ap.add_argument("--megabytes", type=int, default=256, help="size of the differ's engine tensor")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="auto", help="real engines for the compare split (auto: vllm if installed; none)")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    print(f"corruptcheck bench · torch {torch.__version__} · {torch.get_num_threads()} threads · "
          f"{platform.processor() or platform.machine()}")
    if "differ" in sections:
        differ_bench.report(args.megabytes, args.repeat)
    if "reference" in sections:
        reference_bench.report(args.cases.split(","), max(1, args.repeat - 1), args.fp64)
    if "compare" in sections:
        if args.engines == "auto":
            engines = ["vllm"] if importlib.util.find_spec("vllm") else []
        else:
            engines = [e for e in args.engines.split(",") if e and e != "none"]
        compare_bench.report(engines)


if __name__ == "__main__":
    main()
