"""transformers' `DeepseekV4ForCausalLM` built from a case: the equivalent config, the case's
DeepSeek-named weights renamed to transformers' names, the precision's casts (HF's own fp32
modules kept). transformers is imported lazily so the rest of corruptcheck works without it.
"""
from __future__ import annotations

import torch

from corruptcheck.cases import Case
from corruptcheck.errors import EngineUnavailable
from corruptcheck.reference import ModelConfig, Precision

HF_LAYER_TYPE = {"sliding": "sliding_attention", "csa": "compressed_sparse_attention",
                 "hca": "heavily_compressed_attention"}


def require_transformers():
    try:
        import transformers
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise EngineUnavailable(
            f"the hf engine needs transformers>=5.24 with DeepseekV4ForCausalLM ({exc}); "
            "install it with: pip install 'corruptcheck[hf]'") from None
    return transformers


def hf_config(cfg: ModelConfig, attn_impl: str = "eager"):
    """The transformers config equivalent to `cfg` (explicit layer schedule, docs/v4-spec.md §1.3)."""
    require_transformers()
    from transformers import DeepseekV4Config

    types = [cfg.layer_type(i) for i in range(cfg.num_layers)]
    hca = {cfg.compress_ratio(i) for i in range(cfg.num_layers) if types[i] == "hca"}
    if len(hca) > 1:
        raise ValueError("transformers supports a single HCA ratio per model")
    hc = cfg.hc_mult
    conf = DeepseekV4Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_inter_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=1,
        head_dim=cfg.head_dim, q_lora_rank=cfg.q_lora_rank, num_experts_per_tok=cfg.experts_per_tok,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=1, scoring_func="sqrtsoftplus",
        norm_topk_prob=True, routed_scaling_factor=cfg.route_scale,
        max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope_theta,
        layer_types=[HF_LAYER_TYPE[t] for t in types],
        mlp_layer_types=["hash_moe" if cfg.is_hash_layer(i) else "moe" for i in range(cfg.num_layers)],
        compress_rates={"compressed_sparse_attention": cfg.csa_ratio,
                        "heavily_compressed_attention": hca.pop() if hca else 128},
        compress_rope_theta=cfg.compress_rope_theta, hc_mult=hc, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters,
        hc_eps=cfg.hc_eps, swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, rms_norm_eps=cfg.rms_eps, partial_rotary_factor=cfg.rope_dim / cfg.head_dim,
        rope_parameters={"rope_type": "yarn", "factor": cfg.yarn_factor,
                         "original_max_position_embeddings": cfg.yarn_original_max_pos,
                         "beta_fast": cfg.yarn_beta_fast, "beta_slow": cfg.yarn_beta_slow},
        tie_word_embeddings=False, num_nextn_predict_layers=cfg.num_mtp_layers,
    )
    conf._attn_implementation = attn_impl
    conf._experts_implementation = "eager"
    return conf


# DeepSeek checkpoint name -> transformers module name (docs/v4-spec.md §8.1, HF conversion_mapping)
_LAYER_RENAMES = [
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("hc_attn_fn", "attn_hc.fn"), ("hc_attn_base", "attn_hc.base"), ("hc_attn_scale", "attn_hc.scale"),
    ("hc_ffn_fn", "ffn_hc.fn"), ("hc_ffn_base", "ffn_hc.base"), ("hc_ffn_scale", "ffn_hc.scale"),
    ("attn.wq_a.weight", "self_attn.q_a_proj.weight"), ("attn.q_norm.weight", "self_attn.q_a_norm.weight"),
    ("attn.wq_b.weight", "self_attn.q_b_proj.weight"), ("attn.wkv.weight", "self_attn.kv_proj.weight"),
    ("attn.kv_norm.weight", "self_attn.kv_norm.weight"), ("attn.wo_a.weight", "self_attn.o_a_proj.weight"),
    ("attn.wo_b.weight", "self_attn.o_b_proj.weight"), ("attn.attn_sink", "self_attn.sinks"),
    ("attn.compressor.wkv.weight", "self_attn.compressor.kv_proj.weight"),
    ("attn.compressor.wgate.weight", "self_attn.compressor.gate_proj.weight"),
    ("attn.compressor.ape", "self_attn.compressor.position_bias"),
    ("attn.compressor.norm.weight", "self_attn.compressor.kv_norm.weight"),
    ("attn.indexer.wq_b.weight", "self_attn.compressor.indexer.q_b_proj.weight"),
    ("attn.indexer.weights_proj.weight", "self_attn.compressor.indexer.scorer.weights_proj.weight"),
    ("attn.indexer.compressor.wkv.weight", "self_attn.compressor.indexer.kv_proj.weight"),
    ("attn.indexer.compressor.wgate.weight", "self_attn.compressor.indexer.gate_proj.weight"),
    ("attn.indexer.compressor.ape", "self_attn.compressor.indexer.position_bias"),
    ("attn.indexer.compressor.norm.weight", "self_attn.compressor.indexer.kv_norm.weight"),
    ("ffn.gate.weight", "mlp.gate.weight"), ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.gate.tid2eid", "mlp.gate.tid2eid"),
    ("ffn.shared_experts.w1.weight", "mlp.shared_experts.gate_proj.weight"),
    ("ffn.shared_experts.w3.weight", "mlp.shared_experts.up_proj.weight"),
    ("ffn.shared_experts.w2.weight", "mlp.shared_experts.down_proj.weight"),
]
_TOP_RENAMES = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
                "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
                "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}


