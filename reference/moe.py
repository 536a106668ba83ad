"""MoE block: sqrtsoftplus router with selection-only bias, hash routing, clamped SwiGLU
experts and the shared expert (spec §6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .precision import Precision
from .primitives import linear


def route(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec):
    """Returns (expert ids [T, k], weights [T, k] in acc). Spec §6.2."""
    logits = y.to(prec.acc) @ p["gate.weight"].to(prec.acc).T
    scores = F.softplus(logits).sqrt()
    rec("router_logits", logits)
    if cfg.is_hash_layer(layer):
        idx = p["gate.tid2eid"][ids].long()  # fixed table: which experts, independent of y
    else:
        biased = scores + p["gate.bias"].to(prec.acc)  # bias affects the selection only
        rec("selection_scores", biased)
        idx = biased.topk(cfg.experts_per_tok, dim=-1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True) * cfg.route_scale
    return idx, w


def swiglu_hidden(y, w1, w3, limit: float, acc) -> tuple[torch.Tensor, int]:
    """silu(min(g, limit)) * clamp(u, -limit, limit) in acc; also the number of clamped
    pre-activations (coverage)."""
    g = linear(y, w1).to(acc)
    u = linear(y, w3).to(acc)
    hits = int((g > limit).sum()) + int((u.abs() > limit).sum())
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit), hits


def moe(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec, stats: dict):
    """y: [T, D] FFN input after ffn_norm; ids: [T] token ids. Returns [T, D]."""
    idx, w = route(y, ids, p, layer, cfg, prec, rec)
    order = torch.sort(idx, dim=-1)
    rec("experts", order.values)
    rec("weights", w.gather(1, order.indices))
    out = torch.zeros(y.shape[0], y.shape[1], dtype=prec.acc)
    clamp_hits = 0
    for e in torch.unique(idx).tolist():
        tok, slot = torch.where(idx == e)
        ep = f"experts.{e}"
        h, hits = swiglu_hidden(y[tok], p[f"{ep}.w1.weight"], p[f"{ep}.w3.weight"], cfg.swiglu_limit, prec.acc)
        clamp_hits += hits
        h = w[tok, slot, None] * h  # routing weight applied before w2
        out.index_add_(0, tok, linear(h.to(prec.act), p[f"{ep}.w2.weight"]).to(prec.acc))
    h, hits = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit, prec.acc)
    clamp_hits += hits
    out += linear(h.to(prec.act), p["shared_experts.w2.weight"]).to(prec.acc)
    stats["clamp_hits"] = stats.get("clamp_hits", 0) + clamp_hits
    stats.setdefault("experts_used", set()).update(torch.unique(idx).tolist())
    return out.to(prec.act)
