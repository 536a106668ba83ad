"""Engines with a deliberate fault, named by import path in tests (`fault_engines:Class`,
with this directory on PYTHONPATH), and the patch they apply. The "scale layer 1 attention"
engine is written here once: tests/test_api.py, test_gate.py, test_localize.py and
test_pytest_plugin.py use it (subclasses change the factor, the name or drop points)."""
from corruptcheck.engines.hf import OutputPatch
from corruptcheck.engines.hf_engine import HFEngine


def scale_attn_out(layer: int, factor: float) -> OutputPatch:
    """transformers' layers.<layer>.attn.out (self_attn's first output) multiplied by `factor`."""
    return OutputPatch(f"model.layers.{layer}.self_attn", lambda t: t * factor, index=0,
                       label=f"scale layers.{layer}.attn.out by {factor}")


class ScaledAttentionHF(HFEngine):
    """transformers with layers.1's attention output scaled by 1.05 (a wrong softmax / output
    scale in one layer); `drop` names points removed from the capture (an engine that does not
    expose them)."""
    name = "hf-scaled-attn"
    layer, factor = 1, 1.05
    drop: tuple = ()

    def run(self, case, precision, **options):
        options = {k: v for k, v in options.items() if k != "patches"}
        cap = super().run(case, precision, patches=[scale_attn_out(self.layer, self.factor)], **options)
        for name in self.drop:
            del cap.points[name]
        return cap
