"""The `vllm` engine: vLLM's DeepseekV4ForCausalLM run in-process, captured with module hooks.

Capture (tested here on tests/engine_trees.py): `capture_taps()` says where each canonical point
lives in vLLM's module tree, from vllm-project/vllm `vllm/model_executor/models/deepseek_v4.py`
(version A @ 023da1fc: `ffn.norm_gate`; version B @ f1b76c19: `ffn_norm` + `ffn.gate`),
`vllm/model_executor/layers/mhc.py` @ 001a058b and `layers/deepseek_v4_attention.py`
@ 0a291a2e (engine-capture.md §1, §6). The CUDA path fuses a layer's FFN mHC post with the next
layer's attention mHC pre (`mhc_fused_post_pre`), so:

* layer i's output (i < L-1) = call 0 of layer i+1's `mhc_fused_post_pre`, output 0;
* the last layer's output = the input of the final head contraction (`model.hc_head_op`);
* the first layer runs a standalone `mhc_pre` and calls `mhc_fused_post_pre` only once.

Launch (GPU only, NOT run in this repository yet; docs/engines.md keeps the status): writes
the case as a DeepSeek-format checkpoint (FP8 linear weights: vLLM's V4 attention applies
`wo_a` as an FP8 einsum and needs an FP8 KV cache), builds `vllm.LLM` in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0, TP=1, enforce_eager=True: no torch.compile, no CUDA graphs,
both of which bypass module hooks, §1.3), installs the recorder through `LLM.apply_model`,
prefills every sequence with max_tokens=1 and removes the hooks.
"""
from __future__ import annotations

import os
import tempfile

import torch

from corruptcheck.cases import Case
from corruptcheck.engines.capture_map import (
    Recorder,
    Tap,
    TokenSource,
    capture_points_from,
    GPUEngine,
    write_checkpoint,
)
from corruptcheck.reference import ModelConfig

L = "model.layers.{i}"
# DeepseekV4ForCausalLM.forward(input_ids, positions, ...): the root is a plain nn.Module (the
# inner DeepseekV4Model carries @support_torch_compile, whose __call__ skips module hooks).
TOKENS = TokenSource(ids="in[input_ids|0]", pos="in[positions|1]")


def _routed_inputs(call) -> bool:
    """experts(hidden, topk_weights, topk_ids): only when ids really are the 3rd input."""
    ids = call.arg("topk_ids", 2)
    return isinstance(ids, torch.Tensor) and not ids.is_floating_point()


