"""Batch layouts: a right-padded batch [B, S_max, ...] and the flat token layout [T, ...] (the
sequences' rows one after another), used by the dump reader (`tokens: "batch"`), the hf
engine's batched run and the self-test's partnered batches.

How many rows a sequence of n tokens gives a point: n for a token point, n - 1 for an MTP
point (the last token has no next-token input), n // ratio for compressed entries
(`*.compressed_kv`, `*.indexer_keys`: one per `ratio` tokens of that layer).
"""
from __future__ import annotations

import torch

ENTRY_SUFFIXES = ("compressed_kv", "indexer_keys")


def is_entry_point(name: str) -> bool:
    """Whether a point's rows are compressed entries rather than tokens."""
    return name.endswith(ENTRY_SUFFIXES)


def rows_per_sequence(cfg, name: str, seq_lens) -> list[int]:
    """The rows each sequence contributes to point `name` in the flat layout."""
    parts = name.split(".")
    if is_entry_point(name):
        layer = cfg.num_layers if parts[0] == "mtp" else int(parts[1])
        return [n // cfg.compress_ratio(layer) for n in seq_lens]
    if parts[0] == "mtp":
        return [n - 1 for n in seq_lens]
    return list(seq_lens)


def pad_right(sequences: list[torch.Tensor], fill: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id sequences -> (ids [B, S_max] right-padded with `fill`, mask [B, S_max]: 1 on real
    tokens)."""
    lens = [len(s) for s in sequences]
    s_max = max(lens)
    ids = torch.stack([torch.nn.functional.pad(s, (0, s_max - len(s)), value=fill) for s in sequences])
    mask = torch.stack([torch.arange(s_max) < n for n in lens]).long()
    return ids, mask


def fits_batch(t: torch.Tensor, lens) -> bool:
    """Whether `t` can be a right-padded batch [B, S_max >= max(lens), ...] of these lengths."""
    return t.dim() >= 2 and t.shape[0] == len(lens) and t.shape[1] >= max(lens)


def unpad(t: torch.Tensor, lens) -> torch.Tensor:
    """[B, S_max, ...] right-padded -> [T, ...]: rows s < lens[b] of each b, in order."""
    return torch.cat([t[b, :n] for b, n in enumerate(lens)], 0)


def leading_sequences(points: dict, cfg, seq_lens) -> dict:
    """Flat points of a batch whose first sequences have lengths `seq_lens` -> those
    sequences' rows only."""
    return {name: t[: sum(rows_per_sequence(cfg, name, seq_lens))] for name, t in points.items()}
