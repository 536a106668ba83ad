"""Attention of one layer: sliding window, CSA (compressed + lightning indexer), HCA
(docs/v4-spec.md §5). Stateless, one sequence at positions 0..S-1."""
from __future__ import annotations

import torch

from .compressor import compress
from .config import ModelConfig
from .precision import Precision
from .primitives import apply_rope, linear, rms_norm, rms_unit, rope_angles
from .quant import fp4_sim, fp8_sim, rotate, round_input


def sub(p: dict, prefix: str) -> dict:
    """The entries of `p` under `prefix.` with the prefix removed."""
    k = len(prefix) + 1
    return {name[k:]: t for name, t in p.items() if name.startswith(prefix + ".")}


def window_mask_at(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[Q, K] bool: the query at position t sees the key at position s iff t - window < s <= t
    (the window includes the query)."""
    t, k = q_pos[:, None], k_pos[None, :]
    return (k <= t) & (k > t - window)


def window_mask(s: int, window: int) -> torch.Tensor:
    """[S, S]: `window_mask_at` for one sequence at positions 0..S-1."""
    return window_mask_at(torch.arange(s), torch.arange(s), window)


def available_at(q_pos: torch.Tensor, n: int, ratio: int) -> torch.Tensor:
    """[Q, n] bool: entry i is visible to the query at position t iff i < floor((t+1)/m)
    (docs/v4-spec.md §5.5)."""
    return torch.arange(n)[None, :] < ((q_pos + 1) // ratio)[:, None]


def available(s: int, n: int, ratio: int) -> torch.Tensor:
    """[S, n]: `available_at` for positions 0..S-1."""
    return available_at(torch.arange(s), n, ratio)


def indexer_keys_sims(prec: Precision, sims: bool) -> str | None:
    """How the indexer's compressed keys are stored: the demo's FP4 QAT sim, an FP8 serving
    engine's e4m3 cache, or not at all."""
    return "fp4" if sims else ("fp8-index" if prec.fp8_cache else None)


def indexer_scores(x, qr, p: dict, cfg: ModelConfig, freqs, angles, prec: Precision, sims: bool, rec):
    """Lightning indexer (docs/v4-spec.md §5.7): scores [S, n] with unavailable entries at -inf."""
    keys = compress(x, sub(p, "compressor"), ratio=cfg.csa_ratio, overlap=True, norm_eps=cfg.rms_eps,
                    freqs=freqs, rope_dim=cfg.rope_dim, prec=prec, sims=indexer_keys_sims(prec, sims))
    rec("indexer_keys", keys)
    return score_entries(x, qr, p, cfg, angles, keys, torch.arange(x.shape[0]), prec, sims)


def score_entries(x, qr, p: dict, cfg: ModelConfig, angles, keys, q_pos, prec: Precision, sims: bool):
    """Indexer scores [Q, n] of queries at positions `q_pos` against compressed keys [n, d]."""
    pol = prec.policy
    s = x.shape[0]
    q = linear(qr, p["wq_b.weight"], pol.split_k, pol.fp8_linear_in).view(s, cfg.index_n_heads, cfg.index_head_dim)  # no per-head norm
    q = apply_rope(q, angles, cfg.rope_dim, acc=prec.acc, trig=pol.rope_table)
    if sims:
        q = fp4_sim(rotate(q), 32)
    elif prec.fp8_cache:  # FP8 serving engines: e4m3 queries, one scale per head vector
        q = fp8_sim(q, cfg.index_head_dim)
    w = linear(x, p["weights_proj.weight"], pol.split_k, pol.bf16_linear_in) * (cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
    # sum_h w[t,h] * relu(q[t,h] . k[i]), in the policy's dtype (the demo: activations)
    sdt = pol.index_scores
    score = torch.einsum("shd,nd->shn", q.to(sdt), keys.to(sdt)).relu()  # [Q, H, n]
    score = (score * w.to(sdt)[..., None]).sum(1)  # [Q, n]
    n = keys.shape[0]
    return score.masked_fill(~available_at(q_pos, n, cfg.csa_ratio), float("-inf"))


def select_topk(scores: torch.Tensor, k_max: int, ratio: int, q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """top-min(k_max, n) entries per query; picks beyond the causal limit become -1. Result is
    padded with -1 to width k_max (the canonical [T, K] layout). `q_pos`: the queries'
    positions (default 0..S-1)."""
    s, n = scores.shape
    out = torch.full((s, k_max), -1, dtype=torch.long)
    k = min(k_max, n)
    if k == 0:
        return out
    idx = scores.topk(k, dim=-1).indices
    limit = (((torch.arange(s) if q_pos is None else q_pos) + 1) // ratio)[:, None]
    out[:, :k] = torch.where(idx < limit, idx, -1)
    return out


def sink_attention(q, keys, allow, sink, scale: float, prec: Precision) -> torch.Tensor:
    """o[t,h] = sum_j p_j k_j with p = exp(z_j) / (sum_j exp(z_j) + exp(sink_h)) over the allowed
    keys; the sink is a logit with zero value, not scaled (docs/v4-spec.md §5.8). K = V."""
    acc, sdt = prec.acc, prec.policy.attn_scores
    z = (torch.einsum("shd,jd->hsj", q.to(sdt), keys.to(sdt)) * scale).to(acc)  # [H, S, J], q.k in sdt
    z = z.masked_fill(~allow[None], float("-inf"))
    sink_logit = sink.to(acc)[:, None, None].expand(-1, z.shape[1], 1)
    logits = torch.cat([z, sink_logit], -1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    # the demo casts probabilities to the activation dtype before P.V, accumulates in fp32
    probs = probs.to(prec.act).to(acc)
    o = torch.einsum("hsj,jd->shd", probs, keys.to(acc))
    return o.to(prec.act)


def project_q(x, p: dict, cfg: ModelConfig, angles, prec: Precision, rec):
    """(qr [S, q_lora], q [S, H, hd]) with RoPE at `angles`."""
    pol, s, eps = prec.policy, x.shape[0], cfg.rms_eps
    qr = rms_norm(linear(x, p["wq_a.weight"], pol.split_k, pol.fp8_linear_in), p["q_norm.weight"], eps, prec.acc)
    rec("qr", qr)
    q = linear(qr, p["wq_b.weight"], pol.split_k, pol.fp8_linear_in).view(s, cfg.num_heads, cfg.head_dim)
    q = rms_unit(q, eps, pol.q_norm)
    q = apply_rope(q, angles, cfg.rope_dim, acc=prec.acc, trig=pol.rope_table)
    rec("q", q)
    return qr, q


def kv_cache_sims(prec: Precision, sims: bool) -> str | None:
    """How the KV cache and the main compressor's entries store their non-RoPE dims: FP8
    (the demo's QAT sim, or an FP8 serving engine), or not at all."""
    return "fp8" if (sims or prec.fp8_cache) else None


def project_kv(x, p: dict, cfg: ModelConfig, angles, prec: Precision, sims: bool, rec):
    """The shared key/value rows [S, hd] (K = V), as the KV cache holds them."""
    pol, rd = prec.policy, cfg.rope_dim
    kv = rms_norm(linear(x, p["wkv.weight"], pol.split_k, pol.fp8_linear_in), p["kv_norm.weight"], cfg.rms_eps, prec.acc)
    kv = apply_rope(kv, angles, rd, acc=prec.acc, trig=pol.rope_table)
    if kv_cache_sims(prec, sims):  # the KV cache holds the non-RoPE dims in FP8
        kv = torch.cat([fp8_sim(kv[..., :-rd], 64), kv[..., -rd:]], -1)
    rec("kv", kv)
    return kv


def attend_and_project(q, keys, allow, angles, p: dict, cfg: ModelConfig, prec: Precision, rec):
    """Sink attention over the allowed keys, de-rotation at the query position, grouped
    low-rank output projection. q [S, H, hd], keys [J, hd], allow [S, J]. Returns [S, D]."""
    s = q.shape[0]
    o = sink_attention(q, keys, allow, p["attn_sink"], cfg.head_dim ** -0.5, prec)  # [S, H, hd]
    o = apply_rope(o, angles, cfg.rope_dim, inverse=True, acc=prec.acc, trig=prec.policy.rope_table)
    rec("core", o)
    # grouped low-rank output projection: group g = heads g*H/G ... contiguous (docs/v4-spec.md §5.9)
    g = cfg.o_groups
    wo_a = p["wo_a.weight"].to(o.dtype).view(g, cfg.o_lora_rank, -1)  # [G, r, H/G*hd]
    o_in = round_input(o.reshape(s, g, -1), prec.policy.fp8_linear_in)  # each group's input row, as its matmul reads it
    r = torch.einsum("sgd,grd->sgr", o_in, wo_a)  # [S, G, r]
    return linear(r.reshape(s, -1), p["wo_b.weight"], prec.policy.split_k, prec.policy.fp8_linear_in)


def chosen_entries(topk: torch.Tensor, n: int) -> torch.Tensor:
    """[S, n] bool: the entries each query's top-k picked (-1 = none)."""
    chosen = torch.zeros(topk.shape[0], n + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(topk >= 0, topk, n), True)
    return chosen[:, :n]


def layer_rope(cfg: ModelConfig, layer: int, tables: dict):
    """(kind, RoPE frequencies) of a layer: 'main' table for sliding layers (and the MTP block,
    layer == num_layers, ratio 0), 'compress' for CSA/HCA."""
    kind = cfg.layer_type(layer)
    return kind, tables["main" if kind == "sliding" else "compress"]


def indexer_choice(x, qr, p: dict, cfg: ModelConfig, freqs, angles, n: int, ratio: int, prec: Precision,
                   sims: bool, rec) -> torch.Tensor:
    """CSA: [S, n] bool, the compressed entries the lightning indexer picks per query."""
    scores = indexer_scores(x, qr, sub(p, "indexer"), cfg, freqs, angles, prec, sims, rec)  # [S, n]
    rec("indexer_scores", scores)
    topk = select_topk(scores, cfg.index_topk, ratio)  # [S, index_topk], -1 = none
    rec("indexer_topk", topk)
    return chosen_entries(topk, n)


def compressed_keys(x, qr, p: dict, layer: int, cfg: ModelConfig, freqs, angles, prec: Precision, sims: bool, rec):
    """CSA / HCA: the compressed entries [n, hd] and which of them each query attends [S, n]."""
    kind, ratio = cfg.layer_type(layer), cfg.compress_ratio(layer)
    comp = compress(x, sub(p, "compressor"), ratio=ratio, overlap=(kind == "csa"), norm_eps=cfg.rms_eps,
                    freqs=freqs, rope_dim=cfg.rope_dim, prec=prec, sims=kv_cache_sims(prec, sims))
    rec("compressed_kv", comp)
    n = comp.shape[0]
    if kind == "csa":
        return comp, indexer_choice(x, qr, p, cfg, freqs, angles, n, ratio, prec, sims, rec)
    return comp, available(x.shape[0], n, ratio)


def attention(x, p: dict, layer: int, cfg: ModelConfig, tables: dict, prec: Precision, sims: bool, rec):
    """x: [S, D] attention input (after attn_norm), one sequence at positions 0..S-1. Returns [S, D]."""
    s = x.shape[0]
    kind, freqs = layer_rope(cfg, layer, tables)
    angles = rope_angles(torch.arange(s), freqs, prec.policy.rope_iterated)  # [S, rd/2]
    qr, q = project_q(x, p, cfg, angles, prec, rec)
    kv = project_kv(x, p, cfg, angles, prec, sims, rec)  # [S, hd]
    keys, allow = kv, window_mask(s, cfg.window)  # [S, hd], [S, S]
    if kind != "sliding":
        comp, visible = compressed_keys(x, qr, p, layer, cfg, freqs, angles, prec, sims, rec)  # [n, hd], [S, n]
        keys, allow = torch.cat([kv, comp], 0), torch.cat([allow, visible], 1)
    return attend_and_project(q, keys, allow, angles, p, cfg, prec, rec)
