"""llama.cpp's own DeepSeek V4 (`--engine llamacpp`, docs/engines.md "llama.cpp").

Unit tests (name mapping, the GGUF writer's tensor mapping, the fault rewrites) run everywhere
the vendored `gguf` is installed; the engine tests need llama-cpp-python 0.3.36 (`make
install-llamacpp`, which `make test` runs) and skip with the reason elsewhere. They run on
`mini`, a small case inside llama.cpp's loader limits (compress ratios 0/4/128, hc 4): a
sliding layer, a CSA layer whose indexer prunes (75 entries, top-8) and an HCA layer with two
128-token blocks, 300 tokens: seconds per run, so faults and honest variants fit CI. 16
indexer heads: with 4, about 1 in 16 entries had every head's q.k < 0, an indexer score of
exactly 0, and 8 rows tied at the top-8 boundary; llama.cpp and the reference break such
exact ties differently, which changes those rows' attention completely (docs/engines.md).

The float32 verdict and its explanation (docs/engines.md, "llama.cpp", measured):
flash attention casts K/V to F16 (attn.core 2.4e-4; off: 1.2e-6, the engine's default), and
ggml forms RoPE angles by repeated fp32 products (RoPE dims 1.7e-6 against 1.6e-7 elsewhere),
which the `ggml-float32` profile models.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from corruptcheck.cases import Case, get_case
from corruptcheck.engines import llamacpp_capture as lc
from corruptcheck.engines.llamacpp_engine import LlamaCppEngine
from corruptcheck.engines.llamacpp_gguf import check_config, gguf_module, gguf_name, tensor_type
from corruptcheck.faults import get_fault
from corruptcheck.faults.llamacpp import LLAMACPP_FAULTS, make_fault
from corruptcheck.reference import ModelConfig, Precision
from corruptcheck.reference.attention import window_mask
from corruptcheck.reference.model import rope_tables
from corruptcheck.reference.primitives import apply_rope, rope_angles
from corruptcheck.schedule import Schedule

ENGINE_OK, WHY = LlamaCppEngine().available()
needs_llamacpp = pytest.mark.skipif(not ENGINE_OK, reason=WHY or "llama.cpp available")
needs_gguf = pytest.mark.skipif(gguf_module() is None, reason="the vendored gguf (make install-llamacpp) is missing")

MINI = Case(
    name="llamacpp-mini",
    description="llama.cpp-loadable mini model: sliding + CSA (top-8 of 75) + HCA (2 blocks), 300 tokens",
    config=ModelConfig(name="llamacpp-mini", vocab_size=256, hidden_size=256, num_layers=3, num_heads=4,
                       q_lora_rank=64, o_groups=2, o_lora_rank=64, compress_ratios=(0, 4, 128, 0),
                       n_routed_experts=8, moe_inter_dim=64, route_scale=1.5, index_n_heads=16,
                       index_topk=8, head_dim=128, index_head_dim=128, rope_dim=64, num_hash_layers=1,
                       num_mtp_layers=0),
    seed=20261207,
    seq_lens=(300,),
)
MINI_SCHEDULE = Schedule(prompt_lens=(200, 150, 150), decode_steps=6, chunk=100, arrivals=(0, 0, 2))
F32 = {"weights": "f32", "kv_type": "f32"}  # flash attention: the engine's default, off


# --- unit: names, writer mapping, fault rewrites ------------------------------------------

def test_node_names_map_to_canonical_points():
    assert lc.parse_name("attn_out-2") == ("attn_out", 2)
    assert lc.parse_name("hc_init") == ("hc_init", None)
    assert lc.parse_name("result_norm") == ("result_norm", None)
    assert lc.canonical_of("l_last", 0, 0) == ["layers.0.out", "layers.1.attn_hc.in"]
    assert lc.canonical_of("hc_post", 1, 0) == ["layers.1.attn_hc.post"]
    assert lc.canonical_of("hc_post", 1, 1) == ["layers.1.ffn_hc.post"]
    assert lc.canonical_of("hc_init", None, 0) == ["embed", "layers.0.attn_hc.in"]
    assert lc.canonical_of("ffn_shexp", 0, 0) == []  # finer node, recorded but not compared
    assert lc.wanted("lid_top_k-1") and lc.wanted("result_output") and not lc.wanted("kq_mask-0")
    # a ubatch of 2 sequences x 3 tokens: lid_top_k is [k, 3, 1, 2] (one stream per sequence)
    picks = np.arange(2 * 3 * 4).reshape(2, 1, 3, 4)
    assert lc.per_token("lid_top_k-1", picks, 6).tolist() == picks.reshape(6, 4).tolist()
    with pytest.raises(ValueError):
        lc.per_token("lid_top_k-1", picks, 5)


def test_indexer_picks_of_a_ubatch_with_fewer_entries_than_top_k_are_padded():
    """llama.cpp's top-k is min(cache entries, index_topk) wide: a ubatch whose cache holds
    fewer entries (every ubatch before the 2048th token of an engine case) is padded with -1 to
    the reference's width, and picks beyond the query's causal limit become -1. (Without the
    padding the passes' widths differed and flash-engine's indexer_topk was `missing`.)"""
    from corruptcheck.engines.llamacpp_engine import _discrete

    pos = [3, 4, 9, 12]  # causal limits (pos + 1) // 4: 1, 1, 2, 3 entries
    picks = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [2, 1, 0]], dtype=torch.int32)
    out = _discrete(MINI, {"layers.1.attn.indexer_topk": picks}, {"pos": pos})["layers.1.attn.indexer_topk"]
    assert out.shape == (4, MINI.config.index_topk) and out.dtype == torch.long
    assert out[:, :3].tolist() == [[0, -1, -1], [0, -1, -1], [1, 0, -1], [2, 1, 0]]
    assert bool((out[:, 3:] == -1).all())


def test_cases_llama_cpp_cannot_load_are_refused_with_the_reason():
    problems = check_config(get_case("tiny").config)
    assert any("compress ratios [16]" in p for p in problems)
    assert check_config(get_case("flash-engine").config) == []
    assert check_config(get_case("pro-engine").config) == []
    assert check_config(MINI.config) == []


@needs_gguf
def test_every_case_tensor_has_a_gguf_tensor():
    g = gguf_module()
    from corruptcheck.weights import param_shapes

    for case in ("flash-engine", "pro-engine"):
        for name in param_shapes(get_case(case).config):
            if name.startswith("mtp.") or ".experts." in name:
                continue
            assert gguf_name(g, name), name
    assert gguf_name(g, "layers.1.attn.compressor.ape") == "blk.1.attn_compressor_ape.weight"
    assert gguf_name(g, "layers.0.ffn.gate.tid2eid") == "blk.0.ffn_gate_tid2eid.weight"
    assert tensor_type("layers.0.attn.wq_a.weight", "q8_0") == "Q8_0"
    assert tensor_type("layers.0.attn.compressor.wkv.weight", "q8_0") == "BF16"
    assert tensor_type("layers.0.hc_attn_fn", "bf16") == "F32"


def test_fault_rewrites_change_what_they_claim():
    x = np.ones((1, 5, 4), dtype=np.float32)
    f = make_fault({"name": "s", "node": "hc_post-0", "kind": "scale", "m": 1.0, "params": {"factor": 0.5}})
    assert f.targets("hc_post-0") and not f.targets("hc_post-1")
    assert f.apply(x, {"raw": {}}, 0) and np.all(x == 0.5)
    c = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    want = np.swapaxes(c, -1, -2).copy()
    make_fault({"name": "t", "node": "hc_comb-0", "kind": "transpose_last2"}).apply(c, {"raw": {}}, 0)
    assert np.array_equal(c, want)
    idx = np.array([[[3, 1, 0]]], dtype=np.int32)
    make_fault({"name": "i", "node": "lid_top_k-1", "kind": "index_shift"}).apply(idx, {"raw": {}}, 1)
    assert idx.tolist() == [[[4, 2, 1]]]
    # magnitude 0: the patch runs but changes nothing
    y = np.ones((3, 4), dtype=np.float32)
    make_fault({"name": "s", "node": "x", "kind": "scale", "m": 0.0, "params": {"factor": 0.5}}).apply(y, {"raw": {}}, 0)
    assert np.all(y == 1)


def test_fault_registry_names_strike_points_and_triggers():
    assert len(LLAMACPP_FAULTS) >= 5
    flash, pro = get_case("flash-engine").config, get_case("pro-engine").config
    guard = get_fault("llamacpp-hc-pre-width-guard")
    assert guard.triggered(flash, (2112,), "llamacpp") is False  # hidden 4096: the kernel's own width
    assert guard.triggered(pro, (2112,), "llamacpp") is True
    kv = get_fault("llamacpp-kv-slot-shift")
    assert kv.spec(flash)["node"] == "kv-1"  # flash-engine's CSA layer


def test_unknown_option_is_bad_input():
    from corruptcheck.errors import BadInput

    with pytest.raises(BadInput):
        LlamaCppEngine.parse_options({"weights": "q4_k"})
    with pytest.raises(BadInput):
        LlamaCppEngine.parse_options({"no_such": 1})



def test_declared_profile_follows_what_the_graph_ran():
    from corruptcheck.engines.llamacpp_precision import profile_name

    assert profile_name("f32", "f32", "off") == "ggml-float32"
    assert profile_name("f32", "f32", "on") == "llamacpp-f32-kvf32-fa16"  # K/V cast to F16
    assert profile_name("f32", "f16", "off") == "llamacpp-f32-kvf16"
    with pytest.raises(ValueError):  # not modelled: a compare stops (exit 2), never judges it as float32
        Precision.of("llamacpp-f32-kvf32-fa16")


def test_iterated_rope_angles_are_another_fp32_placement():
    """The float32 variant forms pair k's angle by k fp32 products of one ratio (ggml): the
    angles differ from the demo's p * omega by fp32 roundings only (< 2e-5 rad at p < 300),
    are not the same angles, and the YaRN table's interpolated pairs are the iterated
    unscaled angle / factor exactly."""
    cfg = MINI.config
    tables = rope_tables(cfg)
    pos = torch.arange(300)
    for kind in ("main", "compress"):
        outer, it = rope_angles(pos, tables[kind]).double(), rope_angles(pos, tables[kind], True).double()
        d = (outer - it).abs()
        assert 0 < d.max() < 2e-5, (kind, float(d.max()))
        assert float(d.pow(2).mean().sqrt()) > 5e-7  # not a no-op
    for kind in ("main", "compress"):
        w = tables[kind].float()
        ratio, theta = w[1] / w[0], pos.float() * w[0]
        it = rope_angles(pos, tables[kind], True)
        for k in range(w.shape[0]):
            if kind == "main" or k == w.shape[0] - 1:  # the last compress pair: past the YaRN ramp
                scale = 1.0 if kind == "main" else 1.0 / cfg.yarn_factor
                assert torch.equal(it[:, k], theta * scale), (kind, k)
            theta = theta * ratio
    ggml = Precision.of("ggml-float32")
    assert ggml.policy.rope_iterated and not Precision.of("float32").policy.rope_iterated


def test_hc_mix_lanes_is_the_same_mix_summed_in_another_order():
    """The float32 variant's mHC mix (normalize first, 8 sequential F32 lanes, as ggml's F32
    mul_mat): the same numbers in float64 (1e-15), another float32 rounding (a long reduction:
    not the blocked sgemm's result, within 1e-5)."""
    from corruptcheck.reference.mhc import _mix_logits

    g = torch.Generator().manual_seed(0)
    x, fn = torch.randn(5, 4, 512, generator=g, dtype=torch.float64), torch.randn(24, 2048, generator=g, dtype=torch.float64)
    exact = _mix_logits(x, fn, 1e-6, torch.float64)
    assert _rel(_mix_logits(x, fn, 1e-6, torch.float64, 8), exact) < 1e-14
    plain, lanes = _mix_logits(x, fn, 1e-6, torch.float32), _mix_logits(x, fn, 1e-6, torch.float32, 8)
    assert not torch.equal(plain, lanes)
    assert _rel(lanes, exact) < 1e-5 and _rel(plain, exact) < 1e-5
    assert Precision.of("ggml-float32").policy.hc_mix_lanes == 8 and Precision.of("float32").policy.hc_mix_lanes == 0


def test_ggml_float32_is_an_engine_matched_profile_beside_an_unchanged_float32():
    """ggml-float32 keeps its own RoPE and mHC placement in every honest variant; the generic
    float32 variants (every other engine's tolerance) are the blocked-GEMM ones, unchanged."""
    from corruptcheck.judge.noise import variants

    assert [v.label for v in variants("float32")] == ["float32", "float32 (split-k2)", "float32 (split-k3)"]
    ggml = variants("ggml-float32")
    assert [v.label for v in ggml] == ["ggml-float32", "ggml-float32 (split-k2)", "ggml-float32 (split-k3)"]
    assert all(v.policy.rope_iterated and v.policy.hc_mix_lanes == 8 for v in ggml)
    assert all(not v.policy.rope_iterated and v.policy.hc_mix_lanes == 0 for v in variants("float32"))

@needs_gguf
def test_q8_0_weights_are_what_the_gguf_holds():
    """The Q8_0 case variant's weights are bit-equal to gguf-py's Q8_0 round trip (what the
    engine loads), Q8_0 of them gives them back (the GGUF of the variant holds the very numbers),
    and only the FP8-class linears are rounded (the BF16 ones a Q8_0 GGUF keeps BF16)."""
    import dataclasses

    import numpy as np

    from corruptcheck.engines.llamacpp_gguf import tensor_type
    from corruptcheck.weights import is_routed_expert

    gguf = gguf_module()
    q8 = gguf.GGMLQuantizationType.Q8_0
    case = LlamaCppEngine().weights_case(MINI, weights="q8_0")
    assert case.name == "llamacpp-mini+q8_0" and case.weight_format == "bf16+q8_0" and not case.golden
    assert LlamaCppEngine().weights_case(MINI, weights="f32") is MINI
    base, held = MINI.params(), case.params()
    rounded = 0
    for name, w in base.items():
        if not w.is_floating_point() or w.dim() != 2:
            continue
        kind = tensor_type(name, "q8_0", routed=is_routed_expert(name))
        if kind != "Q8_0":
            assert torch.equal(held[name], w), name  # BF16 / F32 in the GGUF: exact
            continue
        rounded += 1
        trip = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8)
        assert np.array_equal(held[name].numpy(), trip), name
        again = gguf.quants.dequantize(gguf.quants.quantize(held[name].numpy(), q8), q8)
        assert np.array_equal(again, held[name].numpy()), name
        assert 0 < float((held[name] - w).abs().max()) < 0.01 * float(w.abs().max()) + 1e-6, name
    assert rounded >= 20  # attention projections, experts, shared experts of 3 layers
    assert dataclasses.replace(MINI, weight_format="bf16+q8_0").params().keys() == base.keys()