def export_state_dict(cfg: ModelConfig, params: dict) -> dict:
    """DeepSeek-named parameters -> a transformers state dict (MTP dropped: HF lacks it)."""
    out = {hf: params[ds] for ds, hf in _TOP_RENAMES.items()}
    for layer in range(cfg.num_layers):
        pre = f"layers.{layer}."
        for ds, hf in _LAYER_RENAMES:
            if pre + ds in params:
                out[f"model.layers.{layer}.{hf}"] = params[pre + ds]
        experts = range(cfg.n_routed_experts)
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([params[f"{pre}ffn.experts.{e}.w1.weight"], params[f"{pre}ffn.experts.{e}.w3.weight"]])
             for e in experts])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [params[f"{pre}ffn.experts.{e}.w2.weight"] for e in experts])
    return out


def norm_returns_input_dtype() -> bool:
    """Whether transformers' DeepseekV4RMSNorm with an fp32 weight returns a bf16 input's dtype."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RMSNorm

    with torch.no_grad():
        return DeepseekV4RMSNorm(2)(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


def build_model(case: Case, precision: str = "float32", attn_impl: str = "eager"):
    require_transformers()
    from transformers import DeepseekV4ForCausalLM

    prec = Precision.of(precision)
    conf = hf_config(case.config, attn_impl)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(conf)
    model = model.to_empty(device="cpu")
    sd = export_state_dict(case.config, case.params())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # rotary inv_freq buffers are non-persistent: rebuild them after to_empty
    for mod in model.modules():
        if type(mod).__name__ == "DeepseekV4RotaryEmbedding":
            for lt in mod.layer_types:
                fn = mod.compute_default_rope_parameters
                if mod.rope_type[lt] != "default":
                    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
                    fn = ROPE_INIT_FUNCTIONS[mod.rope_type[lt]]
                inv, scaling = fn(mod.config, None, layer_type=lt)
                getattr(mod, f"{lt}_inv_freq").copy_(inv)
                getattr(mod, f"{lt}_original_inv_freq").copy_(inv)
                setattr(mod, f"{lt}_attention_scaling", scaling)
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise RuntimeError(f"hf weight export mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    # keep HF's own fp32 modules (mHC, norms, sinks, biases) as HF does; cast the rest
    keep = tuple(model._keep_in_fp32_modules_strict)
    if prec.act == torch.bfloat16 and not norm_returns_input_dtype():
        # transformers < 5.24 keeps RMSNorm weights fp32 but returns `weight * x.to(input dtype)`,
        # i.e. fp32 into the next bf16 Linear: its own bf16 forward fails (docs/divergences.md
        # D8). Its bf16 norm weights (exact: the cases' weights are bf16) make it run as a bf16
        # port would; the run's meta says so.
        norms = {n for n, m in model.named_modules() if type(m).__name__ == "DeepseekV4RMSNorm"}
        keep = tuple(k for k in keep if not any(n.split(".")[-1] == k for n in norms))
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            continue
        if "inv_freq" in name:  # RoPE frequencies stay fp32 as in transformers
            continue
        if prec.act == torch.bfloat16 and any(k in name.split(".") for k in keep):
            continue
        t.data = t.data.to(prec.act)
    model.eval()
    return model

