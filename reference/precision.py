"""Where the reference rounds (docs/v4-spec.md §2, §3, §10.25).

The official demo stores activations in bf16 and does a fixed set of things in fp32 (mHC,
router, compressor, softmaxes, LM head). The reference keeps that placement and lets both
widths be chosen:

* ``float64``: every step in float64 (the golden truth),
* ``float32``: every step in float32,
* ``bfloat16``: activations in bf16, the demo's fp32 places in fp32 (demo-faithful placement,
  weights dequantised, no activation quantisation unless the QAT sims are enabled),
* ``fp8-serving``: ``bfloat16`` plus what an FP8 serving engine stores in FP8: the KV cache's
  non-RoPE part (e4m3, one power-of-two scale per 64 values; RoPE dims stay bf16), the
  compressed entries the same way, and the lightning indexer's queries and keys (e4m3, one
  scale per 128-dim vector). Weights are FP8 in such an engine too, but the cases that declare
  it are FP8-exact, so that part adds nothing.
* ``ggml-float32``: ``float32`` computed the way ggml's CPU kernels compute it (llama.cpp with F32
  weights, an F32 KV cache and flash attention off): RoPE angles by repeated fp32 products
  (``rope_iterated``) and the mHC mix normalized first and summed in 8 sequential fp32 lanes
  (``hc_mix_lanes=8``). Every rounding is fp32 as in ``float32``; only the places differ, so its
  noise is measured on these placements (an engine-matched profile: the generic ``float32``
  tolerances stay those of a blocked-GEMM engine).
* ``ggml-bf16`` / ``ggml-q8_0``: ``ggml-float32`` with the activations converted where ggml
  converts them for a quantized weight's dot product (its `vec_dot_type`): to bfloat16 before
  every BF16 matrix, and to Q8_0 blocks (`quant.q8_0_sim`) before every Q8_0 one (the FP8-class
  linears and the routed experts of a Q8_0 GGUF; its router, compressor, indexer weights and
  head stay BF16). The weights are the GGUF's own values (a case variant, `weights.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .policy import Policy, demo_policy, ported_policy

_NAMES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "fp8-serving": torch.bfloat16, "ggml-float32": torch.float32, "ggml-bf16": torch.float32,
          "ggml-q8_0": torch.float32}
# profiles whose own placement differs from the demo's: what ggml does (llama.cpp; docs/engines.md):
# (rope_iterated, hc_mix_lanes, the FP8-class linears' input rounding, the BF16-class ones')
_GGML = (True, 8)
_PLACEMENT = {"ggml-float32": (*_GGML, None, None), "ggml-bf16": (*_GGML, "bf16", "bf16"),
              "ggml-q8_0": (*_GGML, "q8_0", "bf16")}
ALIASES = {"fp64": "float64", "fp32": "float32", "bf16": "bfloat16", "double": "float64", "float": "float32"}
SERVING = {"fp8-serving"}  # precisions that quantise the KV cache and the indexer to FP8


@dataclass(frozen=True)
class Precision:
    """`alt_placement` and `split_k` describe *other honest implementations* at the same
    precision (used to measure the noise an honest engine makes, never for the golden):

    * alt_placement: round where transformers-style ports round (`policy.ported_policy`);
    * split_k: every Linear sums its reduction in `split_k` partial products (another
      reduction order, as split-K GEMM kernels do);
    * rope_iterated: RoPE angles formed by repeated fp32 products (`primitives.rope_angles`),
      as ggml forms them (llama.cpp), instead of the demo's one product p * omega;
    * hc_mix_lanes: the mHC mix normalizes first and sums each long (n*D) dot product in that
      many sequential lanes (`mhc._mix_logits`), as ggml's F32 mul_mat does (llama.cpp).

    `policy` (derived) is what the primitives read: the dtype of every rounding place.
    """
    name: str
    act: torch.dtype  # storage dtype of activations between ops
    acc: torch.dtype  # dtype of the demo's "fp32" computations
    alt_placement: bool = False
    split_k: int = 1
    rope_iterated: bool = False
    hc_mix_lanes: int = 0
    fp8_linear_in: str | None = None
    bf16_linear_in: str | None = None
    policy: Policy = field(init=False, repr=False, compare=False)  # what the primitives read

    def __post_init__(self):
        make = ported_policy if self.alt_placement else demo_policy
        pol = make(self.act, self.acc, max(1, int(self.split_k)))
        if self.rope_iterated or self.hc_mix_lanes or self.fp8_linear_in or self.bf16_linear_in:
            # the router, LM head and compressor GEMMs hold BF16-class weights
            b = self.bf16_linear_in
            pol = replace(pol, rope_iterated=self.rope_iterated, hc_mix_lanes=int(self.hc_mix_lanes),
                          fp8_linear_in=self.fp8_linear_in, bf16_linear_in=b, router=replace(pol.router, round_in=b),
                          head=replace(pol.head, round_in=b), compressor=replace(pol.compressor, round_in=b))
        object.__setattr__(self, "policy", pol)

    @property
    def fp8_cache(self) -> bool:
        """KV cache, compressed entries and indexer in FP8 (the ``fp8-serving`` profile)."""
        return self.name in SERVING

    @classmethod
    def of(cls, name: "str | Precision") -> "Precision":
        if isinstance(name, Precision):
            return name
        key = ALIASES.get(str(name), str(name))
        if key not in _NAMES:
            raise ValueError(f"unknown precision {name!r}; choose one of {sorted(_NAMES)}")
        act = _NAMES[key]
        acc = torch.float64 if act == torch.float64 else torch.float32
        return cls(key, act, acc, False, 1, *_PLACEMENT.get(key, (False, 0, None, None)))

    def variant(self, alt_placement: bool = False, split_k: int = 1) -> "Precision":
        """Another honest implementation at this precision; a profile's own placement (RoPE,
        mHC mix, matmul input rounding) is kept."""
        return replace(self, alt_placement=alt_placement, split_k=split_k)

    @property
    def label(self) -> str:
        extra = (["alt-placement"] if self.alt_placement else []) + ([f"split-k{self.split_k}"] if self.split_k > 1 else [])
        return self.name + (f" ({', '.join(extra)})" if extra else "")


def dtype_by_name(name: str) -> torch.dtype:
    return Precision.of(name).act
