"""docs/v4-spec.md §12 self-checks of the DeepSeek V4 reference (`corruptcheck.reference`): causality under perturbation (docs/v4-spec.md §12.4)
and compressed-space visibility (docs/v4-spec.md §5.5).

Every test asserts numbers against stated bounds, and every test can fail: where an invariant
could hold vacuously (nothing changed, nothing pruned, nothing clamped) the test also asserts
that the thing it guards was really exercised."""
from __future__ import annotations



import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from corruptcheck.reference import ENTRY_POINTS, run
from corruptcheck.reference.attention import available, sub, window_mask
from invariants_common import F64, HYP, PREC64, tiny, tiny_seq0_run


# ============================================================================ 3. causality
CAUSAL_TS = [3, 4, 7, 15, 16, 31, 32, 47, 62]


def _entry_ratio(cfg, name: str) -> int:
    if name.endswith("indexer_keys"):
        return cfg.csa_ratio
    layer = int(name.split(".")[1])
    return cfg.compress_ratio(layer)


def _perturbed_run(t: int):
    cfg, params, _ = tiny()
    ids, base = tiny_seq0_run()
    ids2 = ids.clone()
    ids2[t + 1] = (ids[t + 1] + 1) % cfg.vocab_size
    return base, run(cfg, params, [ids2], "float64")


