"""Attention of one layer: sliding window, CSA (compressed + lightning indexer), HCA
(docs/v4-spec.md §5). Stateless, one sequence at positions 0..S-1."""
from __future__ import annotations

import torch

from .compressor import compress
from .config import ModelConfig
from .precision import Precision
from .primitives import apply_rope, linear, rms_norm, rms_unit, rope_angles
from .quant import fp4_sim, fp8_sim, rotate


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
    s = x.shape[0]
    q = linear(qr, p["wq_b.weight"]).view(s, cfg.index_n_heads, cfg.index_head_dim)  # no per-head norm
    trig = prec.act if prec.alt_placement else None
    q = apply_rope(q, angles, cfg.rope_dim, acc=prec.acc, trig=trig)
    if sims:
        q = fp4_sim(rotate(q), 32)
    elif prec.fp8_cache:  # FP8 serving engines: e4m3 queries, one scale per head vector
        q = fp8_sim(q, cfg.index_head_dim)
    w = linear(x, p["weights_proj.weight"]) * (cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5)
    # sum_h w[t,h] * relu(q[t,h] . k[i]); in the activation dtype like the demo (the
    # alternative placement scores in acc, as transformers does)
    sdt = prec.acc if prec.alt_placement else prec.act
    score = torch.einsum("shd,nd->shn", q.to(sdt), keys.to(sdt)).relu()
    score = (score * w.to(sdt)[..., None]).sum(1)
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
    acc = prec.acc
    if prec.alt_placement:  # scores q.k in the activation dtype, softmax in acc
        z = (torch.einsum("shd,jd->hsj", q, keys.to(q.dtype)) * scale).to(acc)
    else:
        z = torch.einsum("shd,jd->hsj", q.to(acc), keys.to(acc)) * scale
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
    s, eps = x.shape[0], cfg.rms_eps
    trig = prec.act if prec.alt_placement else None
    qr = rms_norm(linear(x, p["wq_a.weight"]), p["q_norm.weight"], eps, prec.acc)
    rec("qr", qr)
    q = linear(qr, p["wq_b.weight"]).view(s, cfg.num_heads, cfg.head_dim)
    if prec.alt_placement:  # mean of squares in acc, multiply in the activation dtype
        q = q * torch.rsqrt(q.to(prec.acc).square().mean(-1, keepdim=True) + eps).to(q.dtype)
    else:
        q = rms_unit(q, eps)
    q = apply_rope(q, angles, cfg.rope_dim, acc=prec.acc, trig=trig)
    rec("q", q)
    return qr, q


def project_kv(x, p: dict, cfg: ModelConfig, angles, prec: Precision, sims: bool, rec):
    """The shared key/value rows [S, hd] (K = V), as the KV cache holds them."""
    rd = cfg.rope_dim
    kv = rms_norm(linear(x, p["wkv.weight"]), p["kv_norm.weight"], cfg.rms_eps, prec.acc)
    kv = apply_rope(kv, angles, rd, acc=prec.acc, trig=prec.act if prec.alt_placement else None)
    if sims or prec.fp8_cache:  # the KV cache holds the non-RoPE dims in FP8
        kv = torch.cat([fp8_sim(kv[..., :-rd], 64), kv[..., -rd:]], -1)
    rec("kv", kv)
    return kv


def attend_and_project(q, keys, allow, angles, p: dict, cfg: ModelConfig, prec: Precision, rec):
    """Sink attention over the allowed keys, de-rotation at the query position, grouped
    low-rank output projection. Returns [S, D]."""
    s = q.shape[0]
    o = sink_attention(q, keys, allow, p["attn_sink"], cfg.head_dim ** -0.5, prec)
    trig = prec.act if prec.alt_placement else None
    o = apply_rope(o, angles, cfg.rope_dim, inverse=True, acc=prec.acc, trig=trig)  # de-rotate at the query position
    rec("core", o)
    # grouped low-rank output projection: group g = heads g*H/G ... contiguous (docs/v4-spec.md §5.9)
    g = cfg.o_groups
    wo_a = p["wo_a.weight"].to(o.dtype).view(g, cfg.o_lora_rank, -1)
    r = torch.einsum("sgd,grd->sgr", o.reshape(s, g, -1), wo_a)
    return linear(r.reshape(s, -1), p["wo_b.weight"])


def chosen_entries(topk: torch.Tensor, n: int) -> torch.Tensor:
    """[S, n] bool: the entries each query's top-k picked (-1 = none)."""
    chosen = torch.zeros(topk.shape[0], n + 1, dtype=torch.bool)
    chosen.scatter_(1, torch.where(topk >= 0, topk, n), True)
    return chosen[:, :n]


def attention(x, p: dict, layer: int, cfg: ModelConfig, tables: dict, prec: Precision, sims: bool, rec):
    """x: [S, D] attention input (after attn_norm), one sequence at positions 0..S-1. Returns [S, D]."""
    s = x.shape[0]
    kind = cfg.layer_type(layer)  # layer == num_layers is the MTP block (ratio 0: sliding)
    freqs = tables["main" if kind == "sliding" else "compress"]
    angles = rope_angles(torch.arange(s), freqs)
    qr, q = project_q(x, p, cfg, angles, prec, rec)
    kv = project_kv(x, p, cfg, angles, prec, sims, rec)
    keys, allow = kv, window_mask(s, cfg.window)
    if kind != "sliding":
        ratio = cfg.compress_ratio(layer)
        comp = compress(x, sub(p, "compressor"), ratio=ratio, overlap=(kind == "csa"), norm_eps=cfg.rms_eps,
                        freqs=freqs, rope_dim=cfg.rope_dim, prec=prec, sims="fp8" if (sims or prec.fp8_cache) else None)
        rec("compressed_kv", comp)
        n = comp.shape[0]
        visible = available(s, n, ratio)
        if kind == "csa":
            scores = indexer_scores(x, qr, sub(p, "indexer"), cfg, freqs, angles, prec, sims, rec)
            rec("indexer_scores", scores)
            topk = select_topk(scores, cfg.index_topk, ratio)
            rec("indexer_topk", topk)
            visible = chosen_entries(topk, n)
        keys = torch.cat([kv, comp], 0)
        allow = torch.cat([allow, visible], 1)
    return attend_and_project(q, keys, allow, angles, p, cfg, prec, rec)
