"""What a case exercised, computed from the reference run's recorded points and the case's
data (docs/design.md §8): nothing is counted inside the reference."""
from __future__ import annotations

import torch

from corruptcheck.points import MTP, block, point
from corruptcheck.reference import ModelConfig, Precision
from corruptcheck.reference.attention import available, sub
from corruptcheck.reference.model import cast_params
from corruptcheck.reference.moe import clamp_hits

_FLOAT64 = Precision.of("float64")


def _layer_keys(cfg: ModelConfig, points: dict) -> list:
    """Main layers, then "mtp.0" when the run recorded it (a sequence of >= 2 tokens)."""
    return [k for k in list(range(cfg.num_layers)) + [MTP] if point(k, "ffn_hc.in") in points]


def _rows(key, seq_lens) -> list[int]:
    """Rows each sequence contributes to a layer's points (MTP: S-1, sequences of >= 2)."""
    return [s - 1 for s in seq_lens if s > 1] if key == MTP else list(seq_lens)


def _per_seq(t: torch.Tensor, rows: list[int]) -> list:
    return list(torch.split(t, rows, 0))


def _indexer(topk: torch.Tensor, rows: list[int], ratio: int) -> dict:
    """Queries where the indexer dropped entries, entries available and dropped (summed)."""
    out = {"pruning_queries": 0, "available": 0, "dropped": 0}
    for s, picks in zip(rows, _per_seq(topk, rows)):
        avail = available(s, s // ratio, ratio).sum(1)  # [S] entries visible to each query
        chosen = (picks >= 0).sum(1)
        out["pruning_queries"] += int((avail > chosen).sum())
        out["available"] += int(avail.sum())
        out["dropped"] += int((avail - chosen).sum())
    return out


def _offdiag_mass(comb: torch.Tensor, rows: list[int], n: int) -> float:
    """Sum over tokens of the FFN mHC comb matrix's off-diagonal mass / n (per sequence, in order)."""
    mass = 0.0
    for m in _per_seq(comb, rows):
        mass += float((m.sum((-1, -2)) - m.diagonal(dim1=-2, dim2=-1).sum(-1)).sum()) / n
    return mass


def _clamp_hits(cfg: ModelConfig, p: dict, pre: str, points: dict, rows: list[int]) -> int:
    """SwiGLU pre-activations the MoE clamped, recomputed from the recorded FFN inputs and
    expert choices exactly as the run computed them (float64)."""
    lp = sub(p, f"{pre}.ffn")
    ys, experts = _per_seq(points[f"{pre}.ffn_norm"], rows), _per_seq(points[f"{pre}.moe.experts"], rows)
    with torch.no_grad():
        return sum(clamp_hits(y, e, lp, cfg, _FLOAT64) for y, e in zip(ys, experts))


def layer_coverage(cfg: ModelConfig, key, points: dict, seq_lens, p: dict | None) -> dict:
    """One layer's entry of the report (`p`: float64-cast parameters; None: SwiGLU clamp hits
    are not recounted, `clamp_hits` is None). The indexer counts ride along under "_indexer"."""
    pre, idx = block(key), cfg.num_layers if key == MTP else key
    rows = _rows(key, seq_lens)
    tokens = points[f"{pre}.out"].shape[0]
    kv = points.get(f"{pre}.attn.compressed_kv")
    topk = points.get(f"{pre}.attn.indexer_topk")
    ix = _indexer(topk, rows, cfg.compress_ratio(idx)) if topk is not None else {"available": 0, "dropped": 0}
    return {
        "layer": pre,
        "attention": cfg.layer_type(idx),
        "routing": "hash" if cfg.is_hash_layer(idx) else "learned",
        "tokens": tokens,
        "compressed_entries": kv.shape[0] if kv is not None else 0,
        "indexer_pruning_queries": ix.get("pruning_queries", 0),
        "indexer_pruning_fraction": (ix["dropped"] / ix["available"]) if ix["available"] else 0.0,
        "clamp_hits": _clamp_hits(cfg, p, pre, points, rows) if p is not None else None,
        "experts_used": len(set(torch.unique(points[f"{pre}.moe.experts"]).tolist())),
        "experts_total": cfg.n_routed_experts,
        "mhc_offdiag_mass": _offdiag_mass(points[f"{pre}.ffn_hc.comb"], rows, cfg.hc_mult) / max(tokens, 1),
        "_indexer": ix,
    }


def coverage(cfg: ModelConfig, points: dict, seq_lens, params: dict) -> dict:
    """The coverage report of a float64 reference run's `points` on a case's sequences
    (`seq_lens`) and parameters."""
    p = cast_params(params, _FLOAT64)
    return summarize(cfg, [layer_coverage(cfg, key, points, seq_lens, p) for key in _layer_keys(cfg, points)], seq_lens)


def summarize(cfg: ModelConfig, entries: list, seq_lens) -> dict:
    """The coverage report from its layers' entries (layer_coverage)."""
    indexer = [e.get("_indexer") or {"available": 0, "dropped": 0} for e in entries]
    layers = [{k: v for k, v in e.items() if k != "_indexer"} for e in entries]
    clamps = [e["clamp_hits"] for e in layers if e["clamp_hits"] is not None]
    avail = sum(ix["available"] for ix in indexer)
    dropped = sum(ix["dropped"] for ix in indexer)
    main = [entry for entry in layers if entry["layer"] != MTP]
    return {
        "sequences": len(seq_lens),
        "tokens": int(sum(seq_lens)),
        "tokens_beyond_window": int(sum(max(0, s - cfg.window) for s in seq_lens)),
        "window": cfg.window,
        "compressed_entries": sum(entry["compressed_entries"] for entry in main),
        "indexer_pruning_fraction": dropped / avail if avail else 0.0,
        "clamp_hits": sum(clamps) if clamps or not layers else None,
        "attention_types": sorted({entry["attention"] for entry in main}),
        "routing_types": sorted({entry["routing"] for entry in main}),
        "min_expert_fraction": min((entry["experts_used"] / entry["experts_total"] for entry in layers), default=0.0),
        "layers": layers,
    }


def coverage_sentence(cov: dict) -> str:
    """The coverage report in one line (terminal and HTML reports)."""
    if "tokens" not in cov:
        return "no layer was run, nothing to say what the inputs exercised"
    clamps = "uncounted" if cov["clamp_hits"] is None else cov["clamp_hits"]
    pruned = cov["indexer_pruning_fraction"]
    # a few pruning queries (an engine case prunes on its last 61 of 2112) must not print as 0%
    pruned = f"{pruned:.0%}" if pruned == 0 or pruned >= 0.01 else f"{pruned:.2%}"
    return (f"{cov['tokens']} tokens in {cov['sequences']} sequence(s), {cov['tokens_beyond_window']} beyond the "
            f"{cov['window']}-token window; {cov['compressed_entries']} compressed entries; indexer pruned "
            f"{pruned} of available entries; {clamps} SwiGLU clamp hits; "
            f"attention {'/'.join(cov['attention_types'])}; routing {'/'.join(cov['routing_types'])}")


def exercised(cov: dict, layer_key: str, mechanism: str | None) -> bool:
    """Did the case exercise `mechanism` in this layer? (None = always.)"""
    if mechanism is None:
        return True
    entry = next((e for e in cov["layers"] if e["layer"] == layer_key), None)
    if entry is None:
        return False
    if mechanism == "indexer_pruning":
        return entry["indexer_pruning_queries"] > 0
    if mechanism == "compressed_entries":
        return entry["compressed_entries"] > 0
    if mechanism == "hash_routing":
        return entry["routing"] == "hash" and entry["tokens"] > 0
    raise ValueError(f"unknown mechanism {mechanism}")
