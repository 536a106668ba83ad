"""The `trtllm` engine: TensorRT-LLM's PyTorch-backend DeepseekV4ForCausalLM run in-process,
captured with module hooks and method wrappers.

Capture (tested here on tests/engine_trees.py): `capture_taps()` maps the canonical points to
NVIDIA/TensorRT-LLM `tensorrt_llm/_torch/models/modeling_deepseekv4.py` @ 02586bf0 and
`_torch/modules/mhc/hyper_connection.py` (docs/engine-capture.md §3, §6). The layers thread an
`HCState` through the model: with fused HC (the default) every layer but the last defers its
FFN mHC post-mapping, and the next layer absorbs it in `hc_attn.fused_hc`, which also applies
`input_layernorm` inside the kernel. So:

* layer i's output (deferred) = output 0 of layer i+1's `hc_attn.fused_hc`; a resolved
  post-mapping (the last layer; every layer with TRTLLM_MHC_ENABLE_FUSED_HC=0) is the return
  of that layer's `hc_ffn.post_mapping`;
* on the fused path `attn_hc.collapsed` is not exposed (fused_hc returns the normed input);
* under PRE_MOE_FUSION (TP > 1, eager fusion not disabled) the attention all-reduce is fused
  with `post_attention_layernorm`: `self_attn` returns a per-rank partial sum (summed when
  ranks are merged) and `post_attention_layernorm` is not called.
`mHC` has no forward: `pre_mapping`, `fused_hc`, `post_mapping` are wrapped as methods.

Launch (GPU only; docs/engines.md says what is verified where):
TLLM_WORKER_USE_SINGLE_PROCESS=1 (executor in this process), `LLM(..., cuda_graph_config=None,
tensor_parallel_size=1)`, `return_context_logits=True` so hc_head / norm / lm_head run on every
token (otherwise only on each sequence's last one), model at
`llm._executor.engine.model_engine.model` ([verify] per release). TRT-LLM's V4 attention
asserts kv_lora_rank == 448 (head_dim 512, rope 64): run the flash-slice / pro-slice cases.
"""
from __future__ import annotations

import os
import tempfile

import torch

from corruptcheck.cases import Case
from corruptcheck.engines.options import Option, boolean, fraction, one_of
from corruptcheck.engines.canonical import capture_points_from
from corruptcheck.engines.checkpoint import write_checkpoint
from corruptcheck.engines.gpu_launch import GPUEngine
from corruptcheck.engines.recorder import HookRecorder
from corruptcheck.engines.taps import Tap, TokenSource
from corruptcheck.reference import ModelConfig

L = "model.layers.{i}"
# DeepseekV4ForCausalLM.forward(attn_metadata, input_ids, position_ids, ...)
TOKENS = TokenSource(ids="in[input_ids|1]", pos="in[position_ids|2]")


def _resolved_state(call) -> bool:
    """hc_state entering a layer > 0 is an HCState; resolved ones carry the full stream."""
    state = call.arg("hc_state", 1)
    return state is not None and not getattr(state, "is_deferred", True)


def _routing_ids_first(call) -> bool:
    out = call.out
    return (isinstance(out, (tuple, list)) and len(out) >= 2 and isinstance(out[0], torch.Tensor)
            and not out[0].is_floating_point())


HC_ATTN, HC_FFN = f"{L}.hc_attn", f"{L}.hc_ffn"


def capture_taps(cfg: ModelConfig, tp_size: int = 1, pre_moe_fusion: bool = True) -> list[Tap]:
    """Canonical point -> TRT-LLM module / method (docs/engine-capture.md §3.1, §6)."""
    attn_merge = "sum" if (tp_size > 1 and pre_moe_fusion) else "replicated"
    return ([Tap("model.embed_tokens", "embed", "out")] + _attention_hc_taps() + _attention_taps(attn_merge)
            + _ffn_hc_taps() + _moe_taps() + _output_taps())


def _attention_hc_taps() -> list[Tap]:
    """A layer's entry: the attention mHC pre-mapping, unfused or fused with the previous
    layer's deferred FFN post-mapping (which then yields that layer's output)."""
    return [
        # layer(position_ids=, hc_state=, attn_metadata=, ...): a tensor on layer 0 ...
        Tap(L, "layers.{i}.attn_hc.in", "in[hc_state|1]", layers="first"),
        # ... a resolved HCState on later layers when the previous layer did not defer
        Tap(L, "layers.{i}.attn_hc.in", "in[hc_state|1].residual", layers="rest", when=_resolved_state),
        # unfused entry: pre_mapping(residual) -> (post_mix [T,hc,1], comb_mix, layer_input)
        Tap(HC_ATTN, "layers.{i}.attn_hc.post", "out[0]", method="pre_mapping"),
        Tap(HC_ATTN, "layers.{i}.attn_hc.comb", "out[1]", method="pre_mapping"),
        Tap(HC_ATTN, "layers.{i}.attn_hc.collapsed", "out[2]", method="pre_mapping"),
        Tap(f"{L}.input_layernorm", "layers.{i}.attn_norm", "out"),
        # fused entry: fused_hc(x_prev, residual_prev, post_mix_prev, comb_mix_prev,
        #   norm_weight=input_layernorm.weight) -> (residual, post_mix, comb_mix, normed input)
        Tap(HC_ATTN, "layers.{prev}.out", "out[0]", method="fused_hc", layers="rest"),
        Tap(HC_ATTN, "layers.{i}.attn_hc.in", "out[0]", method="fused_hc", layers="rest"),
        Tap(HC_ATTN, "layers.{i}.attn_hc.post", "out[1]", method="fused_hc", layers="rest"),
        Tap(HC_ATTN, "layers.{i}.attn_hc.comb", "out[2]", method="fused_hc", layers="rest"),
        Tap(HC_ATTN, "layers.{i}.attn_norm", "out[3]", method="fused_hc", layers="rest"),
    ]


