"""Registry entry for the transformers engine (imports transformers only when run)."""
from __future__ import annotations

from corruptcheck.cases import Case
from corruptcheck.engines.base import Capture, Engine


class HFEngine(Engine):
    name = "hf"
    extra = "hf"

    def available(self) -> tuple[bool, str]:
        try:
            from transformers import DeepseekV4ForCausalLM  # noqa: F401
        except ImportError as exc:
            return False, f"transformers with DeepseekV4ForCausalLM is not importable ({exc})"
        return True, ""

    def run(self, case: Case, precision: str, attn_impl: str = "eager", **_options) -> Capture:
        import transformers

        from corruptcheck.engines.hf import run_hf

        points = run_hf(case, precision, attn_impl)
        return Capture(points, self.name, precision,
                       {"version": transformers.__version__, "attn_impl": attn_impl})
