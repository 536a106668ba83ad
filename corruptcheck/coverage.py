"""What a case exercised, from the reference run's statistics (docs/design.md §8)."""
from __future__ import annotations

from corruptcheck.reference import ModelConfig
from corruptcheck.reference.model import Stats


def coverage(cfg: ModelConfig, stats: Stats, seq_lens) -> dict:
    layers = []
    for key, st in stats.layers.items():
        idx = cfg.num_layers if key == "mtp.0" else key
        avail = st.get("indexer_available", 0)
        tokens = st.get("tokens", 0)
        layers.append({
            "layer": key if isinstance(key, str) else f"layers.{key}",
            "attention": cfg.layer_type(idx),
            "routing": "hash" if cfg.is_hash_layer(idx) else "learned",
            "tokens": tokens,
            "compressed_entries": st.get("compressed_entries", 0),
            "indexer_pruning_queries": st.get("indexer_pruning_queries", 0),
            "indexer_pruning_fraction": (st.get("indexer_dropped", 0) / avail) if avail else 0.0,
            "clamp_hits": st.get("clamp_hits", 0),
            "experts_used": len(st.get("experts_used", ())),
            "experts_total": cfg.n_routed_experts,
            "mhc_offdiag_mass": st.get("comb_offdiag_mass", 0.0) / max(tokens, 1),
        })
    main = [entry for entry in layers if entry["layer"] != "mtp.0"]
    avail = sum(st.get("indexer_available", 0) for st in stats.layers.values())
    dropped = sum(st.get("indexer_dropped", 0) for st in stats.layers.values())
    return {
        "sequences": len(seq_lens),
        "tokens": int(sum(seq_lens)),
        "tokens_beyond_window": int(sum(max(0, s - cfg.window) for s in seq_lens)),
        "window": cfg.window,
        "compressed_entries": sum(entry["compressed_entries"] for entry in main),
        "indexer_pruning_fraction": dropped / avail if avail else 0.0,
        "clamp_hits": sum(entry["clamp_hits"] for entry in layers),
        "attention_types": sorted({entry["attention"] for entry in main}),
        "routing_types": sorted({entry["routing"] for entry in main}),
        "min_expert_fraction": min((entry["experts_used"] / entry["experts_total"] for entry in layers), default=0.0),
        "layers": layers,
    }


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