@needs_gguf
def test_mxfp4_experts_are_what_the_gguf_holds():
    """MXFP4 GGUF (llama.cpp's MOSTLY_MXFP4_MOE): the routed experts are the release's MXFP4
    values, repacked bit for bit into `block_mxfp4` (gguf-py's own dequantizer reads back the
    case variant's numbers exactly; ggml's quantizer, whose scale comes from floor(log2 amax),
    gives the same blocks for values already on the grid), the other FP8-class linears Q8_0, the rest untouched; the run declares ggml-q8_0 (MXFP4's
    vec_dot_type is Q8_0)."""
    import numpy as np

    from corruptcheck.engines.llamacpp_gguf import mxfp4_blocks
    from corruptcheck.engines.llamacpp_precision import profile_name
    from corruptcheck.weights import is_fp8_linear, is_routed_expert

    gguf = gguf_module()
    mx, q8 = gguf.GGMLQuantizationType.MXFP4, gguf.GGMLQuantizationType.Q8_0
    case = LlamaCppEngine().weights_case(MINI, weights="mxfp4")
    assert case.name == "llamacpp-mini+mxfp4" and case.weight_format == "bf16+mxfp4" and not case.golden
    base, held = MINI.params(), case.params()
    experts = requantized = 0
    for name, w in base.items():
        if not w.is_floating_point() or w.dim() != 2:
            continue
        if is_routed_expert(name):
            experts += 1
            assert tensor_type(name, "mxfp4", routed=True) == "MXFP4"
            back = gguf.quants.dequantize(mxfp4_blocks(held[name]), mx)
            assert np.array_equal(back, held[name].float().numpy()), name
            assert 0 < float((held[name] - w).abs().max()) < 0.2 * float(w.abs().max()), name
            requantized += np.array_equal(gguf.quants.quantize(held[name].float().numpy(), mx),
                                          mxfp4_blocks(held[name]))
        elif is_fp8_linear(name, w):
            trip = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), q8), q8)
            assert np.array_equal(held[name].numpy(), trip), name
        else:
            assert torch.equal(held[name], w), name
    assert experts == requantized == 3 * 8 * 3
    assert profile_name("mxfp4", "f32", "off") == "ggml-q8_0"


