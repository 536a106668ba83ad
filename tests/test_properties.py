"""Property-based tests (hypothesis) of the metrics, the differ and teacher-forcing attach:
whatever an engine sends, every point gets a verdict, the numbers match an exact oracle, an exact
copy passes at every precision, and a scale error, a permutation or a NaN never passes."""
import math
from fractions import Fraction

import pytest
import torch
from conftest import fuzz_settings
from hypothesis import assume, given
from hypothesis import strategies as st

from corruptcheck.judge.differ import Comparison, compare_float, compare_index, compare_points
from corruptcheck.judge.results import Point
from corruptcheck.judge.localize import attach
from corruptcheck.judge.metrics import float_metrics, set_disagreements
from corruptcheck.points import PointSpec
from corruptcheck.judge.tolerance import FLOOR, TIE_FLOOR, float_tolerance

PRECISIONS = sorted(FLOOR)
FLOAT_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FAST = fuzz_settings(300)
SPEC = PointSpec("layers.0.attn.out", "float", 0, True)


@st.composite
def shapes(draw, min_rows=0, max_rows=24, min_width=0):
    rows = draw(st.integers(min_rows, max_rows))
    tail = draw(st.lists(st.integers(min_width, 7), min_size=0 if min_width == 0 else 1, max_size=2))
    return (rows, *tail)


@st.composite
def tensors(draw, shape=None, dtype=torch.float64, min_exp=-250, max_exp=250, nonfinite=False):
    """Random normals times 2^k (k per tensor and per row), optionally with NaN / +-Inf."""
    shape = shape if shape is not None else draw(shapes())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype != torch.float64:  # stay inside the dtype's range (2^13 keeps float16 finite too)
        min_exp, max_exp = max(min_exp, -12), min(max_exp, 13)
    k = draw(st.integers(min_exp, max_exp))
    if x.dim() and x.shape[0]:
        spread = torch.randint(-8, 9, (x.shape[0],) + (1,) * (x.dim() - 1), generator=g)
        x = x * torch.pow(2.0, (k + spread).clamp(min_exp, max_exp).double())
    if nonfinite and x.numel():
        mask = torch.rand(shape, generator=g)
        x = torch.where(mask < 0.1, math.nan, torch.where(mask < 0.15, math.inf, torch.where(mask < 0.2, -math.inf, x)))
    return x.to(dtype)


def exact(e: torch.Tensor, r: torch.Tensor) -> dict:
    """Exact rational sums over the elements finite on both sides (the oracle)."""
    d2 = r2 = e2 = Fraction(0)
    for a, b in zip(e.double().flatten().tolist(), r.double().flatten().tolist()):
        if math.isfinite(a) and math.isfinite(b):
            fa, fb = Fraction(a), Fraction(b)
            d2 += (fa - fb) ** 2
            r2 += fb * fb
            e2 += fa * fa
    return {"d2": d2, "r2": r2, "e2": e2}


def _sqrt_ratio(a: Fraction, b: Fraction) -> float:
    return math.sqrt(float(a / b))


@FAST
@given(st.data())
def test_float_metrics_never_raise_and_count_parity(data):
    shape = data.draw(shapes())
    r = data.draw(tensors(shape, data.draw(st.sampled_from(FLOAT_DTYPES)), nonfinite=True))
    e = data.draw(tensors(shape, data.draw(st.sampled_from(FLOAT_DTYPES)), nonfinite=True))
    m = float_metrics(e, r)
    fe, fr = torch.isfinite(e.double()), torch.isfinite(r.double())
    assert m["compared_values"] == int((fe & fr).sum())
    assert m["nonfinite_new"] == int((~fe & fr).sum())
    assert m["nonfinite_lost"] == int((fe & ~fr).sum())
    assert m["rel_l2"] >= 0 and m["norm_ratio"] >= 0 and -1.0 <= m["cosine"] <= 1.0
    assert not any(isinstance(v, float) and math.isnan(v) for v in m.values())


