"""Error metrics between an engine tensor and the reference.

Float metrics come from one pass over both tensors (`row_sums.py`, compiled, both cores):
per row, float64 sums of e², r², (e-r)², e·r and max |e-r| over the elements finite on both
sides, with NaN/Inf parity counts. Rows are read in place (float32 / float64 memory, a
memory-mapped file included); other float dtypes are widened to float32 one chunk of rows at a
time (exact), so no float64 copy of a tensor is ever made.

Each row's sums come in units of a power-of-two scale s_t² (s_t = 1 for ordinary rows; a row
with values near the float64 range is scaled by its own s_t, as LAPACK's `dnrm2` does); each
total Σ_t sum_t · s_t² is kept as a mantissa and a binary exponent (`_total`), so no total
overflows or underflows whatever the rows' magnitudes, and the metrics are ratios of totals.
Shifts by powers of two are exact: an exact copy of a huge tensor still has norm ratio exactly 1
(e² and r² are summed in the same order).

NaN/Inf parity compares the class of every element (finite, NaN, +Inf, -Inf): an engine value
that is non-finite where the reference is finite (`nonfinite_new`), finite where the reference
is not (`nonfinite_lost`), or a different non-finite class (`nonfinite_kind`) is a mismatch.
Only elements finite on both sides enter the sums (`compared_values` counts them).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from corruptcheck.judge import row_sums as _kernel
CHUNK_ELEMENTS = 1 << 22  # rows read from a file / widened to float32 at a time
_NATIVE = (torch.float32, torch.float64)  # dtypes the kernel reads as they are


def _rows(x, a: int, b: int, per_tok: int) -> np.ndarray:
    """Rows a..b of x (a tensor, or a source with `rows(a, b)` that reads them from a file) as a
    [rows, per_tok] float32 / float64 array, in place when it already is one."""
    x = x.rows(a, b) if hasattr(x, "rows") else x[a:b].detach()
    if x.dtype not in _NATIVE:
        x = x.to(torch.float32)  # bf16, fp16, fp8 widen exactly
    return x.contiguous().reshape(-1, per_tok).numpy()


def float_metrics(engine, ref) -> dict:
    """rel_l2, max_abs, norm_ratio, cosine, worst token (by relative error), NaN/Inf parity.
    engine, ref: tensors, or row sources (lazy_points.RowSource) streamed a block of rows at a
    time — then neither is ever held whole."""
    if tuple(engine.shape) != tuple(ref.shape):
        raise ValueError(f"float_metrics: shapes {tuple(engine.shape)} and {tuple(ref.shape)} differ")
    if len(ref.shape) == 0:
        engine, ref = engine.reshape(1), ref.reshape(1)
    t = ref.shape[0]
    per_tok = math.prod(ref.shape[1:])
    n = t if per_tok else 0
    sums, counts = np.zeros((n, _kernel.N_SUMS)), np.zeros((n, _kernel.N_COUNTS), dtype=np.int64)
    _kernel.set_threads(torch.get_num_threads())
    in_memory = not (hasattr(engine, "rows") or hasattr(ref, "rows"))
    native = in_memory and engine.dtype in _NATIVE and ref.dtype in _NATIVE  # read in place: one call
    step = n if native else max(1, CHUNK_ELEMENTS // max(per_tok, 1))
    for a in range(0, n, max(step, 1)):
        b = min(a + step, n)
        _kernel.row_sums(_rows(engine, a, b, per_tok), _rows(ref, a, b, per_tok), sums[a:b], counts[a:b])
    return _combine(sums, counts, t)


def _total(q: np.ndarray, k: np.ndarray) -> tuple[float, int]:
    """Σ_t q_t · 2^(2 k_t) as (m, K) with the value m · 2^K: terms are shifted to the largest
    one's binary exponent K, so no total overflows or underflows whatever the rows' scales (a term
    below 2^-1074 of the largest is below float64 resolution of the total)."""
    nz = q != 0
    if not nz.any():
        return 0.0, 0
    big = int((np.frexp(q[nz])[1] + 2 * k[nz]).max())
    return float(np.ldexp(q, 2 * k - big).sum()), big


def _sqrt_ratio(a: tuple, b: tuple) -> float:
    """sqrt(a / b) for totals (m, K) (b > 0)."""
    (ma, ka), (mb, kb) = a, b
    shift = ka - kb
    return math.ldexp(math.sqrt(ma / mb * (2.0 if shift % 2 else 1.0)), (shift - shift % 2) // 2)


def _combine(sums: np.ndarray, counts: np.ndarray, rows: int) -> dict:
    """The metrics from per-row sums [n, 6] and counts [n, 5] (row_sums.py)."""
    k = np.frexp(sums[:, 5])[1].astype(np.int64) - 1  # row scale s_t = 2^k_t
    e2, r2, d2, dot = (_total(sums[:, i], k) for i in range(4))
    en, rn, dn = sums[:, 0], sums[:, 1], sums[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_tok = np.where(rn > 0, np.sqrt(dn / rn), np.where(dn > 0, math.inf, 0.0))
        dev_tok = np.where(rn > 0, np.abs(np.sqrt(en / rn) - 1), np.where(en > 0, math.inf, 0.0))
    worst = int(rel_tok.argmax()) if len(rel_tok) else -1
    bad = np.flatnonzero(counts[:, :3].sum(1))
    new, lost, kind, nref, compared = (int(c) for c in counts.sum(0)) if len(counts) else (0,) * 5
    if e2[0] > 0 and r2[0] > 0:  # dot / (|e| |r|) = sign(dot) · sqrt(dot² / (e² r²))
        cos = math.copysign(_sqrt_ratio((dot[0] ** 2, 2 * dot[1]), (e2[0] * r2[0], e2[1] + r2[1])), dot[0])
        cosine = max(-1.0, min(1.0, cos))
    else:
        cosine = 1.0 if e2[0] == r2[0] else 0.0
    return {
        "rel_l2": _sqrt_ratio(d2, r2) if r2[0] > 0 else (0.0 if d2[0] == 0 else math.inf),
        "max_abs": float(sums[:, 4].max()) if len(sums) else 0.0,
        "norm_ratio": _sqrt_ratio(e2, r2) if r2[0] > 0 else (1.0 if e2[0] == 0 else math.inf),
        "cosine": cosine,
        "worst_token": worst,
        "worst_token_rel": float(rel_tok[worst]) if len(rel_tok) else -1.0,
        "worst_token_norm_dev": float(dev_tok.max()) if len(dev_tok) else 0.0,
        "compared_values": compared,
        "rows": rows,
        "nonfinite_new": new,
        "nonfinite_lost": lost,
        "nonfinite_kind": kind,
        "nonfinite_ref": nref,
        "first_nonfinite_token": int(bad[0]) if len(bad) else None,
    }


def _unique_members(ids: torch.Tensor, other_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `ids` ([T, K], -1 = none): (first occurrence of a valid id, id also in the
    matching row of `other_sorted`)."""
    srt, order = ids.sort(-1)
    first = srt >= 0
    first[:, 1:] &= srt[:, 1:] != srt[:, :-1]
    pos = torch.searchsorted(other_sorted, srt).clamp_max(max(other_sorted.shape[1] - 1, 0))
    found = other_sorted.gather(1, pos) == srt if other_sorted.shape[1] else torch.zeros_like(first)
    inv = order.argsort(-1)  # back to the row's own order
    return first.gather(1, inv), found.gather(1, inv)


