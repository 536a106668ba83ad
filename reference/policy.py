"""Rounding policy: where one honest implementation rounds, read by the primitives.

The equations (attention, MoE, mHC, compressor) never branch on a precision variant: each
place that honest implementations round differently reads its dtype (or GEMM placement) from
the run's `Policy`. Two policies exist, both declarative tables below:

* `demo_policy`: the official demo's placement (the golden and every default run);
* `ported_policy`: where transformers-style ports round (`Precision.alt_placement`), used
  only to measure the noise an honest engine makes (noise.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Gemm:
    """How one projection computes: inputs cast to `dtype`, the reduction summed in
    `split_k` partial products (1 = one GEMM)."""
    dtype: torch.dtype
    split_k: int = 1
    round_in: str | None = None  # the input rounded before the dot products (quant.round_input)


@dataclass(frozen=True)
class Policy:
    act: torch.dtype  # activations between ops
    acc: torch.dtype  # the demo's "fp32" places
    split_k: int  # every Linear of activations sums its reduction in split_k partial products
    router: Gemm  # router logits (and scores)
    head: Gemm  # LM head logits
    compressor: Gemm  # compressor wkv / wgate projections
    rope_table: torch.dtype | None  # cos/sin rounded to this dtype (None: exact in acc)
    q_norm: torch.dtype  # mean of squares of the per-head unit q norm
    attn_scores: torch.dtype  # attention q.k before the (acc) softmax
    index_scores: torch.dtype  # indexer sum_h w * relu(q.k)
    hc_post: torch.dtype  # post / comb coefficients of the mHC merge
    swiglu: torch.dtype  # SwiGLU hidden of every expert
    moe_sum: torch.dtype  # routed + shared expert outputs accumulate in
    weight_after_w2: bool  # routing weight applied after w2 (act) instead of before (swiglu dtype)
    rope_iterated: bool = False  # RoPE angles by repeated fp32 products (ggml), not p * omega
    hc_mix_lanes: int = 0  # mHC mix: normalize first, sum in this many sequential lanes (ggml); 0: one GEMM
    # the input of every FP8-class linear (attention projections, experts; weights.is_fp8_linear)
    # rounded before its dot products (quant.round_input: None, "bf16", "q8_0"), as ggml converts
    # activations to a quantized weight's vec_dot_type; the BF16-class ones (router, compressor,
    # indexer weights, head, MTP projections) by `bf16_linear_in`
    fp8_linear_in: str | None = None
    bf16_linear_in: str | None = None


def demo_policy(act: torch.dtype, acc: torch.dtype, split_k: int = 1) -> Policy:
    """The official demo: mHC, router, compressor, softmax, LM head in acc (docs/v4-spec.md §2, §3)."""
    return Policy(act=act, acc=acc, split_k=split_k, router=Gemm(acc), head=Gemm(acc),
                  compressor=Gemm(acc, split_k), rope_table=None, q_norm=act, attn_scores=acc,
                  index_scores=act, hc_post=acc, swiglu=acc, moe_sum=acc, weight_after_w2=False)


def ported_policy(act: torch.dtype, acc: torch.dtype, split_k: int = 1) -> Policy:
    """Transformers-style ports: router logits, compressor, mHC post mix, attention scores,
    RoPE cos/sin and LM head in the activation dtype; q norm mean in acc; SwiGLU and the
    routing weight (after w2) in act, outputs accumulated in act; indexer scores in acc."""
    return Policy(act=act, acc=acc, split_k=split_k, router=Gemm(act, split_k), head=Gemm(act, split_k),
                  compressor=Gemm(act, split_k), rope_table=act, q_norm=acc, attn_scores=act,
                  index_scores=acc, hc_post=act, swiglu=act, moe_sum=act, weight_after_w2=True)
