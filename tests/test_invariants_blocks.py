"""docs/v4-spec.md §12 self-checks of the DeepSeek V4 reference (`corruptcheck.reference`): hash routing and the router (docs/v4-spec.md §6.2,
§12.5), the incremental compressor (docs/v4-spec.md §5.5, §12.3), indexer top-k (docs/v4-spec.md
§5.6, §10.14), clamped SwiGLU (docs/v4-spec.md §6.3, §10.17), precision modes (docs/v4-spec.md §10.25).

Every test asserts numbers against stated bounds, and every test can fail: where an invariant
could hold vacuously (nothing changed, nothing pruned, nothing clamped) the test also asserts
that the thing it guards was really exercised."""
from __future__ import annotations


import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from corruptcheck.reference import run
from corruptcheck.reference.attention import available, select_topk, sub
from corruptcheck.reference.compressor import IncrementalCompressor, compress
from corruptcheck.reference.model import rope_tables
from corruptcheck.reference.moe import swiglu_hidden
from corruptcheck.reference.precision import Precision
from invariants_common import F64, HYP, HYP_SMALL, PREC64, tiny, tiny_batch_run, tiny_seq0_run


# ============================================================================ 5. router
def test_hash_routing_and_hidden_state_independence():
    cfg, params, seqs = tiny()
    ids = torch.cat(seqs)
    base = tiny_batch_run()
    hash_layers = [layer for layer in range(cfg.num_layers) if cfg.is_hash_layer(layer)]
    learned = [layer for layer in range(cfg.num_layers) if not cfg.is_hash_layer(layer)]
    assert hash_layers == [0, 1] and learned and not cfg.is_hash_layer(cfg.num_layers)

    for layer in hash_layers:
        table = params[f"layers.{layer}.ffn.gate.tid2eid"]
        expect = torch.sort(table[ids].long(), dim=-1).values
        got = base.points[f"layers.{layer}.moe.experts"]
        assert torch.equal(got, expect), layer
        assert f"layers.{layer}.moe.selection_scores" not in base.points
        # the hash choice is not what the learned scores would have picked (non-vacuous)
        scores = F.softplus(base.points[f"layers.{layer}.moe.router_logits"]).sqrt()
        learned_pick = torch.sort(scores.topk(cfg.experts_per_tok, -1).indices, -1).values
        assert (learned_pick != got).any(-1).float().mean().item() > 0.5

    g = torch.Generator().manual_seed(7)
    p2 = dict(params)
    p2["embed.weight"] = params["embed.weight"] + 0.05 * torch.randn(params["embed.weight"].shape, generator=g)
    pert = run(cfg, p2, seqs, "float64")
    for layer in hash_layers:
        key = f"layers.{layer}.moe"
        assert torch.equal(pert.points[f"{key}.experts"], base.points[f"{key}.experts"]), layer
        diff = (pert.points[f"{key}.router_logits"] - base.points[f"{key}.router_logits"]).abs().max().item()
        assert diff > 1e-6, layer
        # hash layers still weight by the (changed) learned scores
        assert not torch.equal(pert.points[f"{key}.weights"], base.points[f"{key}.weights"]), layer
    # the same perturbation does move some learned-layer selection
    assert any(not torch.equal(pert.points[f"layers.{layer}.moe.experts"], base.points[f"layers.{layer}.moe.experts"])
               for layer in learned)


def _check_weights(points, prefix, cfg):
    logits = points[f"{prefix}.router_logits"]
    experts = points[f"{prefix}.experts"]
    weights = points[f"{prefix}.weights"]
    s = F.softplus(logits).sqrt()
    w = s.gather(1, experts)
    w = w / w.sum(-1, keepdim=True) * cfg.route_scale
    assert (w - weights).abs().max().item() <= 1e-12, prefix
    assert (weights.sum(-1) - cfg.route_scale).abs().max().item() <= 1e-12, prefix
    assert (weights > 0).all()


