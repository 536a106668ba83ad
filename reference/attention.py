"""Attention of one layer: sliding window, CSA (compressed + lightning indexer), HCA
(spec §5). Stateless, one sequence at positions 0..S-1."""
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


def window_mask(s: int, window: int) -> torch.Tensor:
    """[S, S] bool: query t sees s with t - window < s <= t (the window includes the query)."""
    t = torch.arange(s)[:, None]
    k = torch.arange(s)[None, :]
    return (k <= t) & (k > t - window)


def available(s: int, n: int, ratio: int) -> torch.Tensor:
    """[S, n] bool: entry i is visible to query t iff i < floor((t+1)/m) (spec §5.5)."""
    return torch.arange(n)[None, :] < ((torch.arange(s) + 1) // ratio)[:, None]


def indexer_scores(x, qr, p: dict, cfg: ModelConfig, freqs, angles, prec: Precision, sims: bool, rec):
    """Lightning indexer (spec §5.7): scores [S, n] with unavailable entries at -inf."""
    s = x.shape[0]
    keys = compress(x, sub(p, "compressor"), ratio=cfg.csa_ratio, overlap=True, norm_eps=cfg.rms_eps,
                    freqs=freqs, rope_dim=cfg.rope_dim, prec=prec,
                    sims="fp4" if sims else ("fp8-index" if prec.fp8_cache else None))
    rec("indexer_keys", keys)
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
    return score.masked_fill(~available(s, n, cfg.csa_ratio), float("-inf"))


def select_topk(scores: torch.Tensor, k_max: int, ratio: int) -> torch.Tensor:
    """top-min(k_max, n) entries per query; picks beyond the causal limit become -1. Result is
    padded with -1 to width k_max (the canonical [T, K] layout)."""
    s, n = scores.shape
    out = torch.full((s, k_max), -1, dtype=torch.long)
    k = min(k_max, n)
    if k == 0:
        return out
    idx = scores.topk(k, dim=-1).indices
    limit = ((torch.arange(s) + 1) // ratio)[:, None]
    out[:, :k] = torch.where(idx < limit, idx, -1)
    return out


def sink_attention(q, keys, allow, sink, scale: float, prec: Precision) -> torch.Tensor:
    """o[t,h] = sum_j p_j k_j with p = exp(z_j) / (sum_j exp(z_j) + exp(sink_h)) over the allowed
    keys; the sink is a logit with zero value, not scaled (spec §5.8). K = V."""
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


def attention(x, p: dict, layer: int, cfg: ModelConfig, tables: dict, prec: Precision, sims: bool, rec):
    """x: [S, D] attention input (after attn_norm). Returns [S, D]."""
    s = x.shape[0]
    kind = cfg.layer_type(layer)  # layer == num_layers is the MTP block (ratio 0: sliding)
    freqs = tables["main" if kind == "sliding" else "compress"]
    angles = rope_angles(torch.arange(s), freqs)
    rd, eps = cfg.rope_dim, cfg.rms_eps

    trig = prec.act if prec.alt_placement else None
    qr = rms_norm(linear(x, p["wq_a.weight"]), p["q_norm.weight"], eps, prec.acc)
    rec("qr", qr)
    q = linear(qr, p["wq_b.weight"]).view(s, cfg.num_heads, cfg.head_dim)
    if prec.alt_placement:  # mean of squares in acc, multiply in the activation dtype
        q = q * torch.rsqrt(q.to(prec.acc).square().mean(-1, keepdim=True) + eps).to(q.dtype)
    else:
        q = rms_unit(q, eps)
    q = apply_rope(q, angles, rd, acc=prec.acc, trig=trig)
    rec("q", q)
    kv = rms_norm(linear(x, p["wkv.weight"]), p["kv_norm.weight"], eps, prec.acc)
    kv = apply_rope(kv, angles, rd, acc=prec.acc, trig=trig)
    kv_fp8 = sims or prec.fp8_cache  # the KV cache holds the non-RoPE dims in FP8
    if kv_fp8:
        kv = torch.cat([fp8_sim(kv[..., :-rd], 64), kv[..., -rd:]], -1)
    rec("kv", kv)

    keys, allow = kv, window_mask(s, cfg.window)
    if kind != "sliding":
        ratio = cfg.compress_ratio(layer)
        comp = compress(x, sub(p, "compressor"), ratio=ratio, overlap=(kind == "csa"), norm_eps=eps,
                        freqs=freqs, rope_dim=rd, prec=prec, sims="fp8" if kv_fp8 else None)
        rec("compressed_kv", comp)
        n = comp.shape[0]
        visible = available(s, n, ratio)
        if kind == "csa":
            scores = indexer_scores(x, qr, sub(p, "indexer"), cfg, freqs, angles, prec, sims, rec)
            rec("indexer_scores", scores)
            topk = select_topk(scores, cfg.index_topk, ratio)
            rec("indexer_topk", topk)
            chosen = torch.zeros(s, n + 1, dtype=torch.bool)
            chosen.scatter_(1, torch.where(topk >= 0, topk, n), True)
            visible = chosen[:, :n]
        keys = torch.cat([kv, comp], 0)
        allow = torch.cat([allow, visible], 1)

    o = sink_attention(q, keys, allow, p["attn_sink"], cfg.head_dim ** -0.5, prec)
    o = apply_rope(o, angles, rd, inverse=True, acc=prec.acc, trig=trig)  # de-rotate at the query position
    rec("core", o)
    # grouped low-rank output projection: group g = heads g*H/G ... contiguous (spec §5.9)
    g = cfg.o_groups
    wo_a = p["wo_a.weight"].to(o.dtype).view(g, cfg.o_lora_rank, -1)
    r = torch.einsum("sgd,grd->sgr", o.reshape(s, g, -1), wo_a)
    return linear(r.reshape(s, -1), p["wo_b.weight"])
