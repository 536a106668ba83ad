"""The `sglang` engine: SGLang's DeepseekV4ForCausalLM run in-process, captured with module
hooks and method wrappers.

Capture (tested here on tests/engine_trees.py): `capture_taps()` maps the canonical points to
sgl-project/sglang `python/sglang/srt/models/deepseek_v4.py` @ 000328a8
(docs/engine-capture.md §2, §6). SGLang's decoder layer runs the unfused sequence
hc_pre -> input_layernorm -> self_attn -> hc_post -> hc_pre -> post_attention_layernorm -> mlp
-> hc_post and returns the full [T, hc, H] stream, so the layer output is the layer's own
output. `hc_pre`, `hc_post` and `hc_head` are methods (wrapped per instance, call 0 =
attention, call 1 = FFN). With the TileLang mhc_pre, `hc_pre(..., norm=...)` folds the RMSNorm
in and says so in its 4th return value: the collapsed point is then not exposed and ret[0] is the normed input.

Launch (GPU only; docs/engines.md says what is verified where): SGLang's
server runs the model in scheduler subprocesses; the in-process route is the one
`python -m sglang.bench_one_batch` takes (ModelRunner built in this process, one prefill of the
batch), with --disable-cuda-graph, TP=1, no radix cache, no overlap scheduling.
"""
from __future__ import annotations

import tempfile

from corruptcheck.cases import Case
from corruptcheck.engines.options import Option, boolean, fraction, one_of
from corruptcheck.engines.canonical import capture_points_from
from corruptcheck.engines.checkpoint import write_checkpoint
from corruptcheck.engines.gpu_launch import GPUEngine
from corruptcheck.engines.recorder import HookRecorder
from corruptcheck.engines.taps import Tap, TokenSource
from corruptcheck.reference import ModelConfig

L = "model.layers.{i}"
# DeepseekV4ForCausalLM.forward(input_ids, positions, forward_batch, ...)
TOKENS = TokenSource(ids="in[input_ids|0]", pos="in[positions|1]")


def _norm_fused(call) -> bool:
    """hc_pre returns (y, post, comb, norm_fused)."""
    return bool(call.out[3])


def _not_norm_fused(call) -> bool:
    return not call.out[3]


def capture_taps(cfg: ModelConfig, topk_weights_scaled: bool = False) -> list[Tap]:
    """Canonical point -> SGLang module / method (docs/engine-capture.md §2.1, §6).

    `topk_weights_scaled`: whether `mlp.topk`'s weights already include the routed scaling
    factor. SGLang applies it to the MoE output unless the MoE kernel fuses it
    ([verify] per release); when they do not, the captured weights are scaled here."""
    taps = [
        Tap("model.embed_tokens", "embed", "out"),
        # layer(positions=, hidden_states=, forward_batch=, input_ids=, input_ids_global=)
        Tap(L, "layers.{i}.attn_hc.in", "in[hidden_states|1]"),
    ]
    for call, block, norm in ((0, "attn_hc", "attn_norm"), (1, "ffn_hc", "ffn_norm")):
        taps += [
            Tap(L, f"layers.{{i}}.{block}.collapsed", "out[0]", method="hc_pre", call=call, when=_not_norm_fused),
            Tap(L, f"layers.{{i}}.{norm}", "out[0]", method="hc_pre", call=call, when=_norm_fused),
            Tap(L, f"layers.{{i}}.{block}.post", "out[1]", method="hc_pre", call=call),
            Tap(L, f"layers.{{i}}.{block}.comb", "out[2]", method="hc_pre", call=call),
        ]
    taps += [
        Tap(L, "layers.{i}.ffn_hc.in", "in[x|0]", method="hc_pre", call=1),
        # called only when hc_pre did not fuse the norm
        Tap(f"{L}.input_layernorm", "layers.{i}.attn_norm", "out"),
        Tap(f"{L}.post_attention_layernorm", "layers.{i}.ffn_norm", "out"),
        Tap(f"{L}.self_attn.q_norm", "layers.{i}.attn.qr", "out"),
        # per-head unit RMSNorm + RoPE written into this rank's heads: [T, H/tp, hd]
        Tap(f"{L}.self_attn", "layers.{i}.attn.q", "out", method="_compute_q_b", merge="concat:1"),
        # MQALayer.forward -> wo_b (RowParallel, reduce_results when attn_tp > 1)
        Tap(f"{L}.self_attn", "layers.{i}.attn.out", "out"),
        Tap(f"{L}.mlp.gate", "layers.{i}.moe.router_logits", "out"),
        # TopK -> (topk_weights, topk_ids, router_logits); hash layers route by tid2eid here
        Tap(f"{L}.mlp.topk", "layers.{i}.moe.experts", "out.topk_ids"),
        Tap(f"{L}.mlp.topk", "layers.{i}.moe.weights", "out.topk_weights",
            scale=1.0 if topk_weights_scaled else cfg.route_scale),
        Tap(f"{L}.mlp", "layers.{i}.moe.out", "out"),
        Tap(L, "layers.{i}.out", "out"),
        Tap("model", "head.collapsed", "out", method="hc_head"),
        Tap("model.norm", "head.norm", "out"),
        # LogitsProcessorOutput.next_token_logits: last token per request only -> dropped
        Tap("logits_processor", "logits", "out.next_token_logits"),
    ]
    # not exposed: indexer top-k (C4Indexer returns None and writes physical paged indices
    # into the attention backend's metadata, docs/engine-capture.md §2.2), attn.kv (fused into
    # the cache write)
    return taps