def set_disagreements(engine: torch.Tensor, ref: torch.Tensor, scores: torch.Tensor | None,
                      tie_rel: float) -> dict:
    """Per-token set comparison of discrete choices ([T, K] integer ids, -1 = none), vectorised.

    A token whose sets differ is "tie-explained" when, by the reference's own scores, every
    swapped-in choice scores within `tie_rel` (relative to the row's largest finite |score|) of
    the swapped-out one; otherwise it is a genuine disagreement. Engine ids below -1, or beyond
    the score row, name no choice at all: such a token is genuine and counted `out_of_range`."""
    t = ref.shape[0]
    if t == 0:
        return {"tokens": 0, "genuine": 0, "tie_explained": 0, "out_of_range": 0,
                "first_genuine_token": None, "worst_margin_rel": 0.0}
    eng, rf = engine.reshape(t, -1).long(), ref.reshape(t, -1).long()
    width = scores.shape[-1] if scores is not None else None
    bad = (eng < -1) | ((eng >= width) if width is not None else torch.zeros_like(eng, dtype=torch.bool))
    out_of_range = bad.any(1)
    eng = torch.where(bad, -1, eng)  # named no choice: compared as "none" but already genuine
    ref_first, ref_in_eng = _unique_members(rf, eng.sort(-1).values)
    eng_first, eng_in_ref = _unique_members(eng, rf.sort(-1).values)
    only_ref, only_eng = ref_first & ~ref_in_eng, eng_first & ~eng_in_ref
    n_ref, n_eng = only_ref.sum(1), only_eng.sum(1)
    differ = (n_ref > 0) | (n_eng > 0) | out_of_range
    genuine = differ & (out_of_range | (n_ref != n_eng))
    margin = torch.zeros(t, dtype=torch.float64)
    if scores is None:
        genuine = differ
    else:
        rows = scores.reshape(t, -1).to(torch.float64)
        fin = torch.isfinite(rows)
        scale = torch.where(fin, rows.abs(), 0.0).amax(1)
        scale = torch.where(scale > 0, scale, 1.0)
        lost = torch.where(only_ref, rows.gather(1, rf.clamp_min(0)), math.inf).amin(1)
        gained_vals = rows.gather(1, eng.clamp_min(0))
        gained = torch.where(only_eng, gained_vals, -math.inf).amax(1)
        masked_pick = (only_eng & ~torch.isfinite(gained_vals)).any(1)  # an entry the reference masks
        margin = torch.where(differ & ~genuine & ~masked_pick, (lost - gained).clamp_min(0) / scale, 0.0)
        margin = torch.nan_to_num(margin, nan=math.inf)
        genuine = genuine | (differ & masked_pick) | (differ & (margin > tie_rel))
    ties = differ & ~genuine
    g_idx = genuine.nonzero()
    worst = float(torch.where(ties, margin, 0.0).max()) if bool(ties.any()) else 0.0
    return {"tokens": t, "genuine": int(genuine.sum()), "tie_explained": int(ties.sum()),
            "out_of_range": int(out_of_range.sum()),
            "first_genuine_token": int(g_idx[0, 0]) if g_idx.numel() else None, "worst_margin_rel": worst}
