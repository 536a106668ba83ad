"""Token alignment: which engine row ran which token of the case.

Engines flatten a batch in their own order (batches reordered, chunked prefill split over
passes, padding, decode steps, warm-up); an `Alignment` gives, for every token of the case in
the case's order, the (pass, row) that ran it. `align_tokens` matches rows by (token id,
position); `align_requests` places a served run's rows by the request the engine said they
belong to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from corruptcheck.engines.taps import CaptureError


@dataclass
class Alignment:
    """For every token of the case (in the case's order) the (pass, row) the engine ran it in."""
    where: list
    extra_rows: int = 0
    duplicate_rows: int = 0

    @property
    def missing(self) -> int:
        return sum(w is None for w in self.where)


class _Placer:
    """The case's sequences laid end to end, and which engine row ran each of their tokens."""

    def __init__(self, sequences):
        self.seqs = [torch.as_tensor(s).reshape(-1).tolist() for s in sequences]
        self.offsets = [0]
        for seq in self.seqs:
            self.offsets.append(self.offsets[-1] + len(seq))
        self.where: list = [None] * self.offsets[-1]
        self.extra = self.dup = 0

    def matches(self, s: int, position: int, token: int) -> bool:
        return 0 <= position < len(self.seqs[s]) and self.seqs[s][position] == token

    def located(self, s: int, position: int) -> bool:
        return self.where[self.offsets[s] + position] is not None

    def place(self, s: int, position: int, at: tuple) -> None:
        t = self.offsets[s] + position
        if self.where[t] is None:
            self.where[t] = at
        else:
            self.dup += 1

    def result(self) -> Alignment:
        return Alignment(self.where, self.extra, self.dup)


def align_tokens(tokens: list[tuple[torch.Tensor, torch.Tensor]], sequences) -> Alignment:
    """Match the engine's flattened rows to the case's tokens by (token id, position).

    Rows are split into runs of consecutive positions (one request's chunk); each run is
    matched greedily to the sequence agreeing with it for longest, preferring tokens not yet
    located. Rows matching no case token (padding, decode steps, warm-up) are `extra_rows`."""
    placer = _Placer(sequences)
    for p, (ids_t, pos_t) in enumerate(tokens):
        ids, pos = ids_t.tolist(), pos_t.tolist()
        r = 0
        while r < len(ids):
            end = r + 1
            while end < len(ids) and pos[end] == pos[end - 1] + 1:
                end += 1
            while r < end:
                best, length = _longest_match(placer, ids, pos, r, end)
                if best is None:
                    placer.extra += 1
                    r += 1
                    continue
                for k in range(length):
                    placer.place(best, pos[r] + k, (p, r + k))
                r += length
    return placer.result()


def _longest_match(placer: _Placer, ids: list, pos: list, r: int, end: int) -> tuple[int | None, int]:
    """(sequence, length) agreeing longest with rows r.. of a run ending at `end`, preferring
    a sequence whose token at row r is not located yet; (None, 0) if none agrees."""
    best, best_key = None, (0, False)
    for s in range(len(placer.seqs)):
        length = 0
        while r + length < end and placer.matches(s, pos[r] + length, ids[r + length]):
            length += 1
        key = (length, length > 0 and not placer.located(s, pos[r]))
        if length and key > best_key:
            best, best_key = s, key
    return best, best_key[0]


def align_requests(tokens: list[tuple[torch.Tensor, torch.Tensor]], batches: list, sequences) -> Alignment:
    """Like `align_tokens`, for a served run whose engine said, per forward pass, which request
    each run of rows belongs to (`batches[k]` = [(request id, rows), ...] in row order): a
    request is matched to a sequence once, by its first rows' (id, position), and every later
    row of it (a decode step whose token another sequence shares) is placed by the request id."""
    if len(batches) != len(tokens):
        raise CaptureError(f"{len(tokens)} forward passes captured but {len(batches)} scheduled batches recorded")
    placer = _Placer(sequences)
    owner: dict = {}
    for k, ((ids_t, pos_t), batch) in enumerate(zip(tokens, batches)):
        ids, pos = ids_t.tolist(), pos_t.tolist()
        r = 0
        for req, n in batch:
            if req not in owner:
                free = [s for s in range(len(placer.seqs)) if s not in owner.values()]
                fits = [s for s in free if all(placer.matches(s, pos[r + j], ids[r + j]) for j in range(n))]
                owner[req] = fits[0] if len(fits) == 1 else None  # ambiguous or unknown: not placed
            s = owner[req]
            for j in range(n):
                if s is None or not placer.matches(s, pos[r + j], ids[r + j]):
                    placer.extra += 1
                else:
                    placer.place(s, pos[r + j], (k, r + j))
            r += n
        placer.extra += len(ids) - r
    return placer.result()


def served_rows(align, sequences, prompt_lens) -> list:
    """(phase, index) per token of a served run: prefill chunk j = the j-th forward pass that ran
    prompt tokens of that sequence (as the engine's scheduler chose), decode step k = position -
    prompt + 1."""
    rows, t = [], 0
    for seq, prompt in zip(sequences, prompt_lens):
        passes = sorted({align.where[t + p][0] for p in range(prompt) if align.where[t + p] is not None})
        chunk_of = {k: j for j, k in enumerate(passes)}
        for p in range(len(seq)):
            w = align.where[t + p]
            rows.append(("decode", p - prompt + 1) if p >= prompt else ("prefill", chunk_of.get(w[0], -1) if w else -1))
        t += len(seq)
    return rows