def _prefix_views(cfg, name, a, b, t, s):
    """(rows of a, rows of b) that must not depend on token t+1."""
    if name.endswith(ENTRY_POINTS):  # entries whose block closes at or before t
        m = _entry_ratio(cfg, name)
        assert a.shape[0] == s // m, name
        return a[: (t + 1) // m], b[: (t + 1) // m]
    if name.startswith("mtp.0."):  # row i = main position i + token i+1
        assert a.shape[0] == s - 1, name
        return a[:t], b[:t]
    assert a.shape[0] == s, name
    return a[: t + 1], b[: t + 1]


@pytest.mark.parametrize("t", CAUSAL_TS)
def test_causality_under_perturbation(t):
    """Changing token t+1 leaves every captured point bit-identical at positions <= t.

    Entry-shaped points (compressed_kv, indexer_keys) are checked on the entries whose block
    closes at or before t (i < (t+1)//m). `mtp.0.*` row i combines main position i with token
    i+1, so it may change from row t on: rows <= t-1 are checked.
    """
    cfg, _, _ = tiny()
    ids, _ = tiny_seq0_run()
    s = ids.shape[0]
    assert s == 64 and t + 1 < s
    base, pert = _perturbed_run(t)
    assert pert.points.keys() == base.points.keys()

    checked = {"token": 0, "entry": 0, "mtp": 0}
    for name, a in base.points.items():
        b = pert.points[name]
        assert a.shape == b.shape, name
        pa, pb = _prefix_views(cfg, name, a, b, t, s)
        if not torch.equal(pa, pb):
            d = (pa.double() - pb.double()).abs().nan_to_num(0.0).max().item()
            raise AssertionError(f"{name}: not bit-identical at positions <= {t} after changing "
                                 f"token {t + 1} (max |diff| {d:.3g})")
        kind = "entry" if name.endswith(ENTRY_POINTS) else "mtp" if name.startswith("mtp.0.") else "token"
        checked[kind] += 1
        if name.endswith(ENTRY_POINTS):
            closed = (t + 1) // _entry_ratio(cfg, name)
            if closed < a.shape[0]:  # the entry holding token t+1 does change
                assert not torch.equal(a[closed], b[closed]), name
    assert checked["token"] >= 80 and checked["entry"] == 5 and checked["mtp"] >= 20

    # the perturbation really propagates: position t+1 changes in every layer
    assert not torch.equal(base.points["embed"][t + 1], pert.points["embed"][t + 1])
    for layer in range(cfg.num_layers):
        for pt in ("attn.kv", "moe.out", "out"):
            name = f"layers.{layer}.{pt}"
            assert not torch.equal(base.points[name][t + 1], pert.points[name][t + 1]), name
    for name, row in (("logits", t + 1), ("mtp.0.in", t), ("mtp.0.logits", t)):
        assert (base.points[name][row] - pert.points[name][row]).abs().max().item() > 1e-6, name


def test_moe_row_independent_of_other_tokens_routing():
    """In a hash layer, changing token j's id changes only token j's experts, so every other
    row of moe() must stay bit-identical (no dependence on which tokens share an expert: a
    per-expert GEMM over the gathered token subset breaks this by 1-2 ulp, MKL tiles M by 4)."""
    from corruptcheck.reference.model import cast_params
    from corruptcheck.reference.moe import moe

    cfg, params, seqs = tiny()
    p = sub(cast_params(params, PREC64), "layers.0.ffn")
    assert cfg.is_hash_layer(0)
    ids = seqs[0].clone()
    g = torch.Generator().manual_seed(3)
    y = torch.randn(ids.shape[0], cfg.hidden_size, generator=g, dtype=F64)
    nop = lambda *a: None  # noqa: E731
    with torch.no_grad():
        base = moe(y, ids, p, 0, cfg, PREC64, nop)
        for j in range(0, ids.shape[0], 3):
            ids2 = ids.clone()
            ids2[j] = (ids[j] + 1) % cfg.vocab_size
            out = moe(y, ids2, p, 0, cfg, PREC64, nop)
            keep = torch.arange(ids.shape[0]) != j
            assert (out[j] - base[j]).abs().max().item() > 1e-6, j  # token j itself did change
            assert torch.equal(out[keep], base[keep]), f"token {j}'s routing moved other rows"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_gemm_rows_do_not_depend_on_a_multiple_of_row_tile(dtype):
    """The premise of reference/moe.py `_per_tile`: on the expert shapes of every case (hidden x
    moe_inter_dim both ways), a GEMM over any multiple of ROW_TILE rows computes each row
    bit-identically to ROW_TILE-row tiles, with one thread or two, at any row offset. (Odd row
    counts and fewer than ROW_TILE rows do not: the padding exists for them.)"""
    from corruptcheck.cases import CASES
    from corruptcheck.reference.moe import ROW_TILE

    shapes = sorted({(c.config.hidden_size, c.config.moe_inter_dim) for c in CASES.values()})
    g = torch.Generator().manual_seed(5)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for d, i in shapes:
                for k, n in ((d, i), (i, d)):
                    w = torch.randn(n, k, generator=g, dtype=dtype)
                    x = torch.randn(1125, k, generator=g, dtype=dtype)
                    for m in (3 * ROW_TILE, 70 * ROW_TILE):  # a decode step's few rows, a prefill's many
                        for off in (0, 5):
                            one = torch.nn.functional.linear(x[off:off + m], w)
                            shifted = torch.cat([torch.nn.functional.linear(t, w) for t in x[off:off + m].split(ROW_TILE)])
                            assert torch.equal(one, shifted), (n_threads, k, n, m, off)
    finally:
        torch.set_num_threads(threads)


# ============================================================================ 4. visibility
@HYP
@given(st.integers(1, 80), st.sampled_from([1, 2, 3, 4, 5, 8, 16, 128]), st.integers(1, 40))
def test_available_and_window_mask_bruteforce(s, m, w):
    n = s // m
    got = available(s, n, m)
    assert got.shape == (s, n) and got.dtype == torch.bool
    for t in range(s):
        for i in range(n):
            # entry i covers tokens i*m .. i*m+m-1: visible iff its block has closed by t
            assert bool(got[t, i]) == (i * m + m - 1 <= t) == (i < (t + 1) // m), (t, i)
    wm = window_mask(s, w)
    assert wm.shape == (s, s)
    for t in range(s):
        assert set(torch.nonzero(wm[t]).flatten().tolist()) == set(range(max(0, t - w + 1), t + 1)), t
