"""Tensor-parallel shard merging: one vocabulary and one implementation, used by the dump
reader (dump.py), the SGLang dumper import (sglang_dump.py) and the engine capture
(engines/ranks.py).

Rules (how the per-rank pieces of one tensor combine):

    replicated   every rank holds the whole tensor: rank 0's is kept (the capture also
                 reports where ranks disagree: that is itself a corruption signal)
    sum          per-rank partial sums (a row-parallel output before its all-reduce): summed
                 in float64; the result is float32 (float64 when the pieces are float64)
    concat       per-rank slices: concatenated along `dim`

Written as text: `replicated`, `sum`, `concat:<dim>` (capture taps); a dump manifest says
{"merge": "sum"} or {"merge": "concat", "dim": <dim>} (docs/dump.md); SGLang's dims
annotations (`t h(tp,partial)`, `t h(tp)`) are translated to these rules on import.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REPLICATED, SUM, CONCAT = "replicated", "sum", "concat"
RULES = (REPLICATED, SUM, CONCAT)


class ShardError(ValueError):
    """The pieces cannot be merged by the rule (callers add which point)."""


@dataclass(frozen=True)
class MergeRule:
    kind: str = REPLICATED
    dim: int = -1

    def __post_init__(self):
        if self.kind not in RULES:
            raise ValueError(f"merge rule must be one of {RULES}, not {self.kind!r}")

    @classmethod
    def parse(cls, text: str) -> MergeRule:
        """`replicated`, `sum` or `concat:<dim>`."""
        kind, sep, dim = text.partition(":")
        if kind == CONCAT and sep:
            return cls(CONCAT, int(dim))
        if sep:
            raise ValueError(f"merge rule {text!r}: only concat takes a dim (concat:<dim>)")
        return cls(kind)

    def __str__(self) -> str:
        return f"{CONCAT}:{self.dim}" if self.kind == CONCAT else self.kind


def sum_partials(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank partial sums of one shape, added in float64 (exact enough: the engine's
    all-reduce rounds more); float32 result unless the parts are float64."""
    shapes = [tuple(p.shape) for p in parts]
    if len(set(shapes)) != 1:
        raise ShardError(f"partial sums of different shapes {shapes}")
    if not parts[0].is_floating_point():
        raise ShardError("integer tensors cannot be partial sums")
    total = sum(p.to(torch.float64) for p in parts)
    return total if parts[0].dtype == torch.float64 else total.to(torch.float32)


def concat_slices(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    try:
        return torch.cat(parts, dim)
    except (RuntimeError, IndexError) as exc:
        raise ShardError(f"shards {[tuple(p.shape) for p in parts]} do not concatenate along dim {dim} "
                         f"({str(exc).splitlines()[0]})") from None


def merge_shards(parts: list[torch.Tensor], rule: MergeRule) -> torch.Tensor:
    """The pieces (rank order) merged by `rule`; one piece is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    if rule.kind == SUM:
        return sum_partials(parts)
    if rule.kind == CONCAT:
        return concat_slices(parts, rule.dim)
    return parts[0]


def replicas_agree(parts: list[torch.Tensor]) -> bool:
    return all(p.shape == parts[0].shape and torch.equal(p, parts[0]) for p in parts[1:])


def replica_disagreement(parts: list[torch.Tensor]) -> float:
    """Largest |difference| of any rank's copy from rank 0's (inf for another shape or NaN
    differences); 0.0 when every copy is identical."""
    worst = 0.0
    for p in parts[1:]:
        if p.shape == parts[0].shape and torch.equal(p, parts[0]):
            continue
        diff = (math.inf if p.shape != parts[0].shape else
                float((p.double() - parts[0].double()).abs().nan_to_num(math.inf).max()))
        worst = max(worst, diff)
    return worst