def capture_taps(cfg: ModelConfig) -> list[Tap]:
    """Canonical point -> vLLM module (CUDA path, `_forward_cuda`; engine-capture.md §6)."""
    taps = [
        Tap("model.embed_tokens", "embed", "out"),
        # layer 0: standalone mhc_pre(residual=x, ...) -> (post_mix, res_mix, layer_input)
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.in", "in[residual|0]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.post", "out[0]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.comb", "out[1]", layers="first"),
        Tap(f"{L}.mhc_pre", "layers.{i}.attn_hc.collapsed", "out[2]", layers="first"),
    ]
    # mhc_fused_post_pre(x, residual, post_mix, res_mix, fn, ...) ->
    #   (residual_cur, post_mix_cur, comb_mix_cur, layer_input_cur)   (mhc.py)
    fused = f"{L}.mhc_fused_post_pre"
    taps += [  # layers >= 1, call 0: previous layer's FFN mHC post + this layer's attention mHC pre
        Tap(fused, "layers.{prev}.out", "out[0]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.in", "out[0]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.post", "out[1]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.comb", "out[2]", call=0, layers="rest"),
        Tap(fused, "layers.{i}.attn_hc.collapsed", "out[3]", call=0, layers="rest"),
    ]
    for call, layers in ((0, "first"), (1, "rest")):  # attention mHC post + FFN mHC pre
        taps += [
            Tap(fused, "layers.{i}.ffn_hc.in", "out[0]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.post", "out[1]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.comb", "out[2]", call=call, layers=layers),
            Tap(fused, "layers.{i}.ffn_hc.collapsed", "out[3]", call=call, layers=layers),
        ]
    taps += [
        Tap(f"{L}.attn_norm", "layers.{i}.attn_norm", "out"),
        # DeepseekV4Attention.forward -> mla_attn -> ... -> wo_b (RowParallel: reduced)
        Tap(f"{L}.attn", "layers.{i}.attn.out", "out"),
        # the indexer writes into one buffer shared by every CSA layer: copy rows [:T] when
        # this layer's indexer returns (§1.5)
        Tap(f"{L}.attn.indexer", "layers.{i}.attn.indexer_topk", "state:model.topk_indices_buffer"),
        # version A: NormGateLinear(x) -> (normed_x, router_logits)
        Tap(f"{L}.ffn.norm_gate", "layers.{i}.ffn_norm", "out[0]"),
        Tap(f"{L}.ffn.norm_gate", "layers.{i}.moe.router_logits", "out[1]"),
        # version B: separate ffn_norm and GateLinear (fp32 logits, out[0])
        Tap(f"{L}.ffn_norm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.ffn.gate", "layers.{i}.moe.router_logits", "out[0]"),
        # MegaMoE path only: experts(normed_x, topk_weights, topk_ids, ...); FusedMoE routes
        # internally and exposes neither (those taps then never fire)
        Tap(f"{L}.ffn.experts", "layers.{i}.moe.weights", "in[topk_weights|1]", when=_routed_inputs),
        Tap(f"{L}.ffn.experts", "layers.{i}.moe.experts", "in[topk_ids|2]", when=_routed_inputs),
        # DeepseekV4MoE output: routed + shared (shared experts run inside FusedMoE)
        Tap(f"{L}.ffn", "layers.{i}.moe.out", "out"),
        # after the last layer: layer.hc_post -> mhc_post, then hc_head_op(hidden_states, ...)
        Tap("model.hc_head_op", "layers.{last}.out", "in[hidden_states|0]"),
        Tap("model.hc_head_op", "head.collapsed", "out"),
        Tap("model.norm", "head.norm", "out"),
        # logits_processor runs on the sampled rows only: finalize() drops it unless every
        # token has a row
        Tap("logits_processor", "logits", "out"),
    ]
    return taps


class VLLMEngine(GPUEngine):
    name = "vllm"
    extra = "vllm"
    package = "vllm"

    def launch(self, case: Case, weight_format: str = "fp8", gpu_memory_utilization: float = 0.5,
               **_options) -> tuple[dict, dict]:
        # V4 on vLLM is bf16 activations with FP8 weights / KV cache whatever was asked
        return launch(case, weight_format, gpu_memory_utilization)


def launch(case: Case, weight_format: str, gpu_memory_utilization: float) -> tuple[dict, dict]:
    """GPU only; unverified (see module docstring). Settings from engine-capture.md §1.3, §8."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core (and, at TP=1, the worker) in-process
    import vllm
    from vllm import LLM, SamplingParams

    cfg, seqs = case.config, case.sequences()
    total = sum(len(s) for s in seqs)
    with tempfile.TemporaryDirectory(prefix="corruptcheck-vllm-") as tmp:
        ckpt = write_checkpoint(case, tmp, weight_format)
        llm = LLM(model=tmp, skip_tokenizer_init=True, tensor_parallel_size=1, enforce_eager=True,
                  dtype="bfloat16", kv_cache_dtype="fp8", enable_prefix_caching=False, seed=0,
                  max_model_len=max(len(s) for s in seqs) + 16, max_num_seqs=len(seqs),
                  max_num_batched_tokens=max(total, 2048), gpu_memory_utilization=gpu_memory_utilization)
        recorder = Recorder(capture_taps(cfg), TOKENS, cfg.num_layers)
        llm.apply_model(recorder.attach)  # runs in the (in-process) worker on its model
        try:
            llm.generate([{"prompt_token_ids": s.tolist()} for s in seqs],
                         SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
        finally:
            llm.apply_model(lambda _model: recorder.detach())
    points, meta = capture_points_from([recorder], cfg, seqs)
    meta.update({"version": vllm.__version__, "checkpoint": {k: v for k, v in ckpt.items() if k != "path"},
                 "settings": {"enforce_eager": True, "tensor_parallel_size": 1, "kv_cache_dtype": "fp8",
                              "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                 "verified_on_gpu": False})
    return points, meta
