"""corruptcheck/storage/shards.py (the one TP merge) and corruptcheck/storage/batch_layout.py (right-padded
batch <-> flat tokens), on their own."""
import math

import pytest
import torch

from corruptcheck.storage.batch_layout import fits_batch, leading_sequences, pad_right, rows_per_sequence, unpad
from corruptcheck.storage.shards import MergeRule, ShardError, merge_shards, replica_disagreement, sum_partials


def test_rule_words_round_trip():
    for text in ("replicated", "sum", "concat:1", "concat:-1"):
        assert str(MergeRule.parse(text)) == text
    for bad in ("partial", "shard:1", "sum:0", "concat:x"):
        with pytest.raises(ValueError):
            MergeRule.parse(bad)


def test_sum_partials_in_float64_and_refusals():
    a = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    assert sum_partials([a, a]).dtype == torch.float32
    assert torch.equal(sum_partials([a.double(), a.double()]), torch.tensor([2.0, 4.0], dtype=torch.float64))
    with pytest.raises(ShardError, match="integer"):
        sum_partials([torch.ones(2, dtype=torch.long)] * 2)
    with pytest.raises(ShardError, match="different shapes"):
        sum_partials([torch.ones(2), torch.ones(3)])


def test_concat_replicated_and_disagreement():
    x, y = torch.ones(2, 3), torch.zeros(2, 2)
    assert merge_shards([x, y], MergeRule.parse("concat:1")).shape == (2, 5)
    with pytest.raises(ShardError, match="do not concatenate"):
        merge_shards([x, y], MergeRule.parse("concat:0"))
    assert merge_shards([x, x + 1], MergeRule()) is x  # replicated: rank 0 (disagreement reported by callers)
    assert replica_disagreement([x, x.clone()]) == 0.0
    assert replica_disagreement([x, x + 0.5]) == 0.5 and replica_disagreement([x, y]) == math.inf


def test_pad_right_and_unpad_round_trip(tiny):
    seqs = [torch.tensor([3, 4, 5]), torch.tensor([7])]
    ids, mask = pad_right(seqs)
    assert ids.tolist() == [[3, 4, 5], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert fits_batch(ids, [3, 1]) and not fits_batch(ids, [4, 1])
    assert unpad(ids, [3, 1]).tolist() == [3, 4, 5, 7]
    cfg = tiny.config
    entries = next(f"layers.{i}.attn.compressed_kv" for i in range(cfg.num_layers) if cfg.compress_ratio(i))
    layer = int(entries.split(".")[1])
    lens = [9, 20]
    assert rows_per_sequence(cfg, entries, lens) == [n // cfg.compress_ratio(layer) for n in lens]
    assert rows_per_sequence(cfg, "layers.0.out", lens) == lens
    assert rows_per_sequence(cfg, "mtp.0.out", lens) == [8, 19]
    points = {"layers.0.out": torch.arange(40), entries: torch.arange(40)}
    own = leading_sequences(points, cfg, [9])
    assert len(own["layers.0.out"]) == 9 and len(own[entries]) == 9 // cfg.compress_ratio(layer)
