"""Faults in attention: positional constants (YaRN on sliding layers, YaRN mscale in the softmax:
A4), the indexer's RoPE layout (A3), the CSA compressor's lost overlap half (A8), windows and
compressed-entry causality off by one (A10). The mechanism is in `corruptcheck.faults.base`."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from corruptcheck.errors import BadInput
from corruptcheck.engines.patching import Patcher, lerp, patched
from corruptcheck.faults.base import Fault, _has_layer, affected, hf_module
from corruptcheck.points import block
from corruptcheck.reference import ModelConfig
from corruptcheck.reference import attention as r_attn
from corruptcheck.reference import compressor as r_comp
from corruptcheck.reference import model as r_model
from corruptcheck.reference.primitives import apply_rope, rope_frequencies


def _wrap_reference_attention(p: Patcher, kinds: tuple, inner) -> None:
    """Wrap the reference's per-layer attention; for layers of a kind in `kinds` first call
    `inner(p2, x, layer, cfg, tables)`, which may patch more through `p2` (undone when the
    layer's attention returns) and returns the RoPE tables to use."""
    def make(orig):
        def attention(x, params, layer, cfg, tables, *rest):
            if cfg.layer_type(layer) not in kinds:
                return orig(x, params, layer, cfg, tables, *rest)
            with patched() as p2:
                tables = inner(p2, x, layer, cfg, tables)
                return orig(x, params, layer, cfg, tables, *rest)
        return attention
    p.wrap(r_model, "attention", make)


def half_split(rope, width):
    """The RoPE `rope` (interleaved pairs (2i, 2i+1) on the trailing channels) with half-split
    (NeoX) pairs (i, i + width/2) instead: the trailing `width(*args)` channels are gathered into
    interleaved order, rotated by `rope`, and put back (a permutation: exact)."""
    def rotate(x, *args, **kwargs):
        w = width(x, *args, **kwargs)
        n = x.shape[-1] - w
        order = torch.arange(w).view(2, w // 2).t().reshape(-1)  # 0, w/2, 1, w/2 + 1, ...
        keep = torch.arange(n)
        out = rope(x[..., torch.cat([keep, n + order])], *args, **kwargs)
        return out[..., torch.cat([keep, n + torch.argsort(order)])]
    return rotate


def _blended(clean, faulty, m: float):
    """The function lerp(clean(...), faulty(...), m) of two pure functions; `faulty` itself at m = 1."""
    if m == 1:
        return faulty
    return lambda *args, **kwargs: lerp(clean(*args, **kwargs), faulty(*args, **kwargs), m)


def _rows_where(rows: torch.Tensor, faulty: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """`faulty` in the query rows selected by `rows` ([B, S] over a [B, 1, S, K] mask / bias, or
    [S] over an [S, K] one), `clean` in the others."""
    sel = rows[:, None, :, None] if faulty.dim() == 4 else rows[:, None]
    return torch.where(sel, faulty, clean)


def _yarn_main(cfg: ModelConfig) -> torch.Tensor:
    """The main (theta = rope_theta) table with the compressed layers' YaRN applied."""
    return rope_frequencies(cfg.rope_dim, cfg.rope_theta, cfg.yarn_factor, cfg.yarn_original_max_pos,
                            cfg.yarn_beta_fast, cfg.yarn_beta_slow)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


class YarnOnSliding(Fault):
    """V4-16 (class A4, positional constants): SGLang applied YaRN to the pure sliding-window
    layers after #25144 made `original_seq_len` unconditional (fixed by
    sgl-project/sglang#34788); siblings in Atlas#276 and mlx-lm#1189. Error grows with position.

    Re-enacted: sliding-window layers rotate with theta_main = 10000 *with* the YaRN ramp
    (factor 16, original 65536) that belongs to the CSA/HCA layers only. Strikes the first
    sliding layer's rotated q/kv: `attn.q` (then `attn.kv`, `attn.core` — transformers exposes
    neither q nor kv, so there the first visible point is `attn.core`). Trigger: the engine runs
    a sliding-window-only layer (transformers has no MTP block, so only main layers count).
    """
    name = "yarn-on-sliding"
    catalog = "V4-16"
    klass = "A4"
    summary = "sliding-window layers rotate with the YaRN-scaled table"
    trigger = "a sliding-window-only layer (the reference also counts the MTP block)"
    points = ("attn.q", "attn.kv", "attn.core")
    knob = "the sliding layers' RoPE frequencies blended: plain + m·(YaRN − plain)"

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("sliding",), engine) and max(seq_lens) > 1

    def hf(self, p, state, cfg):
        m = self.magnitude
        inv = lerp(rope_frequencies(cfg.rope_dim, cfg.rope_theta), _yarn_main(cfg), m)

        def yarn_table(self_a, hidden_states, position_embeddings=None, position_ids=None, **kwargs):
            if self_a.rope_layer_type == "main" and m == 0:
                state.hit()
            elif self_a.rope_layer_type == "main":
                cos, _ = position_embeddings["main"]
                ang = position_ids[..., None].float() * inv.to(torch.float32)
                position_embeddings = {**position_embeddings,
                                       "main": (ang.cos().to(cos.dtype), ang.sin().to(cos.dtype))}
                state.hit()
            return (self_a, hidden_states), dict(position_embeddings=position_embeddings,
                                                 position_ids=position_ids, **kwargs)
        p.map_args(hf_module().DeepseekV4Attention, "forward", yarn_table)

    def reference(self, p, state, cfg):
        inv = _yarn_main(cfg)

        def inner(p2, x, layer, c, tables):
            state.hit()
            return {**tables, "main": lerp(tables["main"], inv, self.magnitude)}
        _wrap_reference_attention(p, ("sliding",), inner)


class CsaPrevWindowLost(Fault):
    """V4-21 (class A8, cache / state window): omlx's ratio-4 overlapping compressor took the
    previous window's half by shifting along the window axis; with a single window per decode
    step the shift is empty, that lane became zero padding and every entry pooled 4 tokens
    instead of 8 (jundot/omlx#2271; retention analysis in lightseekorg/tokenspeed#1612).

    Re-enacted: the CSA main compressor pools every entry as such a decode step does — the
    previous block's "a" half gets weight 0 (value 0, gate logit -inf). Strikes
    `layers.L.attn.compressed_kv` of the first CSA layer L. Trigger: a CSA layer with at least
    two compressed entries (entry 0 has no previous half anyway).
    """
    name = "csa-prev-window-lost"
    catalog = "V4-21"
    klass = "A8"
    summary = "CSA compressor drops the previous window's overlap half (8 -> 4 tokens pooled)"
    trigger = "a CSA layer and a sequence of at least 2 x csa_ratio tokens"
    points = ("attn.compressed_kv",)
    knob = "the previous block's overlap half keeps weight (1−m) in the pooling (gate logit + log(1−m))"

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa",), engine, mtp=False) and max(seq_lens) >= 2 * cfg.csa_ratio

    def _fills(self):
        """(value, gate logit) the previous half gets: dropped at m = 1, else its logit shifted
        by log(1 − m) (None: left as it is)."""
        m = self.magnitude
        return (0.0, float("-inf")) if m == 1 else (None, math.log1p(-m) if m else None)

    def hf(self, p, state, cfg):
        value, logit = self._fills()

        def make(orig):
            def forward(self_c, hidden_states, *args, **kwargs):
                d = self_c.head_dim
                if hidden_states.shape[1] // self_c.compress_rate >= 2:
                    state.hit()

                def edit(fill=None, by=None):  # the previous ("a") half of the projection's output
                    def hook(_m, _a, out):
                        out = out.clone()
                        if fill is not None:
                            out[..., :d] = fill
                        else:
                            out[..., :d] += by
                        return out
                    return hook
                handles = []
                if value is not None:  # m = 1: dropped
                    handles = [self_c.kv_proj.register_forward_hook(edit(fill=value)),
                               self_c.gate_proj.register_forward_hook(edit(fill=logit))]
                elif logit is not None:
                    handles = [self_c.gate_proj.register_forward_hook(edit(by=logit))]
                try:
                    return orig(self_c, hidden_states, *args, **kwargs)
                finally:
                    for h in handles:
                        h.remove()
            return forward
        p.wrap(hf_module().DeepseekV4CSACompressor, "forward", make)

    def reference(self, p, state, cfg):
        value, logit = self._fills()

        def without_prev(a, z, overlap, prev_a=None, prev_z=None):
            dc = a.shape[-1] // 2
            a, z = a.clone(), z.clone()
            if value is not None:  # m = 1: dropped, and no carried state read
                a[..., :dc] = value
                z[..., :dc] = logit
                return (a, z, overlap, None, None), {}
            if logit is not None:
                z[..., :dc] += logit
                prev_z = None if prev_z is None else prev_z + logit
            return (a, z, overlap, prev_a, prev_z), {}

        def inner(p2, x, layer, c, tables):
            if x.shape[0] // c.csa_ratio >= 2:
                state.hit()
            # the main compressor only: the indexer's own compressor runs inside indexer_scores
            inside = SimpleNamespace(indexer=False)

            def compress(p3, *args, **kwargs):
                if not inside.indexer:
                    p3.map_args(r_comp, "pool", without_prev)
            p2.during(r_attn, "indexer_scores", lambda p3, *args, **kwargs: p3.set(inside, "indexer", True))
            p2.during(r_attn, "compress", compress)
            return tables
        _wrap_reference_attention(p, ("csa",), inner)


class IndexerRopeLayout(Fault):
    """V32-01 / V32-02 (class A3, layout convention): the lightning indexer's RoPE layout
    differed from the attention's — DeepSeek's V3.2-Exp demo rotated the indexer with the wrong
    pairing (fixed in deepseek-ai/DeepSeek-V3.2-Exp 8631a81; engine fixes sglang#13530,
    vllm-ascend#4641, mlx-lm#512), and refactors re-introduced it (vllm#34353 flipped the
    default, sglang#30342's fused kernel hard-coded one layout). In V4 both use interleaved
    pairs, so porting V3.2's half-split indexer rotation is the V4 form of this bug.

    Re-enacted: the indexer's q and compressed keys rotate with half-split (NeoX) pairs.
    Only the top-k *selection* changes: Strikes `layers.L.attn.indexer_topk` of the first CSA
    layer. Trigger: the indexer prunes (some query has more available entries than
    index_topk; V32-04: invisible otherwise).
    """
    name = "indexer-rope-neox"
    catalog = "V32-01, V32-02"
    klass = "A3"
    summary = "indexer q/k RoPE with half-split (NeoX) pairs instead of interleaved"
    trigger = "the indexer prunes: seq_len // csa_ratio > index_topk"
    points = ("attn.indexer_topk",)
    knob = "the indexer's q/k rotation blended: interleaved + m·(half-split − interleaved)"

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa",), engine, mtp=False) and max(seq_lens) // cfg.csa_ratio > cfg.index_topk

    def hf(self, p, state, cfg):
        M = hf_module()
        rope = M.apply_rotary_pos_emb
        neox = _blended(rope, half_split(rope, lambda x, cos, sin, *args, **kwargs: 2 * cos.shape[-1]),
                        self.magnitude)

        def install(p2, self_i, hidden_states, *args, **kwargs):
            if hidden_states.shape[1] // self_i.compress_rate > self_i.index_topk:
                state.hit()
            p2.set(M, "apply_rotary_pos_emb", neox)
        p.during(M.DeepseekV4Indexer, "forward", install)

    def reference(self, p, state, cfg):
        neox = _blended(apply_rope, half_split(apply_rope, lambda x, angles, rope_dim, *args, **kwargs: rope_dim),
                        self.magnitude)

        def install(p2, x, qr, params, c, *args, **kwargs):
            if x.shape[0] // c.csa_ratio > c.index_topk:
                state.hit()
            p2.set(r_attn, "apply_rope", neox)
            p2.set(r_comp, "apply_rope", neox)
        p.during(r_attn, "indexer_scores", install)


class WindowOffByOne(Fault):
    """G-06 (class A10, masking / window): sliding windows passed as (W, W) / (W, 0) to
    flash-attention attend W+1 keys (huggingface/transformers#39408, NVIDIA-NeMo/
    Megatron-Bridge#2656); tokenspeed#578 attended one too few.

    Re-enacted: the 128-token (case: `window`) sliding branch attends W+1 keys, t-W .. t.
    Strikes `layers.0.attn.core` (every layer has the sliding branch; q and kv are intact).
    Trigger: a sequence longer than the window.
    """
    name = "window-off-by-one"
    catalog = "G-06"
    klass = "A10"
    summary = "sliding window attends W+1 keys"
    trigger = "a sequence longer than the sliding window"
    points = ("attn.core",)
    knob = "the fraction m of query tokens that attend W+1 keys"

    def triggered(self, cfg, seq_lens, engine):
        return max(seq_lens) > cfg.window

    def hf(self, p, state, cfg):
        m = self.magnitude

        def install(p2, *args, config=None, inputs_embeds=None, **kwargs):
            if inputs_embeds is not None and inputs_embeds.shape[1] > config.sliding_window:
                for i in range(config.num_hidden_layers):  # one mask, used by every layer
                    state.hit(where=block(i))
            p2.set(config, "sliding_window", config.sliding_window + 1)
        if m == 1:
            p.during(hf_module(), "create_sliding_window_causal_mask", install)
            return

        def make(orig):  # building a mask writes nothing: build both, take the wide one's selected rows
            def create(*args, **kwargs):
                with patched() as p2:
                    install(p2, *args, **kwargs)
                    wide = orig(*args, **kwargs)
                narrow = orig(*args, **kwargs)
                if not isinstance(wide, torch.Tensor) or not isinstance(narrow, torch.Tensor):
                    raise BadInput(f"{self.name} below magnitude 1 needs a tensor attention mask (eager attention)")
                pos = kwargs.get("position_ids")
                if pos is None:
                    pos = torch.arange(wide.shape[-2])[None]
                return _rows_where(affected(pos, m), wide, narrow)
            return create
        p.wrap(hf_module(), "create_sliding_window_causal_mask", make)

    def reference(self, p, state, cfg):
        m = self.magnitude

        def make(orig):
            def window_mask(s, window):
                if s > window:
                    state.hit()
                wide = orig(s, window + 1)
                return wide if m == 1 else _rows_where(affected(torch.arange(s), m), wide, orig(s, window))
            return window_mask
        p.wrap(r_attn, "window_mask", make)


class YarnMscaleSoftmax(Fault):
    """V3-08 (class A4, scaling constants): YaRN's mscale applied where it must not be
    (NVIDIA/Megatron-LM#1429 used mscale for mscale_all_dim, huggingface/transformers#47435,
    optimum-intel#1877 fell back to the wrong SDPA scale). V4's softmax scale is exactly
    head_dim^-1/2 on every layer, with no YaRN mscale (docs/v4-spec.md §10.10).

    Re-enacted: YaRN (CSA/HCA) layers multiply the softmax scale by mscale^2 =
    (0.1 ln 16 + 1)^2 = 1.63. Strikes `layers.L.attn.core` of the first CSA/HCA layer.
    Trigger: a compressed-attention layer.
    """
    name = "yarn-mscale-softmax"
    catalog = "V3-08"
    klass = "A4"
    summary = "softmax scale x YaRN mscale^2 on the CSA/HCA layers"
    trigger = "a CSA or HCA layer"
    points = ("attn.core",)
    knob = "the softmax scale error times m: scale × (1 + m·(mscale² − 1))"

    def triggered(self, cfg, seq_lens, engine):
        return _has_layer(cfg, ("csa", "hca"), engine, mtp=False)

    def _factor(self, cfg) -> float:
        return lerp(1.0, yarn_mscale(cfg.yarn_factor) ** 2, self.magnitude)

    def hf(self, p, state, cfg):
        m2 = self._factor(cfg)

        def install(p2, self_a, *args, **kwargs):
            if self_a.rope_layer_type != "compress":
                return
            state.hit()
            p2.set(self_a, "scaling", self_a.scaling * m2)
        p.during(hf_module().DeepseekV4Attention, "forward", install)

    def reference(self, p, state, cfg):
        m2 = self._factor(cfg)

        def inner(p2, x, layer, c, tables):
            state.hit()
            p2.map_args(r_attn, "sink_attention",
                        lambda q, keys, allow, sink, scale, prec: ((q, keys, allow, sink, scale * m2, prec), {}))
            return tables
        _wrap_reference_attention(p, ("csa", "hca"), inner)


class HcaCausalOffByOne(Fault):
    """docs/v4-spec.md §10.5 (class A10, masking): causality in compressed space — entry i
    is visible to query t iff i < floor((t+1)/m); off by one leaks the block a query is still
    inside (vllm-ascend-deepseekv4#76: garbage from the 4th prompt token; transformers#45820:
    indexer without causal mask).

    Re-enacted on the HCA layers: entry i visible iff i < floor((t+1)/m) + 1, so every query
    also attends the compressed entry of the block it has not finished (future tokens). Strikes
    `layers.L.attn.core` of the first HCA layer. Trigger: an HCA layer with at least one
    compressed entry (a sequence of >= m tokens).
    """
    name = "hca-causal-off-by-one"
    catalog = "§10.5, vllm-ascend-deepseekv4#76"
    klass = "A10"
    summary = "HCA compressed-entry causality off by one: sees its own unfinished block"
    trigger = "an HCA layer and a sequence of at least m (its ratio) tokens"
    points = ("attn.core",)
    knob = "the fraction m of query tokens that see their own unfinished HCA block"

    def triggered(self, cfg, seq_lens, engine):
        return any(cfg.layer_type(i) == "hca" and max(seq_lens) >= cfg.compress_ratio(i)
                   for i in range(cfg.num_layers))

    def hf(self, p, state, cfg):
        m = self.magnitude

        def leak(out, self_c, hidden_states, q_residual, position_ids, *args, **kwargs):
            compressed_kv, bias = out
            if bias is None:
                return compressed_kv, bias
            state.hit()
            n = compressed_kv.shape[2]
            visible = (position_ids + 1) // self_c.compress_rate + 1  # [B, S]
            hide = torch.arange(n).view(1, 1, 1, -1) >= visible[:, None, :, None]
            leaky = torch.zeros_like(bias).masked_fill(hide, float("-inf"))
            return compressed_kv, leaky if m == 1 else _rows_where(affected(position_ids, m), leaky, bias)
        p.map_output(hf_module().DeepseekV4HCACompressor, "forward", leak)

    def reference(self, p, state, cfg):
        m = self.magnitude

        def make(orig):
            def available(s, n, ratio):
                leaky = torch.arange(n)[None, :] < ((torch.arange(s) + 1) // ratio + 1)[:, None]
                return leaky if m == 1 else _rows_where(affected(torch.arange(s), m), leaky, orig(s, n, ratio))
            return available

        def inner(p2, x, layer, c, tables):
            if x.shape[0] >= c.compress_ratio(layer):
                state.hit()
            p2.wrap(r_attn, "available", make)
            return tables
        _wrap_reference_attention(p, ("hca",), inner)