def test_q8_0_activations_round_as_ggml_x86():
    """Activations: ggml-cpu's x86 quantize_row_q8_0 multiplies by 127 / amax and rounds half to
    even; the weights' reference quantizer rounds half away from zero. Blocks of 32, fp16 scale."""
    from corruptcheck.reference.quant import q8_0_sim, round_input

    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5] + [0.0] * 26])
    assert q8_0_sim(x)[0, :6].tolist() == [127.0, 0.0, 2.0, 2.0, 0.0, -2.0]
    assert q8_0_sim(x, ties_away=True)[0, :6].tolist() == [127.0, 1.0, 2.0, 3.0, -1.0, -3.0]
    g = torch.Generator().manual_seed(1)
    y = torch.randn(4, 256, generator=g)
    r = round_input(y, "q8_0")
    blocks = (r - y).reshape(4, 8, 32).abs().amax(-1)
    scale = y.reshape(4, 8, 32).abs().amax(-1) / 127
    # half a step, plus the fp16 scale's own rounding (2^-11 relative) times |q| <= 127
    assert bool((blocks <= scale * (0.5 + 127 * 2.0 ** -11)).all())
    assert bool((blocks > scale * 0.3).all())  # and it does round
    assert torch.equal(round_input(y, "bf16"), y.to(torch.bfloat16).float())
    for name, fp8_in in (("ggml-bf16", "bf16"), ("ggml-q8_0", "q8_0")):
        pol = Precision.of(name).policy
        assert pol.fp8_linear_in == fp8_in and pol.bf16_linear_in == "bf16"
        assert pol.router.round_in == pol.head.round_in == pol.compressor.round_in == "bf16"
    assert Precision.of("ggml-float32").policy.fp8_linear_in is None


