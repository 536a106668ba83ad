"""MoE block: sqrtsoftplus router with selection-only bias, hash routing, clamped SwiGLU
experts and the shared expert (docs/v4-spec.md §6). Where it rounds is read from `prec.policy`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .precision import Precision
from .primitives import gemm, linear


def route(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec):
    """Returns (expert ids [T, k], weights [T, k] in acc). docs/v4-spec.md §6.2."""
    logits = gemm(y, p["gate.weight"], prec.policy.router)  # [T, E]
    scores = F.softplus(logits).sqrt()
    rec("router_logits", logits)
    if cfg.is_hash_layer(layer):
        idx = p["gate.tid2eid"][ids].long()  # fixed table: which experts, independent of y
    else:
        biased = scores.to(prec.acc) + p["gate.bias"].to(prec.acc)  # bias affects the selection only
        rec("selection_scores", biased)
        idx = biased.topk(cfg.experts_per_tok, dim=-1).indices
    return idx, routing_weights(scores, idx, cfg, prec)


def routing_weights(scores, idx, cfg: ModelConfig, prec: Precision) -> torch.Tensor:
    """The chosen experts' scores normalised over the token's choice, times route_scale (in acc)."""
    w = scores.gather(1, idx)
    return (w / w.sum(-1, keepdim=True) * cfg.route_scale).to(prec.acc)


def given_choices(y, idx, w, given, p: dict, layer: int, cfg: ModelConfig, prec: Precision) -> tuple:
    """(ids, weights) to run the experts with when the choice is given (teacher forcing on an
    engine's own expert ids, or the noise model's honest runs on the float64 reference's): on a
    learned-routing layer every row of `given` [T, k] that names k distinct valid experts other
    than the router's own set replaces the router's choice, its weights recomputed from this
    router's scores; hash layers, malformed rows, rows naming the router's own set and a `given`
    of another shape keep the router's own (bit for bit). The router's own choice is what `moe`
    records: the choice itself is judged against it, while everything after the choice is
    computed on the given one (docs/tolerances.md, Localization). The router GEMM runs again
    here (T x D x E, small beside the experts) only when a row is replaced, so `route`, which
    faults patch, keeps its signature."""
    if given is None or cfg.is_hash_layer(layer) or tuple(given.shape) != tuple(idx.shape):
        return idx, w
    g = given.long()
    valid = ((g >= 0) & (g < cfg.n_routed_experts)).all(-1)
    distinct = (g.sort(-1).values.diff(dim=-1) != 0).all(-1)
    same = (g.sort(-1).values == idx.sort(-1).values).all(-1)  # the router's own set: its own order and sums
    ok = valid & distinct & ~same
    if not bool(ok.any()):
        return idx, w
    logits = gemm(y, p["gate.weight"], prec.policy.router)
    chosen = torch.where(ok[:, None], g.clamp(0, cfg.n_routed_experts - 1), idx)
    return chosen, routing_weights(F.softplus(logits).sqrt(), chosen, cfg, prec)


ROW_TILE = 16


def expert_weights(p: dict, prefix: str, dtype) -> tuple:
    """(w1, w3, w2) of one routed expert in `dtype` (cast here, one expert at a time)."""
    return tuple(p[f"{prefix}.{w}.weight"].to(dtype) for w in ("w1", "w3", "w2"))


def _padded(x: torch.Tensor) -> torch.Tensor:
    """x with zero rows appended up to a multiple of ROW_TILE rows.

    Batch invariance: a row's result must not depend on how many other rows an expert received.
    Every GEMM here has a multiple of ROW_TILE rows, and for such shapes the CPU GEMM computes
    each row with the same kernel and the same reduction order over K whatever the row count
    (tests/test_invariants.py checks it bit for bit on the shapes the cases use, in float32 and
    float64, one and two threads), so one GEMM over all of an expert's rows gives exactly the
    rows that ROW_TILE-row tiles would: the routed work is read once per expert, not once per
    tile. Fewer than ROW_TILE rows (GEMV paths) and odd row counts are what the padding avoids;
    padded rows (token 0, weight 0) are dropped."""
    return torch.cat([x, x.new_zeros((-x.shape[0] % ROW_TILE,) + tuple(x.shape[1:]))])


def swiglu_hidden(y, w1, w3, limit: float, acc, split_k: int = 1, round_in: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """silu(min(g, limit)) * clamp(u, -limit, limit) in acc (docs/v4-spec.md §6.3: gate clamped from above
    only, up on both sides); also, per row, how many pre-activations were clamped (coverage)."""
    g = linear(y, w1, split_k, round_in).to(acc)
    u = linear(y, w3, split_k, round_in).to(acc)
    hits = (g > limit).sum(-1) + (u.abs() > limit).sum(-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit), hits


def expert_down(h, w2, weight, prec: Precision) -> torch.Tensor:
    """One expert's output rows in `policy.moe_sum`: h [R, I] through w2 with the routing
    weight [R, 1] applied before w2 (the demo, in the SwiGLU dtype) or after it (in act)."""
    pol = prec.policy
    if pol.weight_after_w2:
        return (linear(h.to(pol.act), w2, pol.split_k, pol.fp8_linear_in) * weight.to(pol.act)).to(pol.moe_sum)
    return linear((weight * h).to(pol.act), w2, pol.split_k, pol.fp8_linear_in).to(pol.moe_sum)


def _expert_rows(idx: torch.Tensor, w: torch.Tensor | None = None):
    """(expert e, its tokens [R] ascending, their routing weights [R, 1] or None) per used
    expert, in expert-id order. A token naming an expert twice is one row with the weights
    summed (in routing-slot order)."""
    t = idx.shape[0]
    key = (idx.long() * t + torch.arange(t).unsqueeze(1)).reshape(-1)  # expert-major, then token
    pairs, inverse = torch.unique(key, return_inverse=True)
    weights = None
    if w is not None:
        weights = torch.zeros(pairs.shape[0], dtype=w.dtype).index_add_(0, inverse, w.reshape(-1)).unsqueeze(1)
    experts, counts = torch.unique_consecutive(pairs // t, return_counts=True)
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist()):
        yield e, pairs[start:start + n] % t, None if weights is None else weights[start:start + n]
        start += n


def shared_expert(y, p: dict, cfg: ModelConfig, prec: Precision) -> torch.Tensor:
    """The shared expert on every row of y [T, D], in `policy.moe_sum`."""
    pol = prec.policy
    h, _ = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit,
                         pol.swiglu, pol.split_k, pol.fp8_linear_in)
    return linear(h.to(pol.act), p["shared_experts.w2.weight"], pol.split_k, pol.fp8_linear_in).to(pol.moe_sum)


def moe(y, ids, p: dict, layer: int, cfg: ModelConfig, prec: Precision, rec, given=None):
    """y: [T, D] FFN input after ffn_norm; ids: [T] token ids; `given`: expert ids [T, k] to run
    instead of the router's own (`given_choices`). Returns [T, D].

    Each used expert runs only on its own tokens, padded to whole row tiles (`_padded`), and
    a token adds its experts in expert-id order: a token's result is independent of which
    other tokens chose which experts (batch-invariant), so causality checks can demand bit
    equality, and the cost follows the routed work."""
    pol = prec.policy
    idx, w = route(y, ids, p, layer, cfg, prec, rec)
    order = torch.sort(idx, dim=-1)
    rec("experts", order.values)
    rec("weights", w.gather(1, order.indices))
    idx, w = given_choices(y, idx, w, given, p, layer, cfg, prec)
    out = torch.zeros(y.shape[0], y.shape[1], dtype=pol.moe_sum)
    for e, tok, weight in _expert_rows(idx, w):
        w1, w3, w2 = expert_weights(p, f"experts.{e}", prec.act)
        h, _ = swiglu_hidden(y[_padded(tok)], w1, w3, cfg.swiglu_limit, pol.swiglu, pol.split_k, pol.fp8_linear_in)
        out[tok] += expert_down(h, w2, _padded(weight), prec)[: tok.numel()]
    out += shared_expert(y, p, cfg, prec)
    return out.to(prec.act)


def clamp_hits(y, experts, p: dict, cfg: ModelConfig, prec: Precision) -> int:
    """How many SwiGLU pre-activations `moe` clamps on y [T, D] (one sequence) whose chosen
    experts are `experts` [T, k]: the same GEMMs, tiles and dtypes, recomputed (coverage)."""
    pol = prec.policy
    hits = 0
    for e, tok, _ in _expert_rows(experts):
        w1, w3, _ = expert_weights(p, f"experts.{e}", prec.act)
        hits += int(swiglu_hidden(y[_padded(tok)], w1, w3, cfg.swiglu_limit, pol.swiglu, pol.split_k, pol.fp8_linear_in)[1][: tok.numel()].sum())
    _, h = swiglu_hidden(y, p["shared_experts.w1.weight"], p["shared_experts.w3.weight"], cfg.swiglu_limit,
                         pol.swiglu, pol.split_k, pol.fp8_linear_in)
    return hits + int(h.sum())
