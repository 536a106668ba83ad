"""Error metrics between an engine tensor and the reference, computed in float64 one chunk of
tokens at a time (no float64 copy of a whole large tensor is made).

Sums of squares are kept relative to a running power-of-two scale S (the largest finite
magnitude seen so far, rounded up to a power of two), as LAPACK's `dnrm2` does: a chunk is
divided by its own scale s, summed, and the running sums are rescaled by (S/s)^2 when s grows.
Dividing by a power of two is exact, so for ordinary data the numbers are bit-identical to the
unscaled sums, and values near the float64 range (1e200, 1e-200) neither overflow to inf nor
underflow to 0 — an exact copy of a huge tensor still has norm ratio 1.

NaN/Inf parity compares the class of every element (finite, NaN, +Inf, -Inf): an engine value
that is non-finite where the reference is finite (`nonfinite_new`), finite where the reference
is not (`nonfinite_lost`), or a different non-finite class (`nonfinite_kind`) is a mismatch.
Only elements finite on both sides enter the sums (`compared_values` counts them).
"""
from __future__ import annotations

import math

import torch

CHUNK_ELEMENTS = 1 << 22


def _pow2_scale(amax: float) -> float:
    """Smallest power of two >= amax (1.0 for 0)."""
    if amax <= 0.0:
        return 1.0
    return math.ldexp(1.0, math.frexp(amax)[1])


def _class(x: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return torch.isnan(x).to(torch.int8) + 2 * torch.isposinf(x).to(torch.int8) + 3 * torch.isneginf(x).to(torch.int8)


def float_metrics(engine: torch.Tensor, ref: torch.Tensor) -> dict:
    """rel_l2, max_abs, norm_ratio, cosine, worst token (by relative error), NaN/Inf parity."""
    if engine.shape != ref.shape:
        raise ValueError(f"float_metrics: shapes {tuple(engine.shape)} and {tuple(ref.shape)} differ")
    if ref.dim() == 0:
        engine, ref = engine.reshape(1), ref.reshape(1)
    t = ref.shape[0]
    per_tok = math.prod(ref.shape[1:])
    acc = _Running()
    step = max(1, CHUNK_ELEMENTS // max(per_tok, 1))
    for start in range(0, t if per_tok else 0, step):
        e = engine[start:start + step].to(torch.float64).reshape(-1, per_tok)
        r = ref[start:start + step].to(torch.float64).reshape(-1, per_tok)
        ok = acc.parity(e, r, start)
        acc.add(torch.where(ok, e, 0.0), torch.where(ok, r, 0.0), start)
    return acc.result(t)


class _Running:
    """float_metrics' sums over chunks of rows: the four sums in units of a running power-of-two
    scale S^2 (0 before the first chunk), the worst token, NaN/Inf parity counts."""

    def __init__(self):
        self.scale = 0.0
        self.e2 = self.r2 = self.d2 = self.dot = 0.0
        self.max_abs = 0.0
        self.worst_tok, self.worst_rel = -1, -1.0
        self.worst_norm_dev = 0.0  # max over tokens of | ||e_t|| / ||r_t|| - 1 | (bounds it for any subset of tokens)
        self.new = self.lost = self.kind = self.nonfinite_ref = self.compared = 0
        self.first_nonfinite = None

    def parity(self, e: torch.Tensor, r: torch.Tensor, start: int) -> torch.Tensor:
        """Count the chunk's non-finite mismatches; the mask of values finite on both sides."""
        fe, fr = torch.isfinite(e), torch.isfinite(r)
        ok = fe & fr
        n_new, n_lost = int((~fe & fr).sum()), int((fe & ~fr).sum())
        n_kind = int(((~fe & ~fr) & (_class(e) != _class(r))).sum())
        if (n_new or n_lost or n_kind) and self.first_nonfinite is None:
            bad_rows = ((fe != fr) | ((~fe & ~fr) & (_class(e) != _class(r)))).any(1)
            self.first_nonfinite = start + int(bad_rows.nonzero()[0, 0])
        self.new, self.lost, self.kind = self.new + n_new, self.lost + n_lost, self.kind + n_kind
        self.nonfinite_ref += int((~fr).sum())
        self.compared += int(ok.sum())
        return ok

    def add(self, e: torch.Tensor, r: torch.Tensor, start: int) -> None:
        """Add a chunk of finite rows (non-finite entries zeroed)."""
        s = _pow2_scale(max(float(e.abs().max()), float(r.abs().max())))
        e, r = e / s, r / s
        d = e - r
        # the same reduction for e and r, so an exact copy has norm ratio exactly 1
        dn, rn, en = d.square().sum(1), r.square().sum(1), e.square().sum(1)
        sums = (float(en.sum()), float(rn.sum()), float(dn.sum()), float((e * r).sum()))
        if s > self.scale:  # bring the running sums to the new scale
            f = (self.scale / s) ** 2  # 0 before the first chunk
            self.e2, self.r2, self.d2, self.dot = self.e2 * f, self.r2 * f, self.d2 * f, self.dot * f
            self.scale = s
        f = (s / self.scale) ** 2
        self.e2, self.r2 = self.e2 + sums[0] * f, self.r2 + sums[1] * f
        self.d2, self.dot = self.d2 + sums[2] * f, self.dot + sums[3] * f
        self.max_abs = max(self.max_abs, float(d.abs().max()) * s)  # inf when the true value exceeds float64
        rel_tok = torch.where(rn > 0, (dn / rn).sqrt(), torch.where(dn > 0, math.inf, 0.0))
        dev_tok = torch.where(rn > 0, ((en / rn).sqrt() - 1).abs(), torch.where(en > 0, math.inf, 0.0))
        self.worst_norm_dev = max(self.worst_norm_dev, float(dev_tok.max()))
        i = int(rel_tok.argmax())
        if float(rel_tok[i]) > self.worst_rel:
            self.worst_rel, self.worst_tok = float(rel_tok[i]), start + i

    def result(self, rows: int) -> dict:
        e2, r2, d2, dot = self.e2, self.r2, self.d2, self.dot
        return {
            "rel_l2": math.sqrt(d2 / r2) if r2 > 0 else (0.0 if d2 == 0 else math.inf),
            "max_abs": self.max_abs,
            "norm_ratio": math.sqrt(e2 / r2) if r2 > 0 else (1.0 if e2 == 0 else math.inf),
            "cosine": max(-1.0, min(1.0, dot / math.sqrt(e2) / math.sqrt(r2))) if e2 > 0 and r2 > 0 else (1.0 if e2 == r2 else 0.0),
            "worst_token": self.worst_tok,
            "worst_token_rel": self.worst_rel,
            "worst_token_norm_dev": self.worst_norm_dev,
            "compared_values": self.compared,
            "rows": rows,
            "nonfinite_new": self.new,
            "nonfinite_lost": self.lost,
            "nonfinite_kind": self.kind,
            "nonfinite_ref": self.nonfinite_ref,
            "first_nonfinite_token": self.first_nonfinite,
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
