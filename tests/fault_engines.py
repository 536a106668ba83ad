"""Engines with a deliberate fault, named by import path in tests (`fault_engines:Class`,
with this directory on PYTHONPATH)."""
from corruptcheck.engines.hf import OutputPatch
from corruptcheck.engines.hf_engine import HFEngine


class ScaledAttentionHF(HFEngine):
    """transformers with layers.1's attention output scaled by 1.05 (a wrong softmax / output
    scale in one layer)."""
    name = "hf-scaled-attn"

    def run(self, case, precision, **options):
        patch = OutputPatch("model.layers.1.self_attn", lambda t: t * 1.05, index=0,
                            label="scale layers.1.attn.out by 1.05")
        return super().run(case, precision, patches=[patch], **{k: v for k, v in options.items() if k != "patches"})
