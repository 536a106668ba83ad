"""A case written as a GGUF that llama.cpp's `deepseek4` architecture loads (docs/engines.md,
"llama.cpp").

Written with the `gguf` writer vendored in llama-cpp-python's sdist (`vendor/llama.cpp/gguf-py`;
the registry's `gguf` may predate V4): tensor and key names come from that package's own tables
(`gguf.MODEL_TENSORS[DEEPSEEK4]`, `GGUFWriter.add_*`), hyper-parameters are the ones
`llama_model_deepseek4::load_arch_hparams` and the common `load_hparams` read
(`src/models/deepseek4.cpp`, `src/llama-model.cpp`). Tensors are the case's own weights, in
DeepSeek's layout ([out, in] is ggml's {in, out}; the vendored converter
`conversion/deepseek.py` moves them the same way), no tokenizer (`tokenizer.ggml.model =
"no_vocab"`, `vocab_size` dummy tokens: token ids go in directly).

Weight types (`weights=`):

* ``f32``: every tensor F32: bit-exact (the case's weights are bf16-representable);
* ``bf16``: every matrix BF16 (bit-exact: the same values), norms / mHC / APE / sinks F32;
* ``q8_0``: the FP8 linears and the routed experts Q8_0 (what the converter does with FP8
  weights), the bf16 matrices BF16, the rest F32. Q8_0 is not exact for these weights: its
  rounding is part of the declared profile (`llamacpp_precision.py`);
* ``mxfp4``: as ``q8_0`` with the routed experts MXFP4 (the converter's type for V4 experts).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from corruptcheck.cases import Case
from corruptcheck.weights import is_fp8_linear, is_routed_expert

WEIGHT_TYPES = ("f32", "bf16", "q8_0", "mxfp4")
LAYER_MAP = {  # DeepSeek name inside layers.i -> gguf MODEL_TENSOR member
    "hc_attn_fn": "HC_ATTN_FN", "hc_attn_base": "HC_ATTN_BASE", "hc_attn_scale": "HC_ATTN_SCALE",
    "hc_ffn_fn": "HC_FFN_FN", "hc_ffn_base": "HC_FFN_BASE", "hc_ffn_scale": "HC_FFN_SCALE",
    "attn.attn_sink": "ATTN_SINKS", "attn.wq_a.weight": "ATTN_Q_A", "attn.wq_b.weight": "ATTN_Q_B",
    "attn.q_norm.weight": "ATTN_Q_A_NORM", "attn.wkv.weight": "ATTN_KV", "attn.kv_norm.weight": "ATTN_KV_NORM",
    "attn.wo_a.weight": "ATTN_OUT_A", "attn.wo_b.weight": "ATTN_OUT_B",
    "attn.compressor.ape": "ATTN_COMPRESSOR_APE", "attn.compressor.wkv.weight": "ATTN_COMPRESSOR_WKV",
    "attn.compressor.wgate.weight": "ATTN_COMPRESSOR_WGATE", "attn.compressor.norm.weight": "ATTN_COMPRESSOR_NORM",
    "attn.indexer.wq_b.weight": "INDEXER_ATTN_Q_B", "attn.indexer.weights_proj.weight": "INDEXER_PROJ",
    "attn.indexer.compressor.ape": "INDEXER_COMPRESSOR_APE",
    "attn.indexer.compressor.wkv.weight": "INDEXER_COMPRESSOR_WKV",
    "attn.indexer.compressor.wgate.weight": "INDEXER_COMPRESSOR_WGATE",
    "attn.indexer.compressor.norm.weight": "INDEXER_COMPRESSOR_NORM",
    "attn_norm.weight": "ATTN_NORM", "ffn_norm.weight": "FFN_NORM", "ffn.gate.weight": "FFN_GATE_INP",
    "ffn.gate.bias": "FFN_EXP_PROBS_B", "ffn.gate.tid2eid": "FFN_GATE_TID2EID",
    "ffn.shared_experts.w1.weight": "FFN_GATE_SHEXP", "ffn.shared_experts.w2.weight": "FFN_DOWN_SHEXP",
    "ffn.shared_experts.w3.weight": "FFN_UP_SHEXP",
}
ROOT_MAP = {"embed.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "head.weight": "OUTPUT",
            "hc_head_fn": "HC_HEAD_FN", "hc_head_base": "HC_HEAD_BASE", "hc_head_scale": "HC_HEAD_SCALE"}
EXPERT_MAP = {"w1": "FFN_GATE_EXP", "w2": "FFN_DOWN_EXP", "w3": "FFN_UP_EXP"}
# stay F32 in every mode: elementwise operands of ggml ops (norm weights, mHC, APE rows, sinks)
_F32_PARTS = ("hc_", ".ape", "attn_sink", "norm.weight", "ffn.gate.bias")


def gguf_module():
    """The vendored `gguf` package (installed from llama-cpp-python's sdist by `make
    install-llamacpp`); None when missing or too old to know DeepSeek V4."""
    try:
        import gguf
    except ImportError:
        return None
    return gguf if hasattr(gguf.MODEL_ARCH, "DEEPSEEK4") else None


def _tensor_name(gguf, key: str, bid: int | None, suffix: str) -> str:
    member = getattr(gguf.MODEL_TENSOR, key)
    base = gguf.TENSOR_NAMES[member]
    return (base.format(bid=bid) if bid is not None else base) + suffix


def gguf_name(gguf, name: str) -> str | None:
    """The GGUF tensor name of a DeepSeek-named case tensor (None: not written, e.g. routed
    experts, written stacked per layer; MTP)."""
    if name in ROOT_MAP:
        return _tensor_name(gguf, ROOT_MAP[name], None, ".weight")
    parts = name.split(".", 2)
    if parts[0] != "layers" or len(parts) < 3:
        return None
    bid, rest = int(parts[1]), parts[2]
    if rest not in LAYER_MAP:
        return None
    return _tensor_name(gguf, LAYER_MAP[rest], bid, ".bias" if rest.endswith(".bias") else ".weight")


def tensor_type(name: str, weights: str, routed: bool = False) -> str:
    """The GGUF type a case tensor is written as, for a weight mode."""
    if weights == "f32" or any(p in name for p in _F32_PARTS) or name.endswith("tid2eid"):
        return "F32"
    if routed:
        return {"bf16": "BF16", "q8_0": "Q8_0", "mxfp4": "MXFP4"}[weights]
    if weights in ("q8_0", "mxfp4") and is_fp8_linear(name, torch.empty(1, 1)):
        return "Q8_0"
    return "BF16"


def _encode(gguf, arr: np.ndarray, qtype: str):
    """(data, raw_dtype) for the writer: F32 as is, BF16 / Q8_0 through the vendored quantizer
    (`gguf.quants.quantize`, which follows ggml's reference rounding), MXFP4 repacked from the
    release format (`mxfp4_blocks`)."""
    if qtype == "F32":
        return np.ascontiguousarray(arr, dtype=np.float32), None
    t = getattr(gguf.GGMLQuantizationType, qtype)
    if qtype == "MXFP4":
        return mxfp4_blocks(torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))), t
    return gguf.quants.quantize(np.ascontiguousarray(arr, dtype=np.float32), t), t


def mxfp4_blocks(w: torch.Tensor) -> np.ndarray:
    """[..., I] -> ggml `block_mxfp4` bytes [..., I/32 * 17]: per 32 inputs the E8M0 scale byte,
    then 16 bytes whose byte j holds element j in its low nibble and element j + 16 in its high
    one. The codes are the release quantizer's (`quant.mxfp4_quantize`: e2m1 codes index ggml's
    `kvalues_mxfp4` in the same order, ggml doubles the values and halves the scale), so this is
    what llama.cpp's converter writes for a V4 release's experts (`repack_mxfp4_blocks`: bits
    move, no rounding); for values already on the MXFP4 grid (weights.mxfp4_gguf_exact) the
    GGUF holds them exactly. (ggml's own quantizer, scale from floor(log2 amax), makes the same
    blocks of such values: their block maximum is 4 or 6 times the scale; tested.)"""
    from corruptcheck.reference.quant import mxfp4_quantize

    lead, cols = w.shape[:-1], w.shape[-1]
    packed, scale = mxfp4_quantize(w.reshape(-1, cols))
    p = packed.view(torch.uint8)
    codes = torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(p.shape[0], cols // 32, 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    e = scale.view(torch.uint8).reshape(p.shape[0], cols // 32, 1)
    return torch.cat((e, qs), dim=-1).reshape(*lead, cols // 32 * 17).numpy()


def check_config(cfg) -> list[str]:
    """Why llama.cpp's deepseek4 loader / graph cannot run this config (empty: it can)."""
    problems = []
    main = cfg.compress_ratios[: cfg.num_layers]
    bad = sorted({r for r in main if r not in (0, 4, 128)})
    if bad:
        problems.append(f"compress ratios {bad}: the loader accepts 0, 4 and 128 only "
                        "(llama_model_deepseek4::load_arch_tensors)")
    if cfg.csa_ratio != 4:
        problems.append(f"csa_ratio {cfg.csa_ratio}: llama.cpp hard-codes 4 (DSV4_CSA_RATIO)")
    if cfg.hc_mult != 4:
        problems.append(f"hc_mult {cfg.hc_mult}: build_hc_pre asserts hc == 4")
    if cfg.n_shared_experts != 1:
        problems.append("llama.cpp's shared expert width is n_ff_exp x n_expert_shared")
    return problems


def write_gguf(case: Case, path: str | os.PathLike, weights: str = "f32") -> dict:
    """Write `case` as a deepseek4 GGUF at `path`; returns what was written (types, sizes, the
    hyper-parameters), for the capture's metadata. MTP is not written (see engines.md)."""
    gguf = gguf_module()
    if gguf is None:
        raise RuntimeError("the vendored gguf package with DeepSeek V4 support is not installed "
                           "(make install-llamacpp)")
    if weights not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weights!r}; choose one of {', '.join(WEIGHT_TYPES)}")
    cfg = case.config
    problems = check_config(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    params = case.params()
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK4])
    hp = hparams(cfg)
    _write_hparams(gguf, w, cfg, weights)
    types: dict = {}
    n_hash = min(cfg.num_hash_layers, cfg.num_layers)
    for name, t in params.items():
        if name.startswith("mtp.") or is_routed_expert(name):
            continue
        if name.endswith(".ffn.gate.bias") and int(name.split(".")[1]) < n_hash:
            continue  # hash layers route by table; the loader reads no bias there
        out = gguf_name(gguf, name)
        if out is None:
            raise ValueError(f"no GGUF tensor for case tensor {name!r}")
        if name.endswith("tid2eid"):
            w.add_tensor(out, t.to(torch.int32).numpy())
            types[out] = "I32"
            continue
        qt = tensor_type(name, weights)
        data, raw = _encode(gguf, t.float().numpy(), qt)
        w.add_tensor(out, data, raw_dtype=raw)
        types[out] = qt
    for layer in range(cfg.num_layers):
        for proj, key in EXPERT_MAP.items():
            stacked = torch.stack([params[f"layers.{layer}.ffn.experts.{e}.{proj}.weight"]
                                   for e in range(cfg.n_routed_experts)]).float().numpy()
            qt = tensor_type(f"layers.{layer}.ffn.experts.0.{proj}.weight", weights, routed=True)
            data, raw = _encode(gguf, stacked, qt)
            out = _tensor_name(gguf, key, layer, ".weight")
            w.add_tensor(out, data, raw_dtype=raw)
            types[out] = qt
            del stacked, data
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    counts: dict = {}
    for qt in types.values():
        counts[qt] = counts.get(qt, 0) + 1
    return {"path": str(path), "weights": weights, "bytes": Path(path).stat().st_size, "types": counts,
            "tensor_types": types, "hparams": hp, "mtp": "not written"}


def hparams(cfg) -> dict:
    """The hyper-parameters the GGUF carries, by llama.cpp's meaning (checked against the
    loaded model: `llamacpp_engine.check_loaded`)."""
    return {"n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_head_kv": 1,
            "head_dim": cfg.head_dim, "n_rot": cfg.rope_dim, "n_vocab": cfg.vocab_size,
            "n_expert": cfg.n_routed_experts, "n_expert_used": cfg.experts_per_tok,
            "n_ff_exp": cfg.moe_inter_dim, "q_lora_rank": cfg.q_lora_rank, "n_swa": cfg.window,
            "compress_ratios": list(cfg.compress_ratios[: cfg.num_layers]),
            "hash_layers": min(cfg.num_hash_layers, cfg.num_layers), "hc_mult": cfg.hc_mult}


def _write_hparams(gguf, w, cfg, weights: str) -> None:
    n = cfg.num_layers
    w.add_name(f"corruptcheck-{cfg.name}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_embedding_length_out(cfg.hidden_size * cfg.hc_mult)
    w.add_block_count(n)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(1)  # one shared key/value row per token (K = V)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.rope_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    # YaRN: llama.cpp applies it on the compressed layers only (build_attention_impl), as V4 does
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(cfg.yarn_factor)
    w.add_rope_scaling_orig_ctx_len(cfg.yarn_original_max_pos)
    w.add_rope_scaling_yarn_beta_fast(cfg.yarn_beta_fast)
    w.add_rope_scaling_yarn_beta_slow(cfg.yarn_beta_slow)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_sliding_window(cfg.window)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_inter_dim)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.route_scale)
    w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SQRTSOFTPLUS)
    w.add_swiglu_clamp_exp([float(cfg.swiglu_limit)] * n)
    w.add_swiglu_clamp_shexp([float(cfg.swiglu_limit)] * n)
    w.add_indexer_head_count(cfg.index_n_heads)
    w.add_indexer_key_length(cfg.index_head_dim)
    w.add_indexer_top_k(cfg.index_topk)
    w.add_attention_output_group_count(cfg.o_groups)
    w.add_attention_output_lora_rank(cfg.o_lora_rank)
    w.add_attention_compress_ratios([int(r) for r in cfg.compress_ratios[:n]])
    w.add_attention_compress_rope_freq_base(cfg.compress_rope_theta)
    w.add_hyper_connection_count(cfg.hc_mult)
    w.add_hyper_connection_sinkhorn_iterations(cfg.hc_sinkhorn_iters)
    w.add_hyper_connection_epsilon(cfg.hc_eps)
    w.add_hash_layer_count(min(cfg.num_hash_layers, n))
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("no_vocab")
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE}[weights]
    w.add_file_type(ftype)
