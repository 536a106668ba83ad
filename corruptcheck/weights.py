"""Deterministic, seeded weights for a case, in DeepSeek's checkpoint naming (docs/v4-spec.md §8.1).

Every tensor gets its own generator seeded from (case seed, tensor name), so adding a tensor
never shifts the others. Values are rounded to bf16-representable numbers (stored as fp32),
so casting weights to bf16/fp32/fp64 is exact and every engine sees the same model. Scales are
chosen so the mechanisms a case claims to test are really exercised: some SwiGLU
pre-activations pass the clamp, routing spreads over the experts, mHC mixing is far from the
identity, compressor gates are peaked.
"""
from __future__ import annotations

import hashlib

import torch

from corruptcheck.reference import ModelConfig
from corruptcheck.reference.quant import fp8_block_quantize, fp8_dequantize, mxfp4_dequantize, mxfp4_quantize

# SwiGLU gate/up pre-activations get a std of about this, so |x| > swiglu_limit (10) happens
# for a few tokens in every expert.
SWIGLU_PREACT_STD = 4.0


def _gen(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


class _Builder:
    def __init__(self, seed: int):
        self.seed, self.params = seed, {}

    def normal(self, name, shape, std, mean=0.0):
        t = torch.randn(*shape, generator=_gen(self.seed, name)) * std + mean
        self.params[name] = _bf16(t)

    def uniform(self, name, shape, lo, hi):
        t = torch.rand(*shape, generator=_gen(self.seed, name)) * (hi - lo) + lo
        self.params[name] = _bf16(t)

    def norm_weight(self, name, dim):
        self.normal(name, (dim,), 0.1, 1.0)

    def linear(self, name, out_dim, in_dim, gain=1.0):
        self.normal(name, (out_dim, in_dim), gain / in_dim ** 0.5)


def _hc(b: _Builder, prefix: str, cfg: ModelConfig, rows: int, names=("fn", "base", "scale")):
    n = cfg.hc_mult
    fn, base, scale = (f"{prefix}{s}" for s in names)
    b.normal(fn, (rows, n * cfg.hidden_size), 1.0 / (n * cfg.hidden_size) ** 0.5)
    if rows == n:  # head: weights only
        b.normal(base, (n,), 0.5)
        b.uniform(scale, (1,), 0.5, 1.5)
        return
    # pre / post biases random; comb biased towards, but far from, the identity
    g = _gen(b.seed, base)
    bias = torch.randn(rows, generator=g) * 0.5
    bias[2 * n:] += torch.eye(n).flatten() * 1.0
    b.params[base] = _bf16(bias)
    b.uniform(scale, (3,), 0.5, 1.5)


def _compressor(b: _Builder, prefix: str, cfg: ModelConfig, dc: int, ratio: int, overlap: bool):
    c = 2 if overlap else 1
    b.linear(f"{prefix}.wkv.weight", c * dc, cfg.hidden_size)
    b.linear(f"{prefix}.wgate.weight", c * dc, cfg.hidden_size, gain=2.0)  # peaked softmax over tokens
    b.normal(f"{prefix}.ape", (ratio, c * dc), 0.5)
    b.norm_weight(f"{prefix}.norm.weight", dc)


def _block(b: _Builder, p: str, cfg: ModelConfig, layer: int):
    d, h = cfg.hidden_size, cfg.num_heads
    b.norm_weight(f"{p}.attn_norm.weight", d)
    b.norm_weight(f"{p}.ffn_norm.weight", d)
    rows = (2 + cfg.hc_mult) * cfg.hc_mult
    _hc(b, f"{p}.hc_attn_", cfg, rows)
    _hc(b, f"{p}.hc_ffn_", cfg, rows)
    a = f"{p}.attn"
    b.linear(f"{a}.wq_a.weight", cfg.q_lora_rank, d)
    b.norm_weight(f"{a}.q_norm.weight", cfg.q_lora_rank)
    b.linear(f"{a}.wq_b.weight", h * cfg.head_dim, cfg.q_lora_rank)
    b.linear(f"{a}.wkv.weight", cfg.head_dim, d)
    b.norm_weight(f"{a}.kv_norm.weight", cfg.head_dim)
    b.linear(f"{a}.wo_a.weight", cfg.o_groups * cfg.o_lora_rank, h * cfg.head_dim // cfg.o_groups)
    b.linear(f"{a}.wo_b.weight", d, cfg.o_groups * cfg.o_lora_rank)
    b.normal(f"{a}.attn_sink", (h,), 1.0)
    kind = cfg.layer_type(layer)
    if kind != "sliding":
        _compressor(b, f"{a}.compressor", cfg, cfg.head_dim, cfg.compress_ratio(layer), kind == "csa")
    if kind == "csa":
        ix = f"{a}.indexer"
        b.linear(f"{ix}.wq_b.weight", cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        b.linear(f"{ix}.weights_proj.weight", cfg.index_n_heads, d)
        _compressor(b, f"{ix}.compressor", cfg, cfg.index_head_dim, cfg.csa_ratio, True)
    f = f"{p}.ffn"
    b.linear(f"{f}.gate.weight", cfg.n_routed_experts, d, gain=2.0)
    if cfg.is_hash_layer(layer):
        g = _gen(b.seed, f"{f}.gate.tid2eid")
        table = torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.experts_per_tok]
                             for _ in range(cfg.vocab_size)])
        b.params[f"{f}.gate.tid2eid"] = table.to(torch.int64)
    else:
        b.normal(f"{f}.gate.bias", (cfg.n_routed_experts,), 0.1)
    inter, s = cfg.moe_inter_dim, SWIGLU_PREACT_STD
    for e in [f"{f}.experts.{i}" for i in range(cfg.n_routed_experts)] + [f"{f}.shared_experts"]:
        b.linear(f"{e}.w1.weight", inter, d, gain=s)
        b.linear(f"{e}.w3.weight", inter, d, gain=s)
        b.linear(f"{e}.w2.weight", d, inter, gain=1.0 / s ** 2)


