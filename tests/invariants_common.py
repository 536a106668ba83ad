"""Shared data of the reference's self-checks (tests/test_invariants_*.py): the tiny case and
its float64 runs, computed once per session, and the hypothesis settings they use."""
from __future__ import annotations

import functools

import torch
from hypothesis import settings

from corruptcheck.cases import get_case
from corruptcheck.reference import run
from corruptcheck.reference.precision import Precision

HYP = settings(max_examples=40, deadline=None)
HYP_SMALL = settings(max_examples=25, deadline=None)

F64 = torch.float64
PREC64 = Precision.of("float64")


# ----------------------------------------------------------------------------- shared data
@functools.lru_cache(maxsize=1)
def tiny():
    case = get_case("tiny")
    return case.config, case.params(), case.sequences()


@functools.lru_cache(maxsize=1)
def tiny_seq0_run():
    """float64 run of the first (64-token) sequence of `tiny`, alone."""
    cfg, params, seqs = tiny()
    ids = seqs[0].clone()
    return ids, run(cfg, params, [ids], "float64")


@functools.lru_cache(maxsize=1)
def tiny_batch_run():
    cfg, params, seqs = tiny()
    return run(cfg, params, seqs, "float64")
