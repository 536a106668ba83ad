"""Which precision profile a llama.cpp run declares (docs/engines.md, "llama.cpp", Precision).

Read from llama-cpp-python 0.3.36's vendored llama.cpp and measured (docs/engines.md):

* F32 weights: `ggml_compute_forward_mul_mat` converts the activations to the weight type's
  `vec_dot_type`, F32 for F32, and sums in F32 (SIMD partial sums or llamafile's tinyBLAS: other
  reduction orders, which the float32 profile's split-K variants stand for). Norms, softmax,
  sigmoid / softplus, Sinkhorn, top-k, the lightning indexer: F32.
* RoPE: ggml forms the angle of pair k by k repeated F32 products (`ggml_rope_cache_init`,
  `theta *= theta_scale`), not the demo's one product p * omega: another fp32 placement, which
  the `ggml-float32` profile models (reference/precision.py), as it does ggml's mHC mix.
* the KV cache: `type_k` (= `type_v` for deepseek4) holds the raw sliding-window rows, the CSA /
  HCA compressed entries and the indexer keys (`llama_kv_cache_dsv4`); F32 stores them exactly;
  the compressor state is always F32.
* flash attention: `llm_graph_context::build_attn_mha` casts F32 K and V to F16 before
  `ggml_flash_attn_ext`, whatever the cache type; deepseek4 also rotates the raw-cache keys with
  a 128x128 Hadamard matrix (`attn_rot_k`, forced on when the head size equals the indexer's),
  so the F16 rounding lands in that basis. With flash attention on, the attention is therefore
  F16 in K/V even with an F32 cache (measured: attn.core 2.4e-4 against 1.2e-6 with it off).
  `flash_attn="auto"` resolves to on for the CPU; the worker reports what the graph really ran.

A run whose every rounding is float32 (F32 weights, F32 cache, flash attention off) declares
``ggml-float32``: float32 with ggml's RoPE angles and its mHC mix in 8 sequential F32 lanes, its
noise measured on those placements (the generic ``float32`` tolerances stay a blocked-GEMM
engine's). BF16 weights declare ``ggml-bf16`` (each BF16 matrix's input rounded to bf16, ggml's
BF16 `vec_dot_type`), Q8_0 weights ``ggml-q8_0`` (each Q8_0 matrix's input quantized to Q8_0
blocks, the BF16 ones' to bf16); MXFP4 experts (Q8_0 for the other FP8 linears) ``ggml-q8_0``
too: MXFP4's `vec_dot_type` is Q8_0 (`ggml_vec_dot_mxfp4_q8_0`: exact integer block dots of the
e2m1 codes with the Q8_0 input, scaled by fp16(d) x the E8M0 power of two, summed in F32), so
its inputs round exactly as a Q8_0 matrix's do; all with an F32 cache and flash attention off; other runs declare a profile that names what they round, judged only where the
reference models it (reference/precision.py; none of these is modelled yet: such a compare
stops with the unknown precision, exit 2, instead of judging against a wrong tolerance).
"""
from __future__ import annotations


def profile_name(weights: str, kv_type: str, flash_attn_resolved: str) -> str:
    """`flash_attn_resolved`: "on" / "off", what llama.cpp's graph ran (not the request)."""
    modelled = {"f32": "ggml-float32", "bf16": "ggml-bf16", "q8_0": "ggml-q8_0", "mxfp4": "ggml-q8_0"}
    if weights in modelled and kv_type == "f32" and flash_attn_resolved == "off":
        return modelled[weights]
    return f"llamacpp-{weights}-kv{kv_type}" + ("-fa16" if flash_attn_resolved == "on" else "")
