"""One pass over an engine tensor and its reference: per-row float64 sums, compiled (numba).

For each row t of e, r ([T, N], float32 or float64) the kernel writes

    sums[t]   = (Σ e², Σ r², Σ (e-r)², Σ e·r, max |e-r|, s)   over elements finite on both sides,
                each sum in units of s² (s: a power of two; 1 for ordinary rows)
    counts[t] = (nonfinite_new, nonfinite_lost, nonfinite_kind, nonfinite_ref, compared)

Every element is widened to float64 before it is used, so e - r, e², r², e·r carry one
float64 rounding each.

Fast path (`_fast_row`): the four sums over blocks of BLOCK elements, each block summed by the
compiler's vector lanes (reassociation allowed inside a block only: a fixed order for a given
build, the same for e² and r², so an exact copy still has e² == r²), block totals added to the
row totals. The rounding error of a row sum of non-negative terms stays below about
(BLOCK / V + N / BLOCK + V) float64 ulps of the sum (V: the vector lanes, 8..32), e.g. ~300
ulps (7e-14 relative) for a 129k-wide logits row, where one running sum allows N ulps. When all
four sums of a block are finite every element of it was finite (a NaN or Inf makes e² or r²
non-finite), and then max |e - r| is taken in a second pass over the block (still in cache). The row is accepted
when e² and r² are >= 2^-800 as well: every square that underflows is then below 2^-200 of
the sum.

Careful path (`_careful_row`) for any other row (a NaN / Inf, values near the float64 range, a
zero row): element by element, classified (finite, NaN, +Inf, -Inf) on both sides, the finite
pairs scaled by 1 / s, s the smallest power of two above the row's largest finite magnitude (an
exact scaling), so no sum overflows or loses its small terms.

Rows are spread over the threads with `prange`; each row is independent, so the numbers do not
depend on the thread count.
"""
from __future__ import annotations

import math

import numba
import numpy as np

LANES = 8  # interleaved sums of the careful path
BLOCK = 512
_TINY2 = 2.0 ** -800
N_SUMS, N_COUNTS = 6, 5


@numba.njit(cache=True, inline="always")
def _class(x):
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    if math.isnan(x):
        return 1
    if math.isinf(x):
        return 2 if x > 0 else 3
    return 0


@numba.njit(cache=True, fastmath={"reassoc"})
def _block(e, r):
    """(Σ e², Σ r², Σ (e-r)², Σ e·r) over a block in float64, vectorised (indices from 0, so the
    compiler sees no negative index)."""
    e2 = r2 = d2 = dot = 0.0
    for j in range(e.shape[0]):
        ev = np.float64(e[j])
        rv = np.float64(r[j])
        d = ev - rv
        e2 += ev * ev
        r2 += rv * rv
        d2 += d * d
        dot += ev * rv
    return e2, r2, d2, dot


@numba.njit(cache=True, fastmath=True)
def _max_abs_diff(e, r):
    """max |e - r| over a row known to be finite (fast-math may assume it)."""
    m = 0.0
    for j in range(e.shape[0]):
        m = max(m, abs(np.float64(e[j]) - np.float64(r[j])))
    return m


@numba.njit(cache=True)
def _fast_row(e, r, out) -> bool:
    """Unscaled block sums of one row into out[0:6]; False when the row needs `_careful_row`."""
    n = e.shape[0]
    e2 = r2 = d2 = dot = dmax = 0.0
    for b0 in range(0, n, BLOCK):
        eb, rb = e[b0:b0 + BLOCK], r[b0:b0 + BLOCK]
        be2, br2, bd2, bdot = _block(eb, rb)
        if not (math.isfinite(be2) and math.isfinite(br2) and math.isfinite(bd2) and math.isfinite(bdot)):
            return False
        dmax = max(dmax, _max_abs_diff(eb, rb))  # the block is finite and still in cache
        e2 += be2
        r2 += br2
        d2 += bd2
        dot += bdot
    if not (math.isfinite(e2) and math.isfinite(r2) and math.isfinite(d2) and math.isfinite(dot)):
        return False
    if e2 < _TINY2 or r2 < _TINY2:
        return False
    out[0], out[1], out[2], out[3], out[4], out[5] = e2, r2, d2, dot, dmax, 1.0
    return True


@numba.njit(cache=True)
def _careful_row(e, r, out, cnt):
    """Classified, scaled sums of one row (any values); out[5] = the scale s."""
    n = e.shape[0]
    amax = 0.0
    for j in range(n):
        ev = np.float64(e[j])
        rv = np.float64(r[j])
        if math.isfinite(ev) and math.isfinite(rv):
            m = max(abs(ev), abs(rv))
            amax = m if m > amax else amax
    s = 1.0
    if amax > 0.0:  # the smallest power of two > amax, kept where 1 / s is a normal number
        s = math.ldexp(1.0, min(max(math.frexp(amax)[1], -1021), 1023))
    inv = 1.0 / s  # exact: s is a power of two
    e2 = r2 = d2 = dot = 0.0
    dmax = 0.0
    new = lost = kind = nref = compared = 0
    le2 = np.zeros(LANES)
    lr2 = np.zeros(LANES)
    ld2 = np.zeros(LANES)
    ldt = np.zeros(LANES)
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        le2[:] = 0.0
        lr2[:] = 0.0
        ld2[:] = 0.0
        ldt[:] = 0.0
        for j in range(b0, b1):
            ev = np.float64(e[j])
            rv = np.float64(r[j])
            fe = math.isfinite(ev)
            fr = math.isfinite(rv)
            if not fr:
                nref += 1
            if fe and fr:
                compared += 1
                k = (j - b0) % LANES
                es = ev * inv
                rs = rv * inv
                d = es - rs
                le2[k] += es * es
                lr2[k] += rs * rs
                ld2[k] += d * d
                ldt[k] += es * rs
                ad = abs(d)
                dmax = ad if ad > dmax else dmax
            elif fr:
                new += 1
            elif fe:
                lost += 1
            elif _class(ev) != _class(rv):
                kind += 1
        e2 += le2.sum()
        r2 += lr2.sum()
        d2 += ld2.sum()
        dot += ldt.sum()
    out[0], out[1], out[2], out[3], out[4], out[5] = e2, r2, d2, dot, dmax * s, s
    cnt[0], cnt[1], cnt[2], cnt[3], cnt[4] = new, lost, kind, nref, compared


@numba.njit(parallel=True, cache=True)
def row_sums(e, r, sums, counts):
    """Fill sums [T, 6] (float64) and counts [T, 5] (int64) for e, r [T, N]; see the module doc."""
    n = e.shape[1]
    for t in numba.prange(e.shape[0]):
        if _fast_row(e[t], r[t], sums[t]):
            counts[t, 0] = 0
            counts[t, 1] = 0
            counts[t, 2] = 0
            counts[t, 3] = 0
            counts[t, 4] = n
        else:
            _careful_row(e[t], r[t], sums[t], counts[t])


def set_threads(n: int) -> None:
    """Threads for `row_sums` (numba's pool; at most what numba started with)."""
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
