"""Tensor-parallel ranks: the captures of several ranks (same batch, same passes) folded into
one (docs/engine-capture.md §7.2), each point by its tap's merge rule (corruptcheck/storage/shards.py).
Replicated points whose ranks disagree are reported in the notes, never hidden."""
from __future__ import annotations

import torch

from corruptcheck.engines.recorder import RawCapture
from corruptcheck.engines.taps import CaptureError
from corruptcheck.storage.shards import REPLICATED, MergeRule, ShardError, merge_shards, replica_disagreement


def merge_ranks(captures: list[RawCapture]) -> RawCapture:
    """One RawCapture per rank -> one RawCapture (a single capture is returned as it is)."""
    if len(captures) == 1:
        return captures[0]
    first = captures[0]
    if any(len(c.passes) != len(first.passes) for c in captures):
        raise CaptureError("tensor-parallel ranks recorded different numbers of forward passes")
    rules = {k: v for c in captures for k, v in c.rules.items()}
    mismatch: dict = {}
    missing: set = set()
    passes = []
    for k, p0 in enumerate(first.passes):
        ranks = [c.passes[k] for c in captures]
        if any(not torch.equal(r["ids"], p0["ids"]) for r in ranks):
            raise CaptureError(f"tensor-parallel ranks ran different tokens in pass {k}")
        merged = _merge_pass(ranks, rules, mismatch, missing)
        passes.append({"ids": p0["ids"], "pos": p0["pos"], "points": merged})
    notes = dict(first.notes)
    notes["tp_ranks"] = len(captures)
    notes["rank_mismatch"] = mismatch  # replicated points whose ranks disagree: report, never hide
    notes["rank_missing"] = sorted(missing)
    return RawCapture(passes, rules, dict(first.scales), notes)


def _merge_pass(ranks: list[dict], rules: dict, mismatch: dict, missing: set) -> dict:
    """One forward pass's points merged across ranks; disagreeing replicas go to `mismatch`
    (worst difference over passes), points some rank lacks to `missing`."""
    merged = {}
    for name in sorted({n for r in ranks for n in r["points"]}):
        parts = [r["points"].get(name) for r in ranks]
        if any(p is None for p in parts):
            missing.add(name)
            continue
        rule = MergeRule.parse(rules.get(name, REPLICATED))
        if rule.kind == REPLICATED:
            diff = replica_disagreement(parts)
            if diff > 0:
                mismatch[name] = max(mismatch.get(name, 0.0), diff)
        try:
            merged[name] = merge_shards(parts, rule)
        except ShardError as exc:
            raise CaptureError(f"point {name}: {exc}") from None
    return merged