# --- engine: llama.cpp itself ------------------------------------------------------------



@pytest.fixture(scope="module")
def mini_f32():
    from corruptcheck.compare import compare

    return compare(MINI, "llamacpp", None, teacher_forcing="always", **F32).report


def _points(rep):
    return {p.name: p for p in rep.points}


@pytest.mark.engine
@needs_llamacpp
def test_f32_llama_cpp_passes_inside_float32(mini_f32):
    """F32 weights, F32 cache, flash attention off (the default): float32, and every point
    inside the float32 tolerance (measured worst err/tol 0.53 free, 0.66 teacher-forced)."""
    rep = mini_f32
    pts = _points(rep)
    assert rep.precision == "ggml-float32"
    assert rep.engine_info["settings"]["flash_attn_resolved"] == "off"
    assert rep.verdict == "pass", rep.first_divergence
    assert rep.summary.compared >= 60  # every required point and the finer ones llama.cpp names
    assert rep.missing == []
    worst = max(p.ratio for p in rep.points if p.ratio is not None)
    worst_local = max(p.local["ratio"] for p in rep.points if p.local and p.local.get("ratio") is not None)
    assert worst < 0.8 and worst_local < 0.9, (worst, worst_local)
    for name in ("layers.1.attn.indexer_topk", "layers.1.attn.q", "layers.1.attn.kv", "layers.2.attn.core",
                 "layers.1.moe.router_logits", "layers.0.attn_hc.comb", "logits"):
        assert pts[name].verdict in ("pass", "not-exercised"), (name, pts[name].verdict)
    assert pts["layers.1.attn.indexer_topk"].verdict == "pass"  # 75 entries, top-8: it prunes
    assert pts["layers.1.attn.indexer_topk"].metrics["tie_explained"] == 0  # no exact ties left
    # the attention errors are float32-sized (measured 1.24e-6, 1.40e-6, 1.23e-6)
    for name in ("layers.0.attn.q", "layers.0.attn.kv", "layers.0.attn.core", "layers.1.attn.core"):
        assert pts[name].metrics["rel_l2"] < 3e-6, (name, pts[name].metrics["rel_l2"])
    assert rep.engine_info["version"].startswith("llama-cpp-python 0.3.36")
    assert rep.engine_info["loaded"]["n_layer"] == 3


