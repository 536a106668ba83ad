"""The reference against transformers' DeepseekV4ForCausalLM on every case, fp32, same run.
transformers has no MTP block (it drops `mtp.*` weights on load), so the like-for-like column
runs the reference without it; the reference's full forward (with MTP) is shown beside it."""
from __future__ import annotations

import torch

from bench.common import best_of
from corruptcheck.cases import CASES, get_case
from corruptcheck.reference import run


def report(cases: list[str], repeat: int = 2, fp64: bool = False) -> None:
    """fp64: also time the float64 forward (a float64 copy of the weights: ~15 GB for pro-engine)."""
    print(f"\n== reference vs transformers {_hf_version()} (fp32, best of {repeat}, {torch.get_num_threads()} threads)")
    print(f"  {'case':13s} {'tokens':>6s} {'experts':>7s} {'ref fp32':>9s} {'hf fp32':>8s} {'hf/ref':>7s} "
          f"{'ref+MTP':>8s} {'ref fp64':>9s}")
    for name in cases:
        case = get_case(name)
        cfg, params, seqs = case.config, case.params(), case.sequences()
        ref32 = best_of(lambda: run(cfg, params, seqs, "float32", mtp=False), repeat)
        ref_mtp = best_of(lambda: run(cfg, params, seqs, "float32"), 1)
        hf = _hf_time(case, repeat)
        ref64 = best_of(lambda: run(cfg, params, seqs, "float64", mtp=False), 1) if fp64 else float("nan")
        ratio = f"{hf / ref32:7.2f}" if hf == hf else "    n/a"
        print(f"  {name:13s} {case.num_tokens:6d} {cfg.n_routed_experts:4d}/{cfg.experts_per_tok:<2d} {ref32:9.3f} "
              f"{hf:8.3f} {ratio} {ref_mtp:8.3f} {ref64:9.3f}", flush=True)
        del params


def _hf_version() -> str:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return "(not installed)"


def _hf_time(case, repeat: int) -> float:
    try:
        from corruptcheck.engines.hf import run_hf
        from corruptcheck.engines.hf_model import build_model
    except ImportError:
        return float("nan")
    model = build_model(case, "float32")
    t = best_of(lambda: run_hf(case, "float32", model=model), repeat)
    del model
    return t


# pro-engine is left out by default: its weights (5.1 GB fp32) with the reference's recorded points
# of 2112 tokens, and transformers' copy of the weights beside them, exceed a 24 GB machine; the
# release-format cases are `corruptcheck check`'s (their whole forward is what check avoids)
DEFAULT_CASES = [name for name, c in CASES.items() if name != "pro-engine" and c.golden]