# kept in bf16, as the engines read them: embedding / LM head, router gates, the compressors
# (vLLM multiplies `compressor.fused_wkv_wgate.weight` with a plain bf16 mm) and the indexer's
# weights_proj; MTP is not loaded by the main models ([verify] against a V4 release's index)
_BF16_ONLY = ("embed.weight", "head.weight")
_BF16_PARTS = (".gate.weight", ".compressor.", ".weights_proj.")


def is_fp8_linear(name: str, t: torch.Tensor) -> bool:
    return (t.dim() == 2 and name.endswith(".weight") and name not in _BF16_ONLY
            and not any(p in name for p in _BF16_PARTS) and not name.startswith("mtp."))


def is_routed_expert(name: str) -> bool:
    return ".experts." in name and name.endswith(".weight")


def fp8_exact(params: dict) -> dict:
    """Every FP8 linear (`is_fp8_linear`) replaced by its own e4m3 x ue8m0-block-scale value, so an
    FP8 checkpoint of these weights holds exactly the numbers the reference uses (no quantisation
    error hides in a comparison). e4m3 values times powers of two are bf16-representable.
    Replaces in place (a wide case's weights are not held twice) and returns `params`."""
    for name in list(params):  # names only: the replaced tensor is freed as we go
        t = params[name]
        if t.is_floating_point() and is_fp8_linear(name, t):
            params[name] = fp8_dequantize(*fp8_block_quantize(t))
    return params


