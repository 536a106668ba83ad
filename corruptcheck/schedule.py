"""Serving schedules: how a case's sequences reach an engine the way a server feeds them —
prompts prefilled in chunks, then greedy decode steps — and the labels that say which phase
produced each token row.

A schedule's prompts are the case's seeded tokens at `prompt_lens`; the engine decodes
`decode_steps` tokens per sequence with its own greedy choices, and the reference is then run on
exactly those tokens (the *decoded case*): causality makes the full float64 forward over prompt
+ generated tokens the truth for every step (`reference/decode.py` proves the incremental state
equal to it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from corruptcheck.errors import BadInput


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Schedule:
    prompt_lens: tuple[int, ...]  # one sequence per entry (a batch of >= 3 exercises batching)
    decode_steps: int = 16  # greedy steps per sequence after its prompt
    chunk: int | None = None  # prefill tokens per step per sequence; None = the whole prompt at once
    # per sequence, the engine step (forward pass) at which it arrives: staggered arrivals make a
    # batching engine run new prefills beside other sequences' decode steps. None = all at once.
    # Engines that serve one sequence at a time (hf, reference) have nothing to stagger.
    arrivals: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.prompt_lens or any(not _int(n) or n < 1 for n in self.prompt_lens):
            raise BadInput(f"schedule: prompt lengths must be positive integers, got {self.prompt_lens!r}")
        if not _int(self.decode_steps) or self.decode_steps < 0:
            raise BadInput(f"schedule: decode_steps must be a non-negative integer, got {self.decode_steps!r}")
        if self.chunk is not None and (not _int(self.chunk) or self.chunk < 1):
            raise BadInput(f"schedule: chunk must be a positive integer, got {self.chunk!r}")
        if self.arrivals is not None and (len(self.arrivals) != len(self.prompt_lens)
                                          or any(not _int(a) or a < 0 for a in self.arrivals)):
            raise BadInput(f"schedule: arrivals must give one non-negative engine step per prompt, "
                           f"got {self.arrivals!r} for {len(self.prompt_lens)} prompts")

    def arrival(self, i: int) -> int:
        return self.arrivals[i] if self.arrivals else 0

    def prefill_chunks(self, prompt_len: int) -> list[int]:
        c = self.chunk or prompt_len
        return [min(c, prompt_len - at) for at in range(0, prompt_len, c)]

    def phase_labels(self) -> list[tuple[str, int]]:
        """The phases a served run of this schedule has, in order: ("prefill", chunk j) for the
        longest prompt's chunks, then ("decode", step k) for k = 1..decode_steps."""
        chunks = max(len(self.prefill_chunks(n)) for n in self.prompt_lens)
        return [("prefill", j) for j in range(chunks)] + [("decode", k) for k in range(1, self.decode_steps + 1)]

    def to_dict(self) -> dict:
        return {"prompt_lens": list(self.prompt_lens), "decode_steps": self.decode_steps, "chunk": self.chunk,
                "arrivals": list(self.arrivals) if self.arrivals else None}

    def describe(self) -> str:
        chunk = f"chunks of {self.chunk}" if self.chunk else "one prefill step"
        arrive = (f", arriving at engine steps {'/'.join(map(str, self.arrivals))}"
                  if self.arrivals and any(self.arrivals) else "")
        return (f"{len(self.prompt_lens)} sequences (prompts {'+'.join(map(str, self.prompt_lens))}, {chunk}), "
                f"{self.decode_steps} greedy decode steps each{arrive}")


def prompt_case(case, schedule: Schedule):
    """The case whose sequences are the schedule's prompts (seeded as the case's own)."""
    return replace(case, name=f"{case.name}@serve", seq_lens=tuple(schedule.prompt_lens),
                   description=f"{case.description}; served: {schedule.describe()}", schedule=None, tokens=None)


def decoded_case(case, sequences: list) -> object:
    """The case over the tokens the engine actually ran (prompts + its own greedy tokens). It
    keeps the case's name (reports name the case); its explicit `tokens` say it is decoded, and
    nothing looks a golden up for it (no golden covers an engine's own tokens)."""
    tokens = tuple(tuple(int(t) for t in s) for s in sequences)
    return replace(case, seq_lens=tuple(len(s) for s in tokens), tokens=tokens,
                   description=f"{case.description}; decoded by the engine ({len(tokens)} sequences)")


def row_labels(schedule: Schedule, lens: list[int]) -> list[tuple[str, int]]:
    """(phase, index) of every token row of sequences fed by `schedule` in order: ("prefill",
    chunk j) for prompt tokens, ("decode", step k) with k = 1.. for generated ones."""
    labels = []
    for prompt, total in zip(schedule.prompt_lens, lens):
        for j, c in enumerate(schedule.prefill_chunks(prompt)):
            labels += [("prefill", j)] * c
        labels += [("decode", k) for k in range(1, total - prompt + 1)]
    return labels


def check_prompts(sequences: list, prompts: list) -> None:
    """The engine's sequences must start with the schedule's prompts."""
    if len(sequences) != len(prompts):
        raise BadInput(f"engine returned {len(sequences)} sequences for {len(prompts)} prompts")
    for i, (s, p) in enumerate(zip(sequences, prompts)):
        s = torch.as_tensor(s)
        if s.shape[0] < p.shape[0] or not torch.equal(s[: p.shape[0]], p):
            raise BadInput(f"engine sequence {i} does not start with the schedule's prompt")
