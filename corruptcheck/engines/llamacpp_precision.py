"""Which precision profile a llama.cpp run declares (docs/tolerances.md, "llama.cpp profiles").

Read from ggml-cpu (llama-cpp-python 0.3.36's vendored llama.cpp):

* F32 weights: `ggml_compute_forward_mul_mat` converts the activations to the weight type's
  `vec_dot_type`, F32 for F32, and sums in F32 (SIMD partial sums or llamafile's tinyBLAS: other
  reduction orders, which the float32 profile's split-K variants stand for). Norms, softmax,
  RoPE, sigmoid / softplus, Sinkhorn, top-k: F32.
* the KV cache: `type_k` (= `type_v` for deepseek4) holds the raw sliding-window rows, the CSA /
  HCA compressed entries and the indexer keys (`llama_kv_cache_dsv4`); F32 stores them exactly,
  F16 rounds them; the compressor state stays F32.

A run whose every rounding is float32 declares ``float32``; runs that round elsewhere declare a
profile that names what they do, and are judged against it only where the reference models it
(reference/precision.py).
"""
from __future__ import annotations


def profile_name(weights: str, kv_type: str, flash_attn: str) -> str:
    if weights == "f32" and kv_type == "f32":
        return "float32"
    return f"llamacpp-{weights}-kv{kv_type}"
