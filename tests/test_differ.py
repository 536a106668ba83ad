"""The first differ: metrics, set comparison with near-ties, verdict rules (docs/design.md §6)."""
import math

import pytest
import torch

from corruptcheck.judge.differ import compare_points
from corruptcheck.errors import BadInput
from corruptcheck.judge.metrics import float_metrics, set_disagreements
from corruptcheck.points import capture_points


def test_metrics_numbers():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(50, 8, generator=g, dtype=torch.float64)
    m = float_metrics(r * 1.1, r)
    assert m["rel_l2"] == pytest.approx(0.1, rel=1e-12)
    assert m["norm_ratio"] == pytest.approx(1.1, rel=1e-12)
    assert m["cosine"] == pytest.approx(1.0, abs=1e-12)  # cosine is blind to a 10% scale error
    e = r.clone()
    e[17] += 1.0
    m = float_metrics(e, r)
    assert m["worst_token"] == 17 and m["max_abs"] == pytest.approx(1.0)
    e[3, 2] = float("nan")
    assert float_metrics(e, r)["nonfinite_new"] == 1


def test_metrics_chunked_equals_direct(monkeypatch):
    import corruptcheck.judge.metrics as mm

    g = torch.Generator().manual_seed(1)
    r = torch.randn(300, 4, 16, generator=g)
    e = r + 1e-3 * torch.randn(300, 4, 16, generator=g)
    direct = float_metrics(e, r)
    monkeypatch.setattr(mm, "CHUNK_ELEMENTS", 64)
    chunked = mm.float_metrics(e, r)
    for k in ("rel_l2", "max_abs", "norm_ratio", "cosine"):
        assert chunked[k] == pytest.approx(direct[k], rel=1e-12)
    exact = ((e.double() - r.double()).norm() / r.double().norm()).item()
    assert direct["rel_l2"] == pytest.approx(exact, rel=1e-12)


def test_metrics_on_zero_rows():
    """moe.weights is compared on the rows where both chose the same experts; when an upstream
    fault changes every token's choice that is no row at all (found by a vLLM fault run)."""
    m = float_metrics(torch.zeros(0, 6), torch.zeros(0, 6))
    assert m["rel_l2"] == 0.0 and m["norm_ratio"] == 1.0 and m["worst_token"] == -1


def test_set_disagreement_tie_logic():
    scores = torch.tensor([[5.0, 4.0, 3.0, 2.999999, 1.0],
                           [5.0, 4.0, 3.0, 1.0, 0.5]], dtype=torch.float64)
    ref = torch.tensor([[0, 1, 2], [0, 1, 2]])
    # token 0: swap 2 for 3 (margin 1e-6/5 -> near tie); token 1: swap 2 for 4 (margin 2.5/5)
    eng = torch.tensor([[3, 1, 0], [0, 4, 1]])
    d = set_disagreements(eng, ref, scores, tie_rel=1e-5)
    assert (d["genuine"], d["tie_explained"], d["first_genuine_token"]) == (1, 1, 1)
    assert set_disagreements(ref.flip(-1), ref, scores, 1e-5)["genuine"] == 0  # order never matters
    assert set_disagreements(eng, ref, None, 1e-5)["genuine"] == 2  # no scores: no excuse


def test_compare_points_verdicts(tiny, tiny_ref):
    from corruptcheck.judge.reference_data import reference_for

    points, cov = tiny_ref
    noise = reference_for(tiny).noise["float32"]  # fp32 rounding of the values is honest noise
    specs = capture_points(tiny.config)
    engine = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in points.items()
              if not k.startswith("mtp.")}
    comp = compare_points(specs, points, engine, "float32", cov, noise)
    assert comp.verdict == "pass" and not comp.missing

    # one required point renamed -> missing, never pass; the rest still compared
    bad = dict(engine)
    bad["layers.2.attn.outx"] = bad.pop("layers.2.attn.out")
    comp = compare_points(specs, points, bad, "float32", cov, noise)
    assert comp.unknown == ["layers.2.attn.outx"] and comp.verdict == "error"
    assert next(p for p in comp.points if p.name == "layers.2.attn.out").verdict == "missing"
    del bad["layers.2.attn.outx"]
    comp = compare_points(specs, points, bad, "float32", cov, noise)
    assert [p.name for p in comp.missing] == ["layers.2.attn.out"]
    assert comp.verdict == "incomplete" and not comp.failed  # missing is never a pass, nor a corruption ...
    assert next(p for p in comp.points if p.name == "layers.2.attn.out").verdict == "missing"

    # nothing compared -> error, never pass
    assert compare_points(specs, points, {}, "float32", cov, noise).verdict == "error"

    # a 1% scale error at one point fails there and is the first divergence
    scaled = dict(engine)
    scaled["layers.1.attn.out"] = engine["layers.1.attn.out"] * 1.01
    comp = compare_points(specs, points, scaled, "float32", cov, noise)
    assert comp.verdict == "fail"
    assert comp.first_divergence == {"name": "layers.1.attn.out", "layer": 1}

    # wrong shape -> bad input
    wrong = dict(engine)
    wrong["layers.0.attn_norm"] = engine["layers.0.attn_norm"][:-1]
    with pytest.raises(BadInput, match="shape"):
        compare_points(specs, points, wrong, "float32", cov, noise)


def test_not_exercised_is_not_pass(tiny, tiny_ref):
    points, cov = tiny_ref
    cov = {**cov, "layers": [dict(entry) for entry in cov["layers"]]}
    for entry in cov["layers"]:
        if entry["layer"] == "layers.1":
            entry["indexer_pruning_queries"] = 0
    engine = {k: v for k, v in points.items() if not k.startswith("mtp.")}
    comp = compare_points(capture_points(tiny.config), points, engine, "float64", cov)
    p = next(p for p in comp.points if p.name == "layers.1.attn.indexer_topk")
    assert p.verdict == "not-exercised"


def test_genuine_index_disagreement_fails(tiny, tiny_ref):
    points, cov = tiny_ref
    engine = {k: v.clone() for k, v in points.items() if not k.startswith("mtp.")}
    topk = engine["layers.1.attn.indexer_topk"]
    row = int(torch.nonzero((topk >= 0).all(-1))[-1])  # a query with a full top-k
    scores = points["layers.1.attn.indexer_scores"][row]
    worst = int(torch.where(torch.isfinite(scores), scores, math.inf).argmin())
    topk[row, 0] = worst  # swap the best choice for the worst available entry
    comp = compare_points(capture_points(tiny.config), points, engine, "float32", cov)
    p = next(p for p in comp.points if p.name == "layers.1.attn.indexer_topk")
    assert p.verdict == "fail" and p.metrics["genuine"] == 1 and p.metrics["first_genuine_token"] == row