def _quantized_run_passes(weights: str):
    """The quantized GGUF of `mini` judged as ggml-q8_0 against `mini+<weights>`: every point
    compared, none missing, every one inside (worst err/tol < 0.8). Returns the report."""
    from corruptcheck.compare import compare

    res = compare(MINI, "llamacpp", None, teacher_forcing="never", weights=weights, kv_type="f32")
    rep = res.report
    assert rep.precision == "ggml-q8_0" and res.case.name == f"llamacpp-mini+{weights}"
    assert rep.verdict == "pass", rep.first_divergence
    assert rep.summary.compared >= 60 and rep.missing == []
    worst = max(p.ratio for p in rep.points if p.ratio is not None)
    assert worst < 0.8, worst
    return rep


@pytest.mark.engine
@needs_llamacpp
def test_q8_0_llama_cpp_passes_inside_ggml_q8_0(mini_f32):
    """Q8_0 weights (FP8-class linears and experts), BF16 router / compressor / head, F32 cache:
    judged as ggml-q8_0 against the float64 reference of the weights the GGUF holds. Every point
    inside (flash-slice measured: worst err/tol 0.344), and the activations' Q8_0 rounding is
    real: attn.q is three orders of magnitude further from float64 than the F32 run's."""
    rep = _quantized_run_passes("q8_0")
    q8 = _points(rep)["layers.0.attn.q"].metrics["rel_l2"]
    f32 = _points(mini_f32)["layers.0.attn.q"].metrics["rel_l2"]
    assert q8 > 300 * f32, (q8, f32)


