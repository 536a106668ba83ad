"""Canonical points out of a (rank-merged) raw capture: every tensor reshaped to its
canonical per-token shape (engines keep mHC streams as [T, hc, H] or flattened [T, hc*H]; the
HF layout is [B, S, ...]), rows placed in the case's token order (alignment.py), points the
engine computed only for some rows dropped with the reason (e.g. logits of the sampled
tokens), discrete points in canonical form (expert ids sorted, indexer top-k padded with -1).
"""
from __future__ import annotations

import math
import re

import torch

from corruptcheck.engines.alignment import Alignment, align_tokens
from corruptcheck.engines.ranks import merge_ranks
from corruptcheck.engines.recorder import RawCapture, HookRecorder
from corruptcheck.engines.taps import CaptureError
from corruptcheck.reference import ModelConfig

_STREAM = ("attn_hc.in", "ffn_hc.in", "out")
_VECTOR = ("attn_hc.collapsed", "attn_norm", "attn.out", "ffn_hc.collapsed", "ffn_norm", "moe.out")


def canonical_tail(cfg: ModelConfig, name: str):
    """The canonical per-token shape of a point (docs/design.md §4); None for the indexer top-k
    (its width is padded to index_topk)."""
    n, d = cfg.hc_mult, cfg.hidden_size
    top = {"embed": (d,), "head.collapsed": (d,), "head.norm": (d,), "logits": (cfg.vocab_size,)}
    if name in top:
        return top[name]
    m = re.match(r"^layers\.\d+\.(.+)$", name)
    if not m:
        raise CaptureError(f"not a canonical point name: {name!r}")
    leaf = m.group(1)
    table = {**{s: (n, d) for s in _STREAM}, **{s: (d,) for s in _VECTOR},
             "attn_hc.post": (n,), "ffn_hc.post": (n,), "attn_hc.comb": (n, n), "ffn_hc.comb": (n, n),
             "attn.qr": (cfg.q_lora_rank,), "attn.q": (cfg.num_heads, cfg.head_dim),
             "attn.kv": (cfg.head_dim,), "attn.core": (cfg.num_heads, cfg.head_dim),
             "moe.router_logits": (cfg.n_routed_experts,), "moe.experts": (cfg.experts_per_tok,),
             "moe.weights": (cfg.experts_per_tok,), "attn.indexer_topk": None}
    if leaf not in table:
        raise CaptureError(f"no canonical shape for point {name!r}")
    return table[leaf]


def _reshape(cfg, name, t: torch.Tensor, rows: int):
    """[rows, *canonical tail], or None when the tensor is not one row per token."""
    tail = canonical_tail(cfg, name)
    if tail is None:  # indexer top-k: [T, k] or [B, S, k]
        return t.reshape(rows, -1) if t.numel() % max(rows, 1) == 0 and t.dim() >= 2 else None
    width = math.prod(tail)
    if t.numel() != rows * width:
        return None
    return t.reshape(rows, *tail)


def finalize(raw: RawCapture, cfg: ModelConfig, sequences, align: Alignment | None = None) -> tuple[dict, dict]:
    """RawCapture (ranks already merged) -> ({canonical name: [T, ...] tensor}, info).

    A point is kept only if every token of the case has a row for it; otherwise it is listed
    in info["gaps"] with the reason (and the differ reports it missing / skipped). `align`:
    a served run's request-aware alignment (`align_requests`), else rows are matched by
    (token id, position)."""
    align = align or align_tokens([(p["ids"], p["pos"]) for p in raw.passes], sequences)
    if align.missing == len(align.where):
        raise CaptureError("no captured forward pass ran the case's tokens")
    per_pass = _rows_by_pass(align)
    gaps: dict = {}
    shaped = _shaped_by_pass(raw, cfg, per_pass, gaps)
    points = {}
    for name in sorted(set(shaped) - set(gaps)):
        parts = shaped[name]
        if align.missing or set(parts) != set(per_pass):
            gaps[name] = "not captured for every token of the case"
            continue
        if len({x.shape[1:] for x in parts.values()}) > 1:
            gaps[name] = "different per-token shapes in different passes"
            continue
        t = _in_case_order(parts, per_pass, len(align.where))
        points[name] = t * raw.scales[name] if name in raw.scales else t
    _canonical_discrete(points, cfg, gaps)
    info = {"passes": len(raw.passes), "tokens_missing": align.missing, "extra_rows": align.extra_rows,
            "duplicate_rows": align.duplicate_rows, "gaps": gaps}
    return points, info