def q8_0_exact(params: dict, experts: bool = True) -> dict:
    """Every FP8-class linear (`is_fp8_linear`, the routed experts included) replaced by the
    value a Q8_0 GGUF holds for it (ggml's reference quantizer: blocks of 32 along the input
    dim, fp16 scale amax / 127, round half away from zero; `quant.q8_0_sim`), as llama.cpp's
    converter writes FP8 weights. Q8_0 of these values gives them back (idempotent), so the
    engine loads the very numbers the reference runs. In place; returns `params`."""
    from corruptcheck.reference.quant import q8_0_sim

    for name in list(params):
        t = params[name]
        if t.is_floating_point() and is_fp8_linear(name, t) and (experts or not is_routed_expert(name)):
            params[name] = q8_0_sim(t.float(), ties_away=True).to(t.dtype)
    return params


def mxfp4_gguf_exact(params: dict) -> dict:
    """The weights of an MXFP4 GGUF (llama.cpp's `MOSTLY_MXFP4_MOE`, what its converter makes of
    a V4 release): the routed experts as the release stores them (`quant.mxfp4_quantize`: e2m1
    x one E8M0 scale per 32 inputs), which the converter repacks bit for bit into ggml's
    `block_mxfp4` (`repack_mxfp4_blocks`: only bits move); every other FP8-class linear Q8_0
    (`q8_0_exact`). In place; returns `params`."""
    return q8_0_exact(mxfp4_experts(params), experts=False)


def mxfp4_experts(params: dict) -> dict:
    """The routed experts replaced by their release MXFP4 value (e2m1 x one E8M0 scale per 32
    columns). In place; returns `params`."""
    for name in list(params):
        if params[name].is_floating_point() and is_routed_expert(name):
            params[name] = mxfp4_dequantize(*mxfp4_quantize(params[name])).to(params[name].dtype)
    return params


# weight_format "<base>+<rounding>": the base weights, then this (the numbers a quantized GGUF holds)
GGUF_ROUNDINGS = {"q8_0": q8_0_exact, "mxfp4": mxfp4_gguf_exact}


def release_exact(params: dict) -> dict:
    """The weights a V4 release stores: routed experts MXFP4 (e2m1 x one E8M0 scale per 32
    columns), every other FP8 linear e4m3 x 128x128 E8M0 block scales; each replaced in place
    by its exact value, so a release-format checkpoint holds the reference's very numbers
    (e2m1 values times powers of two are bf16-representable too)."""
    return fp8_exact(mxfp4_experts(params))


def _generate(cfg: ModelConfig, b: _Builder) -> dict:
    d = cfg.hidden_size
    b.normal("embed.weight", (cfg.vocab_size, d), 1.0)
    b.linear("head.weight", cfg.vocab_size, d)
    b.norm_weight("norm.weight", d)
    _hc(b, "hc_head_", cfg, cfg.hc_mult)
    for layer in range(cfg.num_layers):
        _block(b, f"layers.{layer}", cfg, layer)
    if cfg.num_mtp_layers:
        m = "mtp.0"
        b.linear(f"{m}.e_proj.weight", d, d)
        b.linear(f"{m}.h_proj.weight", d, d)
        for name in ("enorm", "hnorm", "norm"):
            b.norm_weight(f"{m}.{name}.weight", d)
        _hc(b, f"{m}.hc_head_", cfg, cfg.hc_mult)
        _block(b, m, cfg, cfg.num_layers)
    return b.params


def generate_params(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    return _generate(cfg, _Builder(seed))


class _ShapeBuilder(_Builder):
    """Records the large tensors on the meta device (shape and dtype, no data)."""

    def normal(self, name, shape, std, mean=0.0):
        self.params[name] = torch.empty(shape, device="meta")

    def uniform(self, name, shape, lo, hi):
        self.params[name] = torch.empty(shape, device="meta")


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """{name: (shape, is floating point)} of every parameter of a model with this config, in
    DeepSeek's naming: what a checkpoint of it must hold (release/reader.py)."""
    return {n: (tuple(t.shape), t.is_floating_point()) for n, t in _generate(cfg, _ShapeBuilder(0)).items()}