@pytest.mark.engine
@needs_llamacpp
def test_mxfp4_llama_cpp_passes_inside_ggml_q8_0(mini_f32):
    """MXFP4 experts (the release's values, repacked), Q8_0 for the other FP8-class linears:
    judged as ggml-q8_0 (MXFP4's vec_dot_type is Q8_0) against the float64 reference of the
    GGUF's weights. Every point inside, and the MoE output carries the Q8_0 input rounding."""
    rep = _quantized_run_passes("mxfp4")
    assert rep.engine_info["gguf"]["types"].get("MXFP4") == 3 * 3  # gate / up / down of 3 layers
    mx = _points(rep)["layers.1.moe.out"].metrics["rel_l2"]
    f32 = _points(mini_f32)["layers.1.moe.out"].metrics["rel_l2"]
    assert mx > 100 * f32, (mx, f32)


@pytest.mark.engine
@needs_llamacpp
@pytest.mark.parametrize("limits,kind", [({"engine_timeout": 0.3}, "timeout"), ({"engine_memory": 0.05}, "oom")])
def test_worker_watched_by_the_supervisor(limits, kind):
    """The llama.cpp worker is the engine's child process: the supervisor's limits end it, and
    the run is the verdict `crash` (kind, phase, the worker gone), never a lost run."""
    import os

    from corruptcheck.compare import compare

    rep = compare(MINI, "llamacpp", None, schedule="prefill-only", **F32, **limits).report
    assert rep.crash is not None and rep.crash["kind"] == kind, rep.crash
    assert rep.crash["phase"] in ("start", "load", "prefill"), rep.crash
    assert rep.summary.compared == 0 and len(rep.missing) > 0
    with pytest.raises(ProcessLookupError):
        os.kill(rep.crash["pid"], 0)


