"""The case's weights as a checkpoint directory in DeepSeek's on-disk format (config.json +
model.safetensors), which the in-process engine launches load; FP8 weights in the format of
reference/quant.py. It only prepares files and never imports an engine."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from corruptcheck.reference import ModelConfig
from corruptcheck.reference.quant import fp8_block_quantize, fp8_dequantize
from corruptcheck.weights import is_fp8_linear


def checkpoint_config(cfg: ModelConfig, weight_format: str = "bf16") -> dict:
    """config.json in the keys DeepSeek's V4 release uses (as the engines' config classes read
    them: docs/engine-capture.md §1.1, §2.1, §3.1). Keys only some engine reads are marked."""
    conf = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": 1, "head_dim": cfg.head_dim,
        "qk_rope_head_dim": cfg.rope_dim, "q_lora_rank": cfg.q_lora_rank, "o_lora_rank": cfg.o_lora_rank,
        "o_groups": cfg.o_groups, "sliding_window": cfg.window, "compress_ratios": list(cfg.compress_ratios),
        "compress_rope_theta": cfg.compress_rope_theta, "rope_theta": cfg.rope_theta,
        "rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        "max_position_embeddings": cfg.max_position_embeddings, "hc_mult": cfg.hc_mult,
        "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters, "hc_eps": cfg.hc_eps,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.experts_per_tok, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hash_layers": cfg.num_hash_layers, "routed_scaling_factor": cfg.route_scale,
        "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "swiglu_limit": cfg.swiglu_limit, "index_n_heads": cfg.index_n_heads,
        "index_head_dim": cfg.index_head_dim, "index_topk": cfg.index_topk, "rms_norm_eps": cfg.rms_eps,
        "num_nextn_predict_layers": cfg.num_mtp_layers, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
        # TRT-LLM reads the MLA-style names (kv_lora_rank must be 448 there, docs/engine-capture.md §3.3)
        "kv_lora_rank": cfg.head_dim - cfg.rope_dim, "qk_nope_head_dim": cfg.head_dim - cfg.rope_dim,
        "v_head_dim": cfg.head_dim, "n_hash_layers": cfg.num_hash_layers, "n_group": 1, "topk_group": 1,
    }
    if weight_format == "fp8":
        conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
        conf["expert_dtype"] = "fp8"  # FP8 experts (as V4-Flash-Base), vLLM file A
    return conf


def write_checkpoint(case, out_dir, weight_format: str = "bf16") -> dict:
    """The case's weights as a checkpoint directory in DeepSeek's on-disk format: config.json
    plus model.safetensors with the release's tensor names (the case's own naming).

    bf16: matrices bf16 (exact: case weights are bf16-representable), mHC / sinks / biases /
    norms fp32, tid2eid int32. fp8: the linear layers (see `weights.is_fp8_linear`) as e4m3 +
    `<name>.scale` ue8m0 128x128 block scales, as V4 releases store them; this changes
    the weights, so the returned summary says by how much (the reference runs the case's
    unquantized weights). Returns {"path", "weight_format", "fp8_max_rel_error"}."""
    from safetensors.torch import save_file

    if weight_format not in ("bf16", "fp8"):
        raise ValueError(f"weight_format must be bf16 or fp8, not {weight_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    worst = 0.0
    for name, t in case.params().items():
        if not t.is_floating_point():
            tensors[name] = t.to(torch.int32).contiguous()
        elif weight_format == "fp8" and is_fp8_linear(name, t):
            q, scale = fp8_block_quantize(t)
            tensors[name] = q
            tensors[name[: -len(".weight")] + ".scale"] = scale
            err = (fp8_dequantize(q, scale) - t.float()).norm() / t.float().norm().clamp(min=1e-30)
            worst = max(worst, float(err))
        elif t.dim() == 2 and name.endswith(".weight"):
            tensors[name] = t.to(torch.bfloat16).contiguous()
        else:
            tensors[name] = t.to(torch.float32).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt", "case": case.name})
    (out / "config.json").write_text(json.dumps(checkpoint_config(case.config, weight_format), indent=1))
    return {"path": str(out), "weight_format": weight_format,
            "fp8_max_rel_error": worst if weight_format == "fp8" else 0.0}