def test_learned_routing_bias_selects_unbiased_weights():
    cfg, params, _ = tiny()
    pts = tiny_batch_run().points
    for layer in range(cfg.num_layers + 1):  # include the MTP block
        prefix = "mtp.0.moe" if layer == cfg.num_layers else f"layers.{layer}.moe"
        _check_weights(pts, prefix, cfg)  # hash layers too: weights from learned scores
        if cfg.is_hash_layer(layer):
            continue
        pp = "mtp.0.ffn" if layer == cfg.num_layers else f"layers.{layer}.ffn"
        bias = params[f"{pp}.gate.bias"].to(F64)
        logits = pts[f"{prefix}.router_logits"]
        scores = F.softplus(logits).sqrt()
        sel = pts[f"{prefix}.selection_scores"]
        assert (sel - (scores + bias)).abs().max().item() <= 1e-12, prefix
        experts = pts[f"{prefix}.experts"]
        assert torch.equal(experts, torch.sort(sel.topk(cfg.experts_per_tok, -1).indices, -1).values), prefix
        # the bias matters for the selection of some token ...
        unbiased_pick = torch.sort(scores.topk(cfg.experts_per_tok, -1).indices, -1).values
        assert (unbiased_pick != experts).any(-1).any(), prefix
        # ... but not for the weights: normalised biased scores are measurably different
        wb = sel.gather(1, experts)
        wb = wb / wb.sum(-1, keepdim=True) * cfg.route_scale
        assert (wb - pts[f"{prefix}.weights"]).abs().max().item() > 1e-4, prefix


# ============================================================================ 6. compressor
def _compressor_setup(prefix: str, ratio: int, overlap: bool, s: int, seed: int):
    cfg, params, _ = tiny()
    p = {k: v.to(F64) for k, v in sub(params, prefix).items()}
    assert p, prefix
    assert p["ape"].shape[0] == ratio and p["wkv.weight"].shape[0] == (2 if overlap else 1) * p["norm.weight"].shape[0]
    kw = dict(ratio=ratio, overlap=overlap, norm_eps=cfg.rms_eps, freqs=rope_tables(cfg)["compress"],
              rope_dim=cfg.rope_dim, prec=PREC64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, cfg.hidden_size, generator=g, dtype=F64)
    return x, p, kw


COMPRESSORS = {
    # name: (param prefix, ratio, overlap, sequence length)
    "csa": ("layers.1.attn.compressor", 4, True, 53),
    "hca": ("layers.2.attn.compressor", 16, False, 70),
    "indexer": ("layers.1.attn.indexer.compressor", 4, True, 53),
}
PREFILL_SPLITS = {
    "csa": [1, 3, 4, 6, 8, 13, 52],     # < m, % m != 0, at boundaries
    "hca": [5, 15, 16, 21, 32, 48, 69],
    "indexer": [2, 4, 9],
}


def _feed(x, p, kw, cuts):
    comp = IncrementalCompressor(p, **kw)
    out, fed = [], 0
    for a, b in zip([0] + cuts, cuts + [x.shape[0]]):
        e = comp.feed(x[a:b])
        fed = b
        assert e.shape[0] == fed // kw["ratio"] - sum(o.shape[0] for o in out), (a, b)
        out.append(e)
    return torch.cat(out)