@pytest.fixture(scope="module")
def mini_runs():
    """The float64 reference and llama.cpp's points with flash attention off / on (F32 cache)."""
    from corruptcheck.judge.reference_data import reference_run

    ref = reference_run(MINI)[0]
    caps = {fa: LlamaCppEngine().run(MINI, "float32", flash_attn=fa, **F32) for fa in ("off", "on")}
    return ref, caps


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def _sliding_attention(cfg, q, k, sink) -> torch.Tensor:
    """float64 sink attention of layer 0 (sliding) on given q [T, H, hd] and K = V [T, hd]."""
    t = q.shape[0]
    z = torch.einsum("shd,jd->hsj", q, k) * cfg.head_dim ** -0.5
    z = z.masked_fill(~window_mask(t, cfg.window)[None], float("-inf"))
    p = torch.softmax(torch.cat([z, sink.double()[:, None, None].expand(-1, t, 1)], -1), -1)[..., :-1]
    return torch.einsum("hsj,jd->shd", p, k)


@pytest.mark.engine
@needs_llamacpp
def test_flash_attention_rounds_k_and_v_to_f16(mini_runs):
    """Why flash attention is off: llama.cpp casts F32 K/V to F16 before ggml_flash_attn_ext,
    in the Hadamard basis deepseek4 rotates its raw-cache keys into. On the engine's own q and
    kv of layer 0, float64 attention reproduces its attn.core to 1.9e-7 with flash attention off;
    with it on the engine is 2.4e-4 away, and rounding K = V to F16 in the 128-dim Hadamard basis
    brings that to 9.7e-6 (what is left: values that float32's own error moves across an F16
    rounding boundary)."""
    ref, caps = mini_runs
    cfg = MINI.config
    sink = MINI.params()["layers.0.attn.attn_sink"]
    angles = rope_angles(torch.arange(300), rope_tables(cfg)["main"], True)  # ggml's, as the engine rotated
    h = _hadamard(cfg.head_dim)
    f16 = lambda x: x.float().half().double()  # noqa: E731
    off, on = caps["off"], caps["on"]
    assert off.precision == "ggml-float32" and off.meta["settings"]["flash_attn_resolved"] == "off"
    assert on.precision == "llamacpp-f32-kvf32-fa16" and on.meta["settings"]["flash_attn_resolved"] == "on"
    derope = lambda o: apply_rope(o, angles, cfg.rope_dim, inverse=True, acc=torch.float64)  # noqa: E731
    q, kv = off.points["layers.0.attn.q"].double(), off.points["layers.0.attn.kv"].double()
    assert _rel(off.points["layers.0.attn.core"], derope(_sliding_attention(cfg, q, kv, sink))) < 1e-6
    q, kv = on.points["layers.0.attn.q"].double(), on.points["layers.0.attn.kv"].double()
    core = on.points["layers.0.attn.core"]
    exact = _rel(core, derope(_sliding_attention(cfg, q, kv, sink)))
    rounded = _rel(core, derope(_sliding_attention(cfg, q @ h, f16(kv @ h), sink) @ h))
    assert exact > 1e-4, exact
    assert rounded < 3e-5 and rounded < exact / 10, (rounded, exact)
    assert _rel(core, ref["layers.0.attn.core"]) > 1e-4  # what a flash-attention run shows: not float32


