"""Registry entry for the transformers engine (imports transformers only when run)."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine
from corruptcheck.engines.options import Option, boolean, text


class HFEngine(Engine):
    name = "hf"
    extra = "hf"
    options = (
        Option("attn_impl", text, "transformers attention implementation (default eager)"),
        Option("batch", boolean, "run the sequences as one right-padded batch (prefill only)"),
    )

    def available(self) -> tuple[bool, str]:
        try:
            from transformers import DeepseekV4ForCausalLM  # noqa: F401
        except ImportError as exc:
            return False, f"transformers with DeepseekV4ForCausalLM is not importable ({exc})"
        return True, ""

    serves = True  # runs a Schedule: chunked prefill + greedy decode through its own cache

    def run(self, case: Case, precision: str, attn_impl: str = "eager", patches=None, batch: bool = False,
            schedule=None, **_options) -> Capture:
        import transformers

        from corruptcheck.engines.hf import run_hf, run_hf_served
        from corruptcheck.engines.hf_model import norm_returns_input_dtype

        served = None
        if schedule is not None:
            points, served = run_hf_served(case, schedule, precision, attn_impl, patches=patches)
            served["batching"] = "one sequence at a time (transformers has no continuous batching)"
        else:
            points = run_hf(case, precision, attn_impl, patches=patches, batch=batch)
        # transformers casts to fp32 inside mHC, norms and RoPE even in a float64 model, so a
        # float64 run is judged as what it is: a float32-exact engine
        effective = "float32" if precision == "float64" else precision
        return Capture(points, self.name, effective,
                       {"version": transformers.__version__, "attn_impl": attn_impl,
                        "requested_precision": precision, "batch": "right-padded" if batch else "one sequence at a time",
                        "patches": [str(p) for p in patches or ()],
                        "workarounds": [] if precision != "bfloat16" or norm_returns_input_dtype()
                        else ["bf16 norm weights (transformers < 5.24 returns fp32 from its fp32-kept norms)"],
                        **({"served": served} if served else {})})