@FAST
@given(st.data())
def test_float_metrics_match_exact_oracle(data):
    """rel_l2 and norm ratio within 1e-12 of exact rational arithmetic, across 500 binary orders
    of magnitude (no overflow to inf, no underflow to 0) and any chunking."""
    shape = data.draw(shapes(min_rows=1, min_width=1))
    r = data.draw(tensors(shape))
    e = (r * (1 + data.draw(st.floats(-0.5, 0.5))) + data.draw(tensors(shape))
         * data.draw(st.sampled_from([0.0, 1e-9, 1e-3, 1.0]))) if data.draw(st.booleans()) else data.draw(tensors(shape))
    import corruptcheck.judge.metrics as mm
    chunk = data.draw(st.sampled_from([1, 3, 64, mm.CHUNK_ELEMENTS]))
    old = mm.CHUNK_ELEMENTS
    mm.CHUNK_ELEMENTS = chunk
    try:
        m = float_metrics(e, r)
    finally:
        mm.CHUNK_ELEMENTS = old
    x = exact(e, r)
    assume(x["r2"] > 0)
    assert m["rel_l2"] == pytest.approx(_sqrt_ratio(x["d2"], x["r2"]), rel=1e-12, abs=1e-300)
    assert m["norm_ratio"] == pytest.approx(_sqrt_ratio(x["e2"], x["r2"]), rel=1e-12, abs=1e-300)


@FAST
@given(st.data())
def test_exact_copy_passes_at_every_precision(data):
    shape = data.draw(shapes(min_rows=1, min_width=1))
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES))
    e = data.draw(tensors(shape, dtype, nonfinite=data.draw(st.booleans())))
    r = e.to(torch.float64)
    assume(bool(torch.isfinite(r).any()))
    for precision in PRECISIONS:
        res = compare_float(SPEC, e, r, float_tolerance(None, precision, "free"), {}, {})
        assert res.verdict == "pass", (precision, res.reason)
        assert res.ratio == 0.0


@FAST
@given(st.data())
def test_scale_error_beyond_the_band_fails(data):
    shape = data.draw(shapes(min_rows=1, min_width=1))
    r = data.draw(tensors(shape))
    assume(bool((r != 0).any()))
    precision = data.draw(st.sampled_from(PRECISIONS))
    noise = data.draw(st.none() | st.fixed_dictionaries({"rel_l2": st.floats(0, 0.3), "norm_dev": st.floats(0, 0.05)}))
    tol = float_tolerance(noise, precision, "free")
    factor = data.draw(st.floats(1.01, 1e6))
    sign = data.draw(st.sampled_from([1, -1]))
    delta = min(sign * tol["norm_ratio_band"] * factor, 100.0)
    assume(delta > -1.0 + 1e-9)
    res = compare_float(SPEC, r * (1 + delta), r, tol, {}, {})
    assert res.verdict == "fail" and res.ratio > 1


@FAST
@given(st.data())
def test_token_or_channel_permutation_fails(data):
    """Distinct random rows (channels), any non-identity permutation: fail at every precision's
    floor; under any tolerance, fail exactly when the exact error exceeds it."""
    t = data.draw(st.integers(2, 20))
    c = data.draw(st.integers(2, 9))
    r = data.draw(tensors((t, c), min_exp=-20, max_exp=20))
    axis = data.draw(st.sampled_from([0, 1]))
    perm = data.draw(st.permutations(range(r.shape[axis])))
    assume(perm != sorted(perm))
    e = r[list(perm)] if axis == 0 else r[:, list(perm)]
    for precision in PRECISIONS:
        assert compare_float(SPEC, e, r, float_tolerance(None, precision, "free"), {}, {}).verdict == "fail"
    rel = data.draw(st.floats(1e-6, 2.0))
    tol = float_tolerance({"rel_l2": rel / 3, "norm_dev": 0.0}, "bfloat16", "free")
    x = exact(e, r)
    truth = _sqrt_ratio(x["d2"], x["r2"])
    assume(abs(truth - tol["value"]) > 1e-9 * tol["value"])
    res = compare_float(SPEC, e, r, tol, {}, {})
    assert res.verdict == ("fail" if truth > tol["value"] else "pass")


@FAST
@given(st.data())
def test_a_nan_or_inf_the_reference_lacks_never_passes(data):
    shape = data.draw(shapes(min_rows=1, min_width=1))
    r = data.draw(tensors(shape))
    e = r.clone().reshape(-1)
    i = data.draw(st.integers(0, e.numel() - 1))
    e[i] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    res = compare_float(SPEC, e.reshape(shape), r, float_tolerance({"rel_l2": 1.0, "norm_dev": 1.0}, "bfloat16", "free"), {}, {})
    assert res.verdict == "fail" and "NaN/Inf" in res.reason and res.ratio == math.inf
    assert res.metrics["first_nonfinite_token"] == i // max(1, math.prod(shape[1:]))