def _rows_by_pass(align: Alignment) -> dict:
    """pass -> (case token indices, engine rows) for every pass that ran case tokens."""
    per_pass: dict = {}
    for t, w in enumerate(align.where):
        if w is not None:
            per_pass.setdefault(w[0], ([], []))
            per_pass[w[0]][0].append(t)
            per_pass[w[0]][1].append(w[1])
    return per_pass


def _shaped_by_pass(raw: RawCapture, cfg: ModelConfig, per_pass: dict, gaps: dict) -> dict:
    """name -> {pass: [rows, *canonical tail]} over the passes with case tokens (warm-up and
    decode passes are ignored); a tensor without one row per token goes to `gaps`."""
    shaped: dict = {}
    for k in per_pass:
        p = raw.passes[k]
        rows = len(p["ids"])
        for name, t in p["points"].items():
            r = _reshape(cfg, name, t, rows)
            if r is None:
                gaps[name] = (f"captured {tuple(t.shape)} in a pass of {rows} tokens: not one row per token "
                              "(the engine computes it only for some rows, e.g. the sampled ones)")
            else:
                shaped.setdefault(name, {})[k] = r
    return shaped


def _in_case_order(parts: dict, per_pass: dict, tokens: int) -> torch.Tensor:
    """One point's per-pass rows gathered into [T, ...] in the case's token order."""
    first = next(iter(parts.values()))
    t = torch.empty(tokens, *first.shape[1:], dtype=first.dtype)
    for k, (canon, rows) in per_pass.items():
        t[torch.tensor(canon)] = parts[k][torch.tensor(rows)]
    return t


def _canonical_discrete(points: dict, cfg: ModelConfig, gaps: dict) -> None:
    """Expert ids sorted (their weights in the same order), indexer top-k padded with -1."""
    for name in [n for n in points if n.endswith("moe.weights")]:
        if name[: -len("weights")] + "experts" not in points:  # their order is the ids' order
            gaps[name] = "routing weights without their expert ids: order unknown"
            del points[name]
    for name in list(points):
        if name.endswith("moe.experts"):
            ids = points[name].long()
            order = torch.sort(ids, dim=-1)
            points[name] = order.values
            w = name[: -len("experts")] + "weights"
            if w in points:
                points[w] = points[w].gather(1, order.indices)
        elif name.endswith("attn.indexer_topk"):
            idx = points[name].long()
            k = cfg.index_topk
            if idx.shape[1] > k:
                gaps[name] = f"{idx.shape[1]} entries per token, more than index_topk={k}"
                del points[name]
                continue
            pad = torch.full((idx.shape[0], k - idx.shape[1]), -1, dtype=torch.long)
            points[name] = torch.cat([torch.where(idx < 0, -1, idx), pad], 1)


def capture_meta(raw: RawCapture, info: dict) -> dict:
    """What a Capture.meta carries about the capture itself."""
    return {"capture": {"passes": info["passes"], "tokens_missing": info["tokens_missing"],
                        "extra_rows": info["extra_rows"], "duplicate_rows": info["duplicate_rows"],
                        "gaps": info["gaps"], "unfired_taps": raw.notes.get("unfired", []),
                        "conflicts": raw.notes.get("conflicts", []),
                        "non_tensor": raw.notes.get("non_tensor", {}),
                        "when_errors": raw.notes.get("when_errors", {}),
                        "tp_ranks": raw.notes.get("tp_ranks", 1),
                        "rank_mismatch": raw.notes.get("rank_mismatch", {}),
                        "rank_missing": raw.notes.get("rank_missing", [])}}


def capture_points_from(recorders_or_raw, cfg: ModelConfig, sequences) -> tuple[dict, dict]:
    """Convenience: one HookRecorder / RawCapture per rank -> (points, meta)."""
    raws = [r.result() if isinstance(r, HookRecorder) else r for r in recorders_or_raw]
    raw = merge_ranks(raws)
    points, info = finalize(raw, cfg, sequences)
    return points, capture_meta(raw, info)