@pytest.mark.parametrize("kind", list(COMPRESSORS))
def test_incremental_compressor_prefill_then_decode(kind):
    prefix, ratio, overlap, s = COMPRESSORS[kind]
    x, p, kw = _compressor_setup(prefix, ratio, overlap, s, seed=11)
    full = compress(x, p, **kw)
    assert full.shape == (s // ratio, p["norm.weight"].shape[0])
    splits = PREFILL_SPLITS[kind]
    assert any(t < ratio for t in splits) and any(t % ratio for t in splits)
    assert any(t % ratio == 0 for t in splits)
    for t0 in splits:
        cuts = [t0] + list(range(t0 + 1, s))  # prefill t0 tokens, then one token at a time
        inc = _feed(x, p, kw, cuts)
        assert inc.shape == full.shape
        assert (inc - full).abs().max().item() <= 1e-12, t0
    # positions matter: a compressor that restarted positions at the chunk would differ
    restarted = torch.cat([compress(x[:16], p, **kw), compress(x[16:16 + (s - 16) // ratio * ratio], p, **kw)])
    assert (restarted - full[: restarted.shape[0]]).abs().max().item() > 1e-6


@HYP_SMALL
@given(st.sampled_from(list(COMPRESSORS)), st.data())
def test_incremental_compressor_random_chunks(kind, data):
    prefix, ratio, overlap, s = COMPRESSORS[kind]
    x, p, kw = _compressor_setup(prefix, ratio, overlap, s, seed=12)
    cuts = sorted(data.draw(st.sets(st.integers(1, s - 1), max_size=12), label="cuts"))
    inc = _feed(x, p, kw, cuts)
    full = compress(x, p, **kw)
    assert inc.shape == full.shape
    assert (inc - full).abs().max().item() <= 1e-12


# ============================================================================ 7. indexer
def test_select_topk_minus_one_never_zero():
    ratio, s = 4, 12
    n = s // ratio
    # raw scores where the *future* entries score highest: those picks must become -1
    scores = torch.tensor([[1.0, 2.0, 3.0]] * s, dtype=F64)
    out = select_topk(scores, 2, ratio)
    assert out.shape == (s, 2)
    for t in range(s):
        limit = (t + 1) // ratio
        picks = out[t].tolist()
        assert all(i == -1 or 0 <= i < limit for i in picks), (t, picks)
        if limit == 0:
            assert picks == [-1, -1], t  # never substitutes 0
    # masked scores as the indexer produces them: the best available entries are kept
    masked = scores.masked_fill(~available(s, n, ratio), float("-inf"))
    out = select_topk(masked, 5, ratio)  # k_max > n: padded with -1 to width k_max
    assert out.shape == (s, 5)
    for t in range(s):
        limit = (t + 1) // ratio
        valid = sorted(i for i in out[t].tolist() if i >= 0)
        assert valid == list(range(limit)), t
        assert out[t].tolist().count(-1) == 5 - limit


@HYP
@given(st.integers(1, 40), st.sampled_from([1, 2, 4, 8]), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_select_topk_random(s, ratio, k_max, seed):
    n = s // ratio
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(s, n, generator=g, dtype=F64)
    scores = raw.masked_fill(~available(s, n, ratio), float("-inf"))
    out = select_topk(scores, k_max, ratio)
    assert out.shape == (s, k_max) and out.dtype == torch.long
    for t in range(s):
        limit = (t + 1) // ratio
        picks = out[t].tolist()
        valid = [i for i in picks if i >= 0]
        assert all(i == -1 for i in picks if i < 0)
        assert len(valid) == len(set(valid)) == min(k_max, limit), (t, picks)
        assert all(i < limit for i in valid)
        best = set(torch.argsort(raw[t, :limit], descending=True)[:k_max].tolist())
        assert set(valid) == best, t


def test_indexer_prunes_in_tiny_run():
    cfg, _, _ = tiny()
    ids, r = tiny_seq0_run()
    s = ids.shape[0]
    csa_layers = [layer for layer in range(cfg.num_layers) if cfg.layer_type(layer) == "csa"]
    assert csa_layers
    for layer in csa_layers:
        topk = r.points[f"layers.{layer}.attn.indexer_topk"]
        scores = r.points[f"layers.{layer}.attn.indexer_scores"]
        n = r.points[f"layers.{layer}.attn.compressed_kv"].shape[0]
        avail = available(s, n, cfg.csa_ratio).sum(1)
        chosen = (topk >= 0).sum(1)
        assert torch.equal(chosen, avail.clamp(max=cfg.index_topk)), layer
        pruned = avail > chosen
        assert pruned.any() and int(avail.max()) > cfg.index_topk, layer
        limit = ((torch.arange(s) + 1) // cfg.csa_ratio)[:, None]
        assert ((topk < limit) | (topk == -1)).all(), layer
        # the kept entries are the best-scoring available ones
        for t in torch.nonzero(pruned).flatten().tolist():
            kept = scores[t, topk[t][topk[t] >= 0]]
            dropped = scores[t, : int(avail[t])][~torch.isin(torch.arange(int(avail[t])), topk[t])]
            assert kept.min() >= dropped.max(), (layer, t)


# ============================================================================ 8. SwiGLU clamp
def test_swiglu_clamp_gate_upper_only_up_both_sides():
    limit = 10.0
    # y = [g, u]; w1 picks g, w3 picks u
    gu = torch.tensor([
        [15.0, 3.0],     # gate clamped at +10
        [-15.0, 3.0],    # gate NOT clamped from below
        [2.0, 15.0],     # up clamped at +10
        [2.0, -15.0],    # up clamped at -10
        [-30.0, -30.0],  # gate free, up clamped
        [9.5, -9.5],     # nothing clamped
    ], dtype=F64)
    w1 = torch.tensor([[1.0, 0.0]], dtype=F64)
    w3 = torch.tensor([[0.0, 1.0]], dtype=F64)
    h, hits = swiglu_hidden(gu, w1, w3, limit, F64)
    silu = lambda v: v / (1 + math.exp(-v))  # noqa: E731
    expect = [silu(10.0) * 3.0, silu(-15.0) * 3.0, silu(2.0) * 10.0, silu(2.0) * -10.0,
              silu(-30.0) * -10.0, silu(9.5) * -9.5]
    assert h.shape == (6, 1)
    for row, e in enumerate(expect):
        assert abs(h[row, 0].item() - e) <= 1e-12 * max(1.0, abs(e)), row
    # a lower gate clamp would give silu(-10)*3 = -1.4e-3, far from silu(-15)*3 = -4.6e-6
    assert abs(h[1, 0].item() - silu(-10.0) * 3.0) > 1e-3
    # clamp count: g > 10 in row 0; |u| > 10 in rows 2, 3, 4 (gates -15 / -30 are not hits)
    hits = torch.as_tensor(hits)
    if hits.dim():  # per-row counts
        assert hits.tolist() == [1, 0, 1, 1, 1, 0]
    assert int(hits.sum()) == 4
    # with a huge limit nothing is clamped
    h_free, hits_free = swiglu_hidden(gu, w1, w3, 1e9, F64)
    assert int(torch.as_tensor(hits_free).sum()) == 0
    assert abs(h_free[0, 0].item() - silu(15.0) * 3.0) <= 1e-12 * 45


# ============================================================================ 9. precision
def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(F64), b.to(F64)
    return float((a - b).norm() / b.norm())


def test_precision_modes_logits():
    cfg, params, seqs = tiny()
    ref = tiny_batch_run().points["logits"]
    f32 = run(cfg, params, seqs, "float32").points["logits"]
    bf16 = run(cfg, params, seqs, "bfloat16").points["logits"]
    assert f32.dtype == torch.float32 and ref.dtype == F64
    e32, e16 = _rel_l2(f32, ref), _rel_l2(bf16, ref)
    assert e32 < 1e-4, e32
    assert e16 < 0.1, e16
    assert e16 > 1e-9, e16  # bf16 really changes the arithmetic
    assert e32 > 0.0, e32


def test_precision_variants_are_policies():
    """Honest-noise variants are rounding policies the primitives read: the demo's placement by
    default, the transformers-style table with alt_placement, split-K on the Linears and the
    compressor (not on the demo's fp32 router / LM head GEMMs)."""
    from corruptcheck.reference.policy import Gemm, demo_policy, ported_policy
    from corruptcheck.reference.primitives import gemm, linear

    base = Precision.of("bfloat16")
    assert base.policy == demo_policy(torch.bfloat16, torch.float32)
    assert base.variant(alt_placement=True).policy == ported_policy(torch.bfloat16, torch.float32)
    k2 = base.variant(split_k=2).policy
    assert (k2.split_k, k2.compressor.split_k, k2.router.split_k, k2.head.split_k) == (2, 2, 1, 1)
    assert base == Precision.of("bf16") and base.variant(split_k=2) != base  # the policy is derived
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g, dtype=F64), torch.randn(7, 64, generator=g, dtype=F64)
    assert torch.equal(gemm(x.float(), w, Gemm(F64)), linear(x.float().double(), w))
    assert not torch.equal(linear(x, w, 3), linear(x, w)) and torch.allclose(linear(x, w, 3), linear(x, w))