@FAST
@given(st.data())
def test_nothing_comparable_never_passes(data):
    """Empty tensors, zero channels, all-NaN: fail with the reason."""
    kind = data.draw(st.sampled_from(["empty", "nan"]))
    if kind == "empty":
        shape = data.draw(st.sampled_from([(0,), (0, 5), (4, 0), (0, 3, 2)]))
        e = r = torch.zeros(shape, dtype=torch.float64)
    else:
        shape = data.draw(shapes(min_rows=1, min_width=1))
        e = r = torch.full(shape, math.nan, dtype=torch.float64)
    res = compare_float(SPEC, e, r, float_tolerance(None, "float32", "free"), {}, {})
    assert res.verdict == "fail" and res.ratio == math.inf and "no value" in res.reason


@FAST
@given(st.data())
def test_moe_weights_where_no_token_agrees(data):
    t, k, n = data.draw(st.integers(0, 12)), data.draw(st.integers(1, 4)), 16
    ref_ids = torch.stack([torch.randperm(n)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    eng_ids = (ref_ids + data.draw(st.integers(1, n - 1))) % n  # every token chose differently
    name = "layers.1.moe.weights"
    w = torch.rand(t, k, dtype=torch.float64)
    spec = PointSpec(name, "float", 1, True)
    res = compare_float(spec, w.float(), w, float_tolerance(None, "bfloat16", "free"),
                        {"layers.1.moe.experts": eng_ids}, {"layers.1.moe.experts": ref_ids})
    assert res.verdict == "fail" and "no token chose the reference's experts" in res.reason
    assert res.metrics["rows_compared"] == 0


def _sets_oracle(eng, ref, scores, tie_rel):
    """The rule, token by token in plain Python."""
    genuine, ties = [], 0
    width = None if scores is None else scores.shape[1]
    for t in range(ref.shape[0]):
        e_ids, r_ids = eng[t].tolist(), ref[t].tolist()
        bad = any(v < -1 or (width is not None and v >= width) for v in e_ids)
        a = {v for v in r_ids if v >= 0}
        b = {v for v in e_ids if v >= 0 and (width is None or v < width)}
        if bad:
            genuine.append(t)
            continue
        if a == b:
            continue
        lost, gained = sorted(a - b), sorted(b - a)
        if scores is None or len(lost) != len(gained):
            genuine.append(t)
            continue
        row = scores[t].double()
        fin = row[torch.isfinite(row)]
        scale = float(fin.abs().max()) if fin.numel() and float(fin.abs().max()) > 0 else 1.0
        if not bool(torch.isfinite(row[gained]).all()):
            genuine.append(t)
            continue
        margin = max(0.0, float(row[lost].min() - row[gained].max())) / scale
        if margin <= tie_rel:
            ties += 1
        else:
            genuine.append(t)
    return len(genuine), ties, (genuine[0] if genuine else None)


@fuzz_settings(300)
@given(st.data())
def test_set_disagreements_match_the_rule(data):
    t, k, n = data.draw(st.integers(0, 10)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ref = torch.randint(-1, n, (t, k), generator=g)
    eng = torch.where(torch.rand(t, k, generator=g) < 0.3, torch.randint(-3, n + 3, (t, k), generator=g), ref)
    if data.draw(st.booleans()):
        eng = eng[:, torch.randperm(k, generator=g)]  # order never matters
    scores = None
    if data.draw(st.booleans()):
        scores = torch.randn(t, n, generator=g, dtype=torch.float64)
        scores = torch.where(torch.rand(t, n, generator=g) < 0.1, -math.inf, scores)
        if data.draw(st.booleans()):
            scores = scores.round(decimals=1)  # exact ties
    tie_rel = data.draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    d = set_disagreements(eng, ref, scores, tie_rel)
    assert (d["genuine"], d["tie_explained"], d["first_genuine_token"]) == _sets_oracle(eng, ref, scores, tie_rel)
    spec = PointSpec("layers.0.moe.experts", "index", 0, True)
    res = compare_index(spec, eng, ref, scores, "bfloat16", None)
    at_floor = set_disagreements(eng, ref, scores, TIE_FLOOR["bfloat16"])
    assert res.verdict == ("fail" if at_floor["genuine"] or t == 0 else "pass")  # no tokens: nothing compared


@fuzz_settings(200)
@given(st.data())
def test_attach_on_any_verdict_pattern(data):
    """Teacher-forcing attach: the culprit is the first point in capture order whose local result
    fails; every failing point gets a role; nothing raises on missing or odd local results."""
    names = ["embed"] + [f"layers.{i}.{p}" for i in range(3) for p in ("attn_hc.in", "attn.out", "ffn_hc.in", "moe.out", "out")]
    verdicts = ["pass", "fail", "missing", "not-exercised", "skipped"]
    points = [Point(n, data.draw(st.sampled_from(verdicts)), None if n == "embed" else int(n.split(".")[1]),
                    "float", {"rel_l2": data.draw(st.none() | st.floats(0, 10))},
                    ratio=data.draw(st.none() | st.floats(0, 10) | st.just(math.inf))) for n in names]
    local = {}
    for n in names:
        choice = data.draw(st.sampled_from(["absent", "pass", "fail", "unavailable", "not-exercised"]))
        if choice != "absent":
            local[n] = {"verdict": choice, "ratio": data.draw(st.none() | st.floats(0, 10) | st.just(math.inf)),
                        "reason": "x"}
    comp = Comparison(points, "bfloat16")
    culprit = attach(comp, dict(local))
    effective = dict(local)
    if points[0].verdict in ("pass", "fail") and "embed" not in effective:
        effective["embed"] = {"verdict": points[0].verdict}
    first = next((p for p in points if effective.get(p.name, {}).get("verdict") == "fail"), None)
    assert (culprit.name if culprit else None) == (first.name if first else None)
    for p in points:
        if p.verdict == "fail":
            assert p.local and p.local.get("role")
            assert (p.local["role"] == "culprit") == (first is not None and p.name == first.name)
    if culprit is not None:
        assert culprit.local_ratio is None or math.isfinite(culprit.local_ratio)


@FAST
@given(st.data())
def test_compare_points_gives_every_point_a_verdict(data):
    """Any engine dict (points present, absent, scaled, NaN, wrong ids) against a small set of
    reference points: a verdict per point, never a pass on a non-finite or a missing point."""
    t = data.draw(st.integers(0, 6))
    specs = [PointSpec("embed", "float", None, True), PointSpec("layers.0.attn.out", "float", 0, True),
             PointSpec("layers.0.moe.experts", "index", 0, True), PointSpec("layers.0.moe.weights", "float", 0, True),
             PointSpec("layers.0.attn.q", "float", 0, False)]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    ref = {"embed": torch.randn(t, 4, generator=g, dtype=torch.float64),
           "layers.0.attn.out": torch.randn(t, 4, generator=g, dtype=torch.float64),
           "layers.0.moe.experts": torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(t)])
           if t else torch.zeros(0, 2, dtype=torch.long),
           "layers.0.moe.weights": torch.rand(t, 2, generator=g, dtype=torch.float64),
           "layers.0.attn.q": torch.randn(t, 3, generator=g, dtype=torch.float64),
           "layers.0.moe.selection_scores": torch.randn(t, 8, generator=g, dtype=torch.float64)}
    engine = {}
    for name, r in ref.items():
        if name.endswith("selection_scores"):
            continue
        how = data.draw(st.sampled_from(["copy", "absent", "scaled", "nan", "ids"]))
        if how == "absent":
            continue
        x = r.clone()
        if how == "scaled" and x.is_floating_point():
            x = x * 1.5
        elif how == "nan" and x.is_floating_point() and x.numel():
            x.view(-1)[0] = math.nan
        elif how == "ids" and not x.is_floating_point():
            x = torch.randint(-5, 20, x.shape, generator=g)
        engine[name] = x.float() if x.is_floating_point() else x
    cov = {"layers": [{"layer": "layers.0", "mechanisms": {}}]}
    comp = compare_points(specs, ref, engine, "bfloat16", cov)
    assert [p.name for p in comp.points] == [s.name for s in specs]
    for p in comp.points:
        assert p.verdict in ("pass", "fail", "missing", "skipped", "not-exercised")
        if p.name not in engine:
            assert p.verdict in ("missing", "skipped")
        elif t == 0:
            assert p.verdict != "pass"
        elif p.kind == "float" and not bool(torch.isfinite(engine[p.name]).all()):
            assert p.verdict == "fail"
    if t == 0 or not engine:
        assert comp.verdict != "pass"


@st.composite
def adversarial_rows(draw):
    """Rows wider than the kernel's block (row_sums.BLOCK), built to hurt a summation: values
    spread over 2^-600..2^600 inside one row, an engine that cancels the reference, sprinkled
    NaN / Inf, zero and subnormal rows."""
    rows, width = draw(st.integers(1, 4)), draw(st.sampled_from([1, 511, 513, 1300]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lo, hi = sorted((draw(st.integers(-600, 600)), draw(st.integers(-600, 600))))
    exps = torch.randint(lo, hi + 1, (rows, width), generator=g).double()
    r = torch.randn(rows, width, generator=g, dtype=torch.float64) * torch.pow(2.0, exps)
    kind = draw(st.sampled_from(["near", "cancel", "independent", "scaled"]))
    if kind == "near":
        e = r * (1 + 1e-6 * torch.randn(rows, width, generator=g, dtype=torch.float64))
    elif kind == "cancel":  # e ≈ -r: e·r cancels nothing but d = 2r; e + r cancels to the noise
        e = -r * (1 + 1e-12 * torch.randn(rows, width, generator=g, dtype=torch.float64))
    elif kind == "scaled":
        e = r * draw(st.sampled_from([2.0 ** -300, 1.0 + 2.0 ** -40, 2.0 ** 300]))
    else:
        e = torch.randn(rows, width, generator=g, dtype=torch.float64) * torch.pow(2.0, exps)
    special = draw(st.sampled_from(["none", "zero-row", "subnormal-row", "nonfinite"]))
    if special == "zero-row":
        r[0], e[0] = 0.0, 0.0 if draw(st.booleans()) else e[0]
    elif special == "subnormal-row":
        r[0], e[0] = r[0].sign() * 2.0 ** -1070, e[0].sign() * 2.0 ** -1072
    elif special == "nonfinite":
        m = torch.rand(rows, width, generator=g)
        e = torch.where(m < 0.01, math.nan, torch.where(m < 0.02, math.inf, e))
        r = torch.where((m > 0.5) & (m < 0.51), -math.inf, r)
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    return e.to(dtype) if dtype == torch.float64 or (lo > -120 and hi < 120) else e, r


def exact_cosine(e: torch.Tensor, r: torch.Tensor) -> float | None:
    dot = e2 = r2 = Fraction(0)
    for a, b in zip(e.double().flatten().tolist(), r.double().flatten().tolist()):
        if math.isfinite(a) and math.isfinite(b):
            dot, e2, r2 = dot + Fraction(a) * Fraction(b), e2 + Fraction(a) ** 2, r2 + Fraction(b) ** 2
    if not e2 or not r2:
        return None
    return float(dot / e2) * math.sqrt(float(e2 / r2))  # dot / (|e| |r|) = (dot / e2) * |e| / |r|


@fuzz_settings(40)
@given(adversarial_rows())
def test_float_metrics_accuracy_on_adversarial_rows(er):
    """The one-pass kernel (row_sums.py) against exact rational arithmetic: rel_l2 and the norm
    ratio within 1e-13 relative, the cosine within 1e-13, on rows built to break summation."""
    e, r = er
    m = float_metrics(e, r)
    x = exact(e, r)
    if x["r2"] > 0:
        assert m["rel_l2"] == pytest.approx(_sqrt_ratio(x["d2"], x["r2"]), rel=1e-13, abs=1e-300)
        assert m["norm_ratio"] == pytest.approx(_sqrt_ratio(x["e2"], x["r2"]), rel=1e-13, abs=1e-300)
    cos = exact_cosine(e, r)
    if cos is not None:
        assert abs(m["cosine"] - max(-1.0, min(1.0, cos))) <= 1e-13
    fe, fr = torch.isfinite(e.double()), torch.isfinite(r.double())
    assert m["compared_values"] == int((fe & fr).sum())


def test_float_metrics_do_not_depend_on_the_thread_count():
    """Rows are summed independently, so one thread and two give bit-identical numbers."""
    from corruptcheck.judge import row_sums
    g = torch.Generator().manual_seed(3)
    r = torch.randn(257, 1300, generator=g, dtype=torch.float64)
    e = (r * (1 + 1e-4 * torch.randn(257, 1300, generator=g, dtype=torch.float64))).float()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = float_metrics(e, r)
        torch.set_num_threads(2)
        two = float_metrics(e, r)
    finally:
        torch.set_num_threads(threads)
        row_sums.set_threads(threads)
    assert one == two
