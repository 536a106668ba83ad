"""The reference against an independent implementation (transformers DeepseekV4ForCausalLM),
point by point (docs/v4-spec.md §12.7)."""
import pytest

from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.judge.differ import compare_points
from corruptcheck.points import capture_points

pytest.importorskip("transformers")

# transformers runs fp32 internally, so float32-level agreement is the honest bound
BOUND = 1e-5


def _assert_agrees(res, bound=BOUND):
    comp = res.report
    assert comp.verdict == "pass", [(p.name, p.reason) for p in comp.failed]
    assert not comp.missing, [p.name for p in comp.missing]
    floats = [p for p in comp.points if p.kind == "float" and p.verdict in ("pass", "not-exercised")]
    assert len(floats) >= 10
    worst = max(p.metrics["rel_l2"] for p in floats)
    assert worst <= bound
    for p in comp.points:
        if p.kind == "index" and p.verdict != "skipped":
            assert p.metrics["genuine"] == 0, p.name
    return worst


def test_tiny_float32_agrees_at_every_point(tiny, tiny_ref, tiny_hf32):
    from corruptcheck.judge.reference_data import reference_for

    points, cov = tiny_ref
    noise = reference_for(tiny).noise["float32"]
    comp = compare_points(capture_points(tiny.config), points, tiny_hf32, "float32", cov, noise)
    assert comp.verdict == "pass"
    compared = {p.name for p in comp.points if p.verdict in ("pass", "not-exercised")}
    # every canonical point of docs/design.md §4 that transformers exposes is compared
    for layer in range(tiny.config.num_layers):
        for sub in ("attn_hc.in", "attn_hc.collapsed", "attn_norm", "attn.out", "ffn_hc.in",
                    "ffn_hc.collapsed", "ffn_norm", "moe.experts", "moe.weights", "moe.out", "out"):
            assert f"layers.{layer}.{sub}" in compared
    assert {"embed", "head.collapsed", "head.norm", "logits", "layers.1.attn.indexer_topk",
            "layers.3.attn.indexer_topk"} <= compared
    worst = max(p.metrics["rel_l2"] for p in comp.points if p.kind == "float" and p.verdict == "pass")
    assert 1e-9 < worst <= BOUND  # real fp32 noise, and within the bound


def test_tiny_hf_float64_is_only_float32_exact(tiny):
    """transformers casts to fp32 inside mHC, norms and RoPE even in a float64 model."""
    res = compare(tiny, "hf", "float64")
    worst = _assert_agrees(res)
    assert worst > 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flash-slice", "pro-slice"])
def test_wide_slices_float32_agree(name):
    case = get_case(name)
    res = compare(case, "hf", "float32")
    _assert_agrees(res)
    if name == "pro-slice":
        assert case.config.hidden_size == 7168
        assert res.report.points[0].name == "embed"
    cov = res.report.coverage
    assert cov["indexer_pruning_fraction"] > 0 and cov["clamp_hits"] > 0 and cov["tokens_beyond_window"] > 0
