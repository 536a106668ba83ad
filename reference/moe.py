"""MoE block: sqrtsoftplus router with selection-only bias, hash routing, clamped SwiGLU
experts and the shared expert (docs/v4-spec.md §6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .precision import Precision
from .primitives import linear


def route(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec):
    """Returns (expert ids [T, k], weights [T, k] in acc). docs/v4-spec.md §6.2."""
    if prec.alt_placement:  # router in the activation dtype (logits, scores and weights)
        logits = linear(y, p["gate.weight"])
        scores = F.softplus(logits).sqrt()
    else:
        logits = y.to(prec.acc) @ p["gate.weight"].to(prec.acc).T
        scores = F.softplus(logits).sqrt()
    rec("router_logits", logits)
    if cfg.is_hash_layer(layer):
        idx = p["gate.tid2eid"][ids].long()  # fixed table: which experts, independent of y
    else:
        biased = scores.to(prec.acc) + p["gate.bias"].to(prec.acc)  # bias affects the selection only
        rec("selection_scores", biased)
        idx = biased.topk(cfg.experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    w = (w / w.sum(-1, keepdim=True) * cfg.route_scale).to(prec.acc)
    return idx, w


ROW_TILE = 16


def expert_weights(p: dict, prefix: str, dtype) -> tuple:
    """(w1, w3, w2) of one routed expert in `dtype` (cast here, one expert at a time)."""
    return tuple(p[f"{prefix}.{w}.weight"].to(dtype) for w in ("w1", "w3", "w2"))


def _per_tile(tok: torch.Tensor, fn) -> tuple:
    """fn(rows) on fixed-size tiles of the token indices `tok` (the last tile padded with
    token 0, whose results are dropped); fn returns a tuple of per-row tensors, concatenated.
    Every GEMM then has ROW_TILE rows whatever the number of tokens: a row's result does not
    depend on how many other rows an expert received."""
    n = tok.numel()
    padded = torch.cat([tok, tok.new_zeros(-n % ROW_TILE)])
    parts = [fn(rows) for rows in padded.split(ROW_TILE)]
    return tuple(torch.cat(col)[:n] for col in zip(*parts))


def swiglu_hidden(y, w1, w3, limit: float, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(min(g, limit)) * clamp(u, -limit, limit) in acc (docs/v4-spec.md §6.3: gate clamped from above
    only, up on both sides); also, per row, how many pre-activations were clamped (coverage)."""
    g = linear(y, w1).to(acc)
    u = linear(y, w3).to(acc)
    hits = (g > limit).sum(-1) + (u.abs() > limit).sum(-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit), hits


def moe(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec, stats: dict):
    """y: [T, D] FFN input after ffn_norm; ids: [T] token ids. Returns [T, D]."""
    idx, w = route(y, ids, p, layer, cfg, prec, rec)
    order = torch.sort(idx, dim=-1)
    rec("experts", order.values)
    rec("weights", w.gather(1, order.indices))
    if prec.alt_placement:
        out = _moe_alt(y, idx, w, p, cfg, prec)
        stats["clamp_hits"] = stats.get("clamp_hits", 0) + int(_count_clamps(y, idx, p, cfg))
        stats.setdefault("experts_used", set()).update(torch.unique(idx).tolist())
        return out
    out = torch.zeros(y.shape[0], y.shape[1], dtype=prec.acc)
    clamp_hits = 0
    # Each used expert runs only on its own tokens, in fixed-shape row tiles (`_per_tile`), and
    # a token adds its experts in expert-id order: a token's result is independent of which
    # other tokens chose which experts (batch-invariant), so causality checks can demand bit
    # equality, and the cost follows the routed work.
    for e in torch.unique(idx).tolist():
        chosen = idx == e
        tok = torch.where(chosen.any(-1))[0]
        ep = f"experts.{e}"
        weight = (w * chosen).sum(-1, keepdim=True)  # this expert's routing weight per token

        w1, w3, w2 = expert_weights(p, ep, prec.act)

        def expert(rows, w1=w1, w3=w3, w2=w2, weight=weight):
            h, hits = swiglu_hidden(y[rows], w1, w3, cfg.swiglu_limit, prec.acc)
            h = weight[rows] * h  # routing weight applied before w2
            return linear(h.to(prec.act), w2).to(prec.acc), hits

        contrib, hits = _per_tile(tok, expert)
        clamp_hits += int(hits.sum())
        out[tok] += contrib
    h, hits = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit, prec.acc)
    clamp_hits += int(hits.sum())
    out += linear(h.to(prec.act), p["shared_experts.w2.weight"]).to(prec.acc)
    stats["clamp_hits"] = stats.get("clamp_hits", 0) + clamp_hits
    stats.setdefault("experts_used", set()).update(torch.unique(idx).tolist())
    return out.to(prec.act)


def _count_clamps(y, idx, p, cfg) -> int:
    hits = 0
    for e in torch.unique(idx).tolist():
        tok = torch.where((idx == e).any(-1))[0]
        _, h = swiglu_hidden(y[tok], p[f"experts.{e}.w1.weight"], p[f"experts.{e}.w3.weight"], cfg.swiglu_limit, y.dtype)
        hits += int(h.sum())
    _, h = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit, y.dtype)
    return hits + int(h.sum())


def _moe_alt(y, idx, w, p, cfg, prec):
    """Another honest placement (transformers-style): SwiGLU in the activation dtype, routing
    weight applied after w2, routed outputs accumulated in the activation dtype."""
    act = prec.act
    out = torch.zeros_like(y)
    for e in torch.unique(idx).tolist():
        chosen = idx == e
        tok = torch.where(chosen.any(-1))[0]
        ep = f"experts.{e}"
        weight = (w * chosen).sum(-1, keepdim=True).to(act)

        w1, w3, w2 = expert_weights(p, ep, act)

        def expert(rows, w1=w1, w3=w3, w2=w2, weight=weight):
            h, _ = swiglu_hidden(y[rows], w1, w3, cfg.swiglu_limit, act)
            return (linear(h, w2) * weight[rows],)

        out[tok] += _per_tile(tok, expert)[0]
    h, _ = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit, act)
    return out + linear(h, p["shared_experts.w2.weight"])
