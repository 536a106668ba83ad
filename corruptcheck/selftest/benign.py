"""Benign variants for the self-test (docs/faults.md): honest engines that must never be
flagged — another precision, reduction order, attention algorithm or batching — and the
kernels behind them (split-K Linear, online-softmax attention)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from corruptcheck.engines.patching import patched
from corruptcheck.reference import model as r_model


@dataclass(frozen=True)
class Benign:
    name: str
    description: str
    precision: str
    engines: tuple[str, ...]
    install: Callable | None = None  # engine name -> context manager active during the run
    options: dict = field(default_factory=dict)  # extra engine options
    batch_partner: bool = False  # run each sequence in a batch next to a partner sequence


def _split_k_linear(parts: int):
    """nn.Linear.forward summing its reduction in `parts` partial products, last one first, in
    fp32 (fp64 for fp64 inputs), rounded once: another honest reduction order."""
    def forward(self, x):
        k = x.shape[-1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = self.weight.to(x.dtype)
        out = None
        for idx in reversed(torch.arange(k).tensor_split(parts)):
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            y = torch.nn.functional.linear(x[..., lo:hi].to(acc), w[:, lo:hi].to(acc))
            out = y if out is None else out + y
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)
    return forward


@contextmanager
def _split_k(engine: str):
    with patched() as p:
        if engine == "hf":
            p.set(torch.nn.Linear, "forward", _split_k_linear(4))
        else:  # the reference sums every Linear in `split_k` partial products (noise model: 2, 3)
            p.wrap(r_model, "precision_of", lambda orig: lambda prec: dataclasses.replace(orig(prec), split_k=4))
        yield


ONLINE_SOFTMAX = "corruptcheck_online_softmax"


def online_softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, block=64,
                             **kwargs):
    """Flash-style attention for transformers' DeepSeek V4: keys in blocks of `block`, a
    running max and sum (online softmax) with the per-head sink as the starting logit, in fp32.
    The same function as eager attention, another order of operations."""
    b, h, s, _ = query.shape
    q = query.float()
    m = module.sinks.float().reshape(1, h, 1, 1).expand(b, h, s, 1)
    denom = torch.ones_like(m)  # exp(sink - m) with m = sink
    acc = torch.zeros(b, h, s, value.shape[-1], dtype=torch.float32)
    for j in range(0, key.shape[2], block):
        k = key[:, :, j:j + block].float()
        logits = torch.matmul(q, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask[..., j:j + block].float()
        m_new = torch.maximum(m, logits.amax(-1, keepdim=True))
        decay = torch.exp(m - m_new)
        p = torch.exp(logits - m_new)
        denom = denom * decay + p.sum(-1, keepdim=True)
        acc = acc * decay + torch.matmul(p, value[:, :, j:j + block].float())
        m = m_new
    out = (acc / denom).to(value.dtype)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def _online_softmax(engine: str):
    """Register the attention function, and eager's additive mask for it (transformers builds
    no mask at all for an implementation its mask registry does not know)."""
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    masks = AttentionMaskInterface._global_mapping
    ALL_ATTENTION_FUNCTIONS[ONLINE_SOFTMAX] = online_softmax_attention
    masks[ONLINE_SOFTMAX] = eager_mask
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS[ONLINE_SOFTMAX]
        masks.pop(ONLINE_SOFTMAX, None)


BENIGN: dict[str, Benign] = {b.name: b for b in (
    Benign("bf16", "the engine itself at bfloat16", "bfloat16", ("hf", "reference")),
    Benign("fp32-split-k4", "float32, every Linear summed in 4 partial products, last first", "float32",
           ("hf", "reference"), install=_split_k),
    Benign("fp32-online-softmax", "float32, flash-style attention (online softmax over 64-key blocks)",
           "float32", ("hf",), install=_online_softmax, options={"attn_impl": ONLINE_SOFTMAX}),
    Benign("fp32-batch2", "float32, each sequence batched with a partner sequence (right-padded batch)",
           "float32", ("hf",), batch_partner=True, options={"batch": True}),
    Benign("float64", "transformers in float64 (judged as float32: it computes mHC/norms/RoPE in fp32)",
           "float64", ("hf",)),
)}


# vLLM: honest engine variants are engine options (VLLMEngine.run's keywords). The engine
# declares its own precision profile, so its rows run at that one precision.
VLLM_BENIGN: dict[str, Benign] = {b.name: b for b in (
    Benign("serving", "the engine itself (FP8 weights, FP8 KV cache, one prefill chunk)", "fp8-serving",
           ("vllm",)),
    Benign("chunked-1024", "chunked prefill: max_num_batched_tokens=1024 (chunks end on compressor blocks)",
           "fp8-serving", ("vllm",), options={"max_num_batched_tokens": 1024}),
    Benign("chunked-700", "chunked prefill: max_num_batched_tokens=700 (chunks cut CSA/HCA compressor blocks "
           "and the 128-token window)", "fp8-serving", ("vllm",), options={"max_num_batched_tokens": 700}),
    Benign("batch2", "each sequence prefilled in one batch next to a partner sequence of the same length",
           "fp8-serving", ("vllm",), batch_partner=True),
)}
# kv_cache_dtype="auto" (a bf16 KV cache) is no variant on vLLM's DeepSeek V4 path: it runs
# (measured), but `vllm/models/deepseek_v4/attention.py` maps "auto" to "fp8" and every fp8
# dtype to the fp8_ds_mla layout ("Using DeepSeek's fp8_ds_mla KV cache format"; bf16 raises
# "fp8_ds_mla layout only supports fp8 kv-cache"), so it computes what `serving` computes;
# chunked-700 stands in for it.
VLLM_NO_BF16_KV = ("kv_cache_dtype='auto' is mapped to fp8 / the fp8_ds_mla KV-cache layout by vLLM's DeepSeek V4 "
                   "attention (models/deepseek_v4/attention.py): no bf16 KV cache exists on this path")


# llama.cpp: honest variants are engine options (LlamaCppEngine.options): physical batch sizes
# that cut compressor blocks and the window differently, another thread count (another split of
# every reduction), a batch partner in the same ubatches (docs/engines.md "llama.cpp")
LLAMACPP_BENIGN: dict[str, Benign] = {b.name: b for b in (
    Benign("ubatch-512", "the engine itself: F32 weights, F32 KV cache, n_ubatch 512", "ggml-float32", ("llamacpp",)),
    Benign("ubatch-200", "n_ubatch 200: prefill pieces cut CSA / HCA blocks and the 128-token window", "ggml-float32",
           ("llamacpp",), options={"n_ubatch": 200}),
    Benign("ubatch-2048", "n_ubatch 2048: one ubatch per 2048 tokens", "ggml-float32", ("llamacpp",),
           options={"n_ubatch": 2048}),
    Benign("threads-1", "one CPU thread (every kernel's work split differently)", "ggml-float32", ("llamacpp",),
           options={"threads": 1}),
    Benign("batch2", "each sequence in the same ubatches as a partner sequence of the same length", "ggml-float32",
           ("llamacpp",), batch_partner=True),
)}


def benign_for(engine: str) -> dict[str, Benign]:
    if engine == "llamacpp":
        return LLAMACPP_BENIGN
    return VLLM_BENIGN if engine == "vllm" else BENIGN