@pytest.mark.engine
@needs_llamacpp
def test_rope_excess_is_ggml_angle_formation(mini_runs):
    """q and kv's RoPE dims carry ~10x the error of their other dims (1.7e-6 vs 1.6e-7 at layer
    0): turning the engine's rows from ggml's iterated angles to the demo's brings
    the RoPE dims to the other dims' level at every layer, sliding (main table) and CSA / HCA
    (YaRN table)."""
    ref, caps = mini_runs
    cfg = MINI.config
    tables = rope_tables(cfg)
    rd, pos = cfg.rope_dim, torch.arange(300)
    for layer in range(cfg.num_layers):
        w = tables["main" if cfg.compress_ratios[layer] == 0 else "compress"]
        shift = rope_angles(pos, w).double() - rope_angles(pos, w, True).double()
        for point in ("attn.q", "attn.kv"):
            e, r = caps["off"].points[f"layers.{layer}.{point}"].double(), ref[f"layers.{layer}.{point}"]
            nope, rope = _rel(e[..., :-rd], r[..., :-rd]), _rel(e[..., -rd:], r[..., -rd:])
            turned = _rel(apply_rope(e, shift, rd, acc=torch.float64)[..., -rd:], r[..., -rd:])
            assert rope > 3 * nope, (layer, point, rope, nope)
            assert turned < 1.3 * nope, (layer, point, turned, nope)


@pytest.mark.engine
@needs_llamacpp
def test_served_schedule_is_judged_per_phase():
    from corruptcheck.compare import compare

    rep = compare(MINI, "llamacpp", None, schedule=MINI_SCHEDULE, **F32).report
    assert rep.verdict == "pass", rep.first_divergence
    phases = rep.phases
    kinds = {p.phase for p in phases}
    assert {"prefill", "decode"} <= kinds
    assert all(p.verdict in ("pass", "not-exercised") for p in phases)
    assert "several sequences" in rep.batching
    assert not rep.batching.endswith(" 0 calls with several sequences in one ubatch")


@pytest.mark.engine
@needs_llamacpp
@pytest.mark.parametrize("fault,culprit", [
    ("llamacpp-shared-expert-twice", "moe.out"),
    ("llamacpp-kv-slot-shift", "attn.kv"),
    ("llamacpp-hc-comb-transposed", "ffn_hc.comb"),
])
def test_faults_are_caught_and_localized(fault, culprit):
    from corruptcheck.selftest.runner import run_fault

    row = run_fault(MINI, "llamacpp", get_fault(fault), "ggml-float32")
    assert row.status == "detected", (row.status, row.note)
    assert row.culprit and row.culprit.endswith(culprit), row.culprit
    assert row.localized


@pytest.mark.engine
@needs_llamacpp
@pytest.mark.parametrize("variant", ["ubatch-200", "threads-1", "batch2"])
def test_honest_variants_are_not_flagged(variant):
    from corruptcheck.selftest.benign import LLAMACPP_BENIGN
    from corruptcheck.selftest.runner import run_benign

    row = run_benign(MINI, "llamacpp", LLAMACPP_BENIGN[variant])
    assert row.verdict == "pass", row