def _attention_taps(attn_merge: str) -> list[Tap]:
    return [
        # self_attn(position_ids=, hidden_states=, attn_metadata=, all_reduce_params=)
        Tap(f"{L}.self_attn", "layers.{i}.attn.out", "out", merge=attn_merge),
        # DeepseekV4Indexer.forward returns topk_indices ([verify] local vs paged indices)
        Tap(f"{L}.self_attn.mqa.indexer", "layers.{i}.attn.indexer_topk", "out"),
    ]


def _ffn_hc_taps() -> list[Tap]:
    return [
        # mid-layer, fused: hc_ffn.fused_hc(...) without a norm -> (residual, post, comb, input)
        Tap(HC_FFN, "layers.{i}.ffn_hc.in", "out[0]", method="fused_hc"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.post", "out[1]", method="fused_hc"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.comb", "out[2]", method="fused_hc"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.collapsed", "out[3]", method="fused_hc"),
        # mid-layer, unfused: hc_attn.post_mapping(...) then hc_ffn.pre_mapping(residual)
        Tap(HC_FFN, "layers.{i}.ffn_hc.in", "in[residual|0]", method="pre_mapping"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.post", "out[0]", method="pre_mapping"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.comb", "out[1]", method="pre_mapping"),
        Tap(HC_FFN, "layers.{i}.ffn_hc.collapsed", "out[2]", method="pre_mapping"),
    ]


def _moe_taps() -> list[Tap]:
    return [
        # not called under PRE_MOE_FUSION (all-reduce + RMSNorm fused)
        Tap(f"{L}.post_attention_layernorm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.router_logits", "out"),
        # routing runs inside `experts` through the gate's routing method object; its apply()
        # returns (topk ids, topk weights) where it is called ([verify]: fused routing kernels
        # may bypass it, then these never fire)
        Tap(f"{L}.mlp.gate._routing_method", "layers.{i}.moe.experts", "out[0]", method="apply",
            when=_routing_ids_first),
        Tap(f"{L}.mlp.gate._routing_method", "layers.{i}.moe.weights", "out[1]", method="apply",
            when=_routing_ids_first),
        # DeepseekV4MoE.forward: shared + routed, all-reduced when TP > 1 (no attention DP)
        Tap(f"{L}.mlp", "layers.{i}.moe.out", "out"),
    ]


def _output_taps() -> list[Tap]:
    """The resolved last-layer output and the head."""
    return [
        # resolved FFN post-mapping (the last layer; every layer when fused HC is off)
        Tap(HC_FFN, "layers.{i}.out", "out", method="post_mapping"),
        # DeepseekV4LogitsProcessor borrows model.hc_head / model.norm; all rows only with
        # return_context_logits=True
        Tap("model.hc_head", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
        Tap("lm_head", "logits", "out"),
    ]


class TRTLLMEngine(GPUEngine):
    name = "trtllm"
    extra = "trtllm"
    options = (
        Option("weight_format", one_of("bf16", "fp8"), "checkpoint weights written for the engine"),
        Option("fused_hc", boolean, "TensorRT-LLM's fused mHC kernel (TRTLLM_MHC_ENABLE_FUSED_HC)"),
        Option("free_gpu_memory_fraction", fraction, "KV cache share of free GPU memory"),
    )
    package = "tensorrt_llm"

    def launch(self, case: Case, weight_format: str = "bf16", fused_hc: bool = True,
               free_gpu_memory_fraction: float = 0.5, **_options) -> tuple[dict, dict]:
        return launch(case, weight_format, fused_hc, free_gpu_memory_fraction)


def launch(case: Case, weight_format: str, fused_hc: bool, free_gpu_memory_fraction: float):
    """GPU only; unverified. Settings from docs/engine-capture.md §3.2, §8."""
    os.environ["TLLM_WORKER_USE_SINGLE_PROCESS"] = "1"
    os.environ["TRTLLM_MHC_ENABLE_FUSED_HC"] = "1" if fused_hc else "0"
    import tensorrt_llm
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    cfg, seqs = case.config, case.sequences()
    with tempfile.TemporaryDirectory(prefix="corruptcheck-trtllm-") as tmp:
        ckpt = write_checkpoint(case, tmp, weight_format)
        llm = LLM(model=tmp, tensor_parallel_size=1, cuda_graph_config=None, skip_tokenizer_init=True,
                  disable_overlap_scheduler=True, enable_chunked_prefill=False,
                  kv_cache_config=KvCacheConfig(enable_block_reuse=False,
                                                free_gpu_memory_fraction=free_gpu_memory_fraction))
        model = llm._executor.engine.model_engine.model  # [verify] per release
        recorder = HookRecorder(capture_taps(cfg), TOKENS, cfg.num_layers)
        with recorder.attached(model):
            llm.generate([s.tolist() for s in seqs], SamplingParams(max_tokens=1, return_context_logits=True))
        llm.shutdown()
    points, meta = capture_points_from([recorder], cfg, seqs)
    meta.update({"version": tensorrt_llm.__version__, "checkpoint": {k: v for k, v in ckpt.items() if k != "path"},
                 "settings": {"TLLM_WORKER_USE_SINGLE_PROCESS": "1", "TRTLLM_MHC_ENABLE_FUSED_HC": int(fused_hc),
                              "cuda_graph_config": None, "tensor_parallel_size": 1,
                              "return_context_logits": True},
                 "verified_on_gpu": False})
    return points, meta
