"""Canonical capture points (docs/design.md §4) for a model config, in topological order.

`required` points are the table of docs/design.md §4: an engine that lacks one reports it `missing`.
Finer points (q, kv, compressed entries, mHC coefficients, router logits, MTP) are optional:
compared when the engine exposes them, `skipped` (with the reason) when it does not.
"""
from __future__ import annotations

from dataclasses import dataclass

from corruptcheck.reference import ModelConfig


MTP = "mtp.0"  # the one MTP block's prefix (V4 ships one)


def block(layer) -> str:
    """The prefix of a block's points: `layers.<i>` for a main layer index, `mtp.0` for the MTP
    block (named by the string "mtp.0" or by its index num_layers where a config is at hand)."""
    return MTP if layer == MTP else f"layers.{layer}"


def point(layer, sub: str) -> str:
    """A block's point: point(2, "moe.out") == "layers.2.moe.out", point("mtp.0", "out")."""
    return f"{block(layer)}.{sub}"


def parse(name: str) -> tuple:
    """(block prefix, layer, sub-point) of a point name: ("layers.2", 2, "moe.out"),
    ("mtp.0", "mtp.0", "out"); (name, None, "") for embed, head.*, logits."""
    parts = name.split(".")
    if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
        return f"layers.{parts[1]}", int(parts[1]), ".".join(parts[2:])
    if name.startswith(MTP + "."):
        return MTP, MTP, name[len(MTP) + 1:]
    return name, None, ""


def sub_block_of(name: str) -> str:
    """The teacher-forced sub-block a point belongs to: "layers.3.attn" / "layers.3.ffn" /
    "mtp.0.attn" / "head" (and "embed", "logits" for themselves)."""
    prefix, layer, rest = parse(name)
    if layer is None:
        return name.split(".")[0]
    # ffn_hc.in is the attention half's output (its mHC post)
    return f"{prefix}.attn" if rest.startswith("attn") or rest == "ffn_hc.in" else f"{prefix}.ffn"


def layer_of(name: str):
    """The layer a point belongs to: its index, "mtp.0", or None (embed, head, logits)."""
    return parse(name)[1]


@dataclass(frozen=True)
class PointSpec:
    name: str
    kind: str  # "float" | "index"
    layer: int | None  # layer index; None for embed/head; num_layers for the MTP block
    required: bool
    mechanism: str | None = None  # coverage key that must be exercised for a pass to count


def _block_points(prefix: str, layer: int, kind: str, hash_layer: bool, required: bool) -> list[PointSpec]:
    def p(name, k="float", req=required, mech=None):
        return PointSpec(f"{prefix}.{name}", k, layer, req, mech)

    pts = [p("attn_hc.in"), p("attn_hc.post", req=False), p("attn_hc.comb", req=False),
           p("attn_hc.collapsed"), p("attn_norm"), p("attn.qr", req=False), p("attn.q", req=False),
           p("attn.kv", req=False)]
    if kind != "sliding":
        pts.append(p("attn.compressed_kv", req=False, mech="compressed_entries"))
    if kind == "csa":
        pts.append(p("attn.indexer_topk", "index", mech="indexer_pruning"))
    pts += [p("attn.core", req=False), p("attn.out"),
            p("ffn_hc.in"), p("ffn_hc.post", req=False), p("ffn_hc.comb", req=False),
            p("ffn_hc.collapsed"), p("ffn_norm"), p("moe.router_logits", req=False),
            p("moe.experts", "index", mech="hash_routing" if hash_layer else None),
            p("moe.weights"), p("moe.out"), p("out")]
    return pts


def capture_points(cfg: ModelConfig) -> list[PointSpec]:
    pts = [PointSpec("embed", "float", None, True)]
    for i in range(cfg.num_layers):
        pts += _block_points(block(i), i, cfg.layer_type(i), cfg.is_hash_layer(i), True)
    pts += [PointSpec("head.collapsed", "float", None, True), PointSpec("head.norm", "float", None, True),
            PointSpec("logits", "float", None, True)]
    if cfg.num_mtp_layers:
        mtp = cfg.num_layers
        pts.append(PointSpec(point(MTP, "in"), "float", mtp, False))
        pts += _block_points(MTP, mtp, "sliding", False, False)
        pts += [PointSpec(point(MTP, n), "float", mtp, False) for n in ("head.collapsed", "head.norm", "logits")]
    return pts


# reference-only data the differ uses to judge discrete choices (never compared as points)
TIE_SCORES = {"attn.indexer_topk": "attn.indexer_scores", "moe.experts": "moe.selection_scores"}


def tie_scores_name(point: str) -> str | None:
    for suffix, scores in TIE_SCORES.items():
        if point.endswith(suffix):
            return point[: -len(suffix)] + scores
    return None


def experts_of(point: str) -> str | None:
    """The expert ids point beside a moe.weights point (None for every other point): the
    weights are comparable only on the rows where both sides chose the same experts."""
    return point[: -len("weights")] + "experts" if point.endswith("moe.weights") else None


def agreeing_rows(point: str, engine: dict, ref: dict):
    """moe.weights are comparable only where the engine chose the reference's experts: the bool
    row mask for such a point (None for every other point, or when either side lacks the ids or
    their shapes differ — the ids point itself then reports the problem)."""
    experts = experts_of(point)
    if experts is None:
        return None
    a, b = engine.get(experts), ref.get(experts)
    if a is None or b is None or a.shape != b.shape or a.dim() == 0:
        return None
    same = a == b
    return same.flatten(1).all(-1) if same.dim() > 1 else same