class SGLangEngine(GPUEngine):
    name = "sglang"
    extra = "sglang"
    options = (
        Option("weight_format", one_of("bf16", "fp8"), "checkpoint weights written for the engine"),
        Option("topk_weights_scaled", boolean, "whether SGLang's top-k weights already carry the routed scale"),
        Option("mem_fraction_static", fraction, "GPU memory share for weights and KV cache"),
    )
    package = "sglang"

    def launch(self, case: Case, weight_format: str = "bf16", topk_weights_scaled: bool = False,
               mem_fraction_static: float = 0.5, **_options) -> tuple[dict, dict]:
        return launch(case, weight_format, topk_weights_scaled, mem_fraction_static)


def launch(case: Case, weight_format: str, topk_weights_scaled: bool, mem_fraction_static: float):
    """GPU only; unverified. Follows bench_one_batch.py (sgl-project/sglang @ 00944150):
    load_model -> prepare inputs -> extend; the tokenizer is not needed (ids are given)."""
    import sglang
    from sglang import bench_one_batch as bob
    from sglang.srt.server_args import PortArgs, ServerArgs

    cfg, seqs = case.config, case.sequences()
    with tempfile.TemporaryDirectory(prefix="corruptcheck-sglang-") as tmp:
        ckpt = write_checkpoint(case, tmp, weight_format)
        server_args = ServerArgs(model_path=tmp, tp_size=1, dtype="bfloat16", disable_cuda_graph=True,
                                 disable_overlap_schedule=True, disable_radix_cache=True,
                                 skip_tokenizer_init=True, random_seed=0, mem_fraction_static=mem_fraction_static)
        port_args = PortArgs.init_new(server_args)
        for init in ("initialize_moe_config", "initialize_fp8_gemm_config", "initialize_fp4_gemm_config"):
            if hasattr(bob, init):  # latency_test() does this before load_model
                getattr(bob, init)(server_args)
        bob.get_tokenizer = lambda *a, **k: None  # load_model loads one unconditionally
        runner, _ = bob.load_model(server_args, port_args, 0, 0)
        torch_runner = getattr(runner, "torch_runner", runner)  # _TorchBenchRunner wrapper
        reqs = bob.prepare_synthetic_inputs_for_latency_test(len(seqs), None,
                                                             custom_inputs=[s.tolist() for s in seqs])
        recorder = HookRecorder(capture_taps(cfg, topk_weights_scaled), TOKENS, cfg.num_layers)
        with recorder.attached(torch_runner.model):  # ModelRunner calls model.forward(...) directly
            bob.extend(reqs, torch_runner)
    points, meta = capture_points_from([recorder], cfg, seqs)
    meta.update({"version": sglang.__version__, "checkpoint": {k: v for k, v in ckpt.items() if k != "path"},
                 "settings": {"disable_cuda_graph": True, "tp_size": 1, "disable_radix_cache": True,
                              "topk_weights_scaled": topk_weights_scaled},
                 "verified_on_gpu": False})
    return points, meta
