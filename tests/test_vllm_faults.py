"""The vLLM faults (corruptcheck.faults.vllm): each one patches vLLM's own CPU DeepSeek V4 code
for one engine run and puts everything back, also when the run fails. Fast: no engine is
launched here (tests/test_vllm_engine.py owns the end-to-end runs); the kernels the faults wrap
are called directly where that is cheap."""
import re

import pytest
import torch

from corruptcheck.engines import vllm_cpu
from corruptcheck.cases import get_case
from corruptcheck.errors import BadInput
from corruptcheck.faults import FAULTS, MODEL_FAULTS, FaultState, faults_for, get_fault
from corruptcheck.faults.vllm import (
    CPU_COMPRESSOR,
    CPU_MODEL,
    CPU_ROUTER,
    CPU_SPARSE,
    CUSTOM_OPS,
    IndexerKeyScaleMisread,
    LAYERNORM,
    layer_index,
    ue8m0_bytes_as_values,
    vllm_importable,
    vllm_module,
)

VLLM_FAULTS = faults_for("vllm")

pytestmark = pytest.mark.skipif(not vllm_importable(), reason="vLLM's CPU DeepSeek V4 tree is not importable")

FLASH = get_case("flash-engine")
PRO = get_case("pro-engine")
MODULES = (CPU_MODEL, CPU_SPARSE, CPU_COMPRESSOR, CPU_ROUTER, CUSTOM_OPS, LAYERNORM)


def _snapshot():
    mods = [vllm_module(m) for m in MODULES]
    classes = [v for m in mods for v in vars(m).values() if isinstance(v, type) and v.__module__ == m.__name__]
    return {id(o): (o, dict(vars(o))) for o in mods + classes}


def _assert_same(before, after):
    assert after.keys() == before.keys()
    for key, (obj, attrs) in before.items():
        now = after[key][1]
        assert now.keys() == attrs.keys(), obj
        assert all(now[a] is v for a, v in attrs.items()), obj


def test_registry():
    assert len(VLLM_FAULTS) >= 6
    assert list(VLLM_FAULTS) == [f.name for f in FAULTS.values() if "vllm" in f.engines and not f.served]
    assert list(faults_for("hf")) == [f.name for f in MODEL_FAULTS] == list(faults_for("reference"))
    assert not set(VLLM_FAULTS) & set(faults_for("hf"))
    for name, f in VLLM_FAULTS.items():
        assert f.name == name and re.fullmatch(r"vllm-[a-z0-9-]+", name)
        assert f.engines == ("vllm",) and re.fullmatch(r"A([1-9]|1[0-2])", f.klass)
        doc = type(f).__doc__
        assert f.klass in doc and "Strikes" in doc and "Trigger" in doc and "expected" in doc, name
        assert f.points and f.summary and f.trigger
        assert get_fault(name) is f


@pytest.mark.parametrize("name", list(VLLM_FAULTS))
def test_patches_are_restored_even_on_error(name):
    fault = VLLM_FAULTS[name]
    before = _snapshot()
    with pytest.raises(RuntimeError, match="engine crashed"):
        with fault.active("vllm", PRO.config, FaultState()):
            assert _snapshot() != before  # something of vLLM's is patched during the run
            raise RuntimeError("engine crashed")
    _assert_same(before, _snapshot())


@pytest.mark.parametrize("name", list(VLLM_FAULTS))
def test_vllm_faults_need_the_vllm_engine(name):
    with pytest.raises(BadInput, match="no implementation for engine 'hf'"):
        with VLLM_FAULTS[name].active("hf", FLASH.config, FaultState()):
            pass


def test_triggers_on_the_engine_cases():
    """flash-engine (hidden 4096) exercises everything but the width guard; pro-engine (7168) it."""
    fl = {n for n, f in VLLM_FAULTS.items() if f.triggered(FLASH.config, FLASH.seq_lens, "vllm")}
    pro = {n for n, f in VLLM_FAULTS.items() if f.triggered(PRO.config, PRO.seq_lens, "vllm")}
    assert set(VLLM_FAULTS) - fl == {"vllm-norm-hidden-guard"}
    assert "vllm-norm-hidden-guard" in pro
    assert not IndexerKeyScaleMisread().triggered(FLASH.config, (600,), "vllm")


def test_layer_index():
    assert layer_index("model.layers.12.attn") == 12 and layer_index("model.layers.1") == 1
    assert layer_index("lm_head") is None


def test_ue8m0_bytes_as_values():
    s = torch.tensor([2.0 ** -8, 1.0, 2.0 ** 3])
    assert ue8m0_bytes_as_values(s).tolist() == [119.0, 127.0, 130.0]


def _routing(**kw):
    R = vllm_module(CPU_ROUTER)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16 if kw.get("input_ids") is None else len(kw["input_ids"]), 64, generator=g)
    base = dict(router_logits=logits, top_k=6, renormalize=True, e_score_correction_bias=torch.zeros(64),
                routed_scaling_factor=1.5, input_ids=None, hash_indices_table=None)
    base.update(kw)
    return R._sqrtsoftplus_bias_topk(**base)


needs_kernels = pytest.mark.skipif(vllm_cpu.missing_kernels() is not None, reason=str(vllm_cpu.missing_kernels()))


@needs_kernels
def test_routed_scaling_ignored_changes_the_weights():
    w, ids = _routing()
    state = FaultState()
    with VLLM_FAULTS["vllm-routed-scaling-ignored"].active("vllm", FLASH.config, state):
        w2, ids2 = _routing()
    assert state.fired == 1
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w.sum(-1), torch.full((16,), 1.5))
    torch.testing.assert_close(w2.sum(-1), torch.full((16,), 1.0))
    torch.testing.assert_close(w2 * 1.5, w)
    w3, _ = _routing()  # restored
    assert torch.equal(w3, w)


@needs_kernels
def test_hash_routing_off_by_one_uses_the_next_row():
    g = torch.Generator().manual_seed(1)
    table = torch.randint(0, 64, (100, 6), generator=g, dtype=torch.int32)
    ids = torch.tensor([0, 5, 42, 99])
    kw = dict(e_score_correction_bias=None, input_ids=ids, hash_indices_table=table)
    _, e = _routing(**kw)
    state = FaultState()
    with VLLM_FAULTS["vllm-hash-routing-off-by-one"].active("vllm", FLASH.config, state):
        _, e2 = _routing(**kw)
    assert state.fired == 1
    assert torch.equal(e.long().sort(-1).values, table[ids].long().sort(-1).values)
    assert torch.equal(e2.long().sort(-1).values, table[(ids + 1) % 100].long().sort(-1).values)
    # learned layers are untouched
    w, i = _routing()
    with VLLM_FAULTS["vllm-hash-routing-off-by-one"].active("vllm", FLASH.config, FaultState()):
        w2, i2 = _routing()
    assert torch.equal(w, w2) and torch.equal(i, i2)


def test_norm_hidden_guard():
    N = vllm_module(LAYERNORM)
    norm = torch.nn.Module()  # RMSNorm.forward reads weight and variance_epsilon only
    norm.weight = torch.nn.Parameter(torch.rand(7168) + 0.5)
    norm.variance_epsilon = 1e-6
    x = torch.randn(3, 7168) * 3
    state = FaultState()
    with VLLM_FAULTS["vllm-norm-hidden-guard"].active("vllm", PRO.config, state):
        y = N.RMSNorm.forward(norm, x)
    assert state.fired == 1
    head = x[:, :4096] * torch.rsqrt(x[:, :4096].square().mean(-1, keepdim=True) + 1e-6) * norm.weight[:4096]
    torch.testing.assert_close(y[:, :4096], head)
    assert torch.equal(y[:, 4096:], x[:, 4096:])


def test_indexer_key_scale_misread_shifts_and_restores():
    O = vllm_module(CUSTOM_OPS)
    block, head, blocks = 64, 128, 3
    kv = torch.zeros(blocks, block * (head + 4), dtype=torch.uint8)
    scales = kv[:, block * head:].view(torch.float32)
    scales.copy_(torch.arange(blocks * block, dtype=torch.float32).view(blocks, block) + 1)
    original = kv.clone()
    seen = {}

    def kernel(q, kv_, *rest):
        seen["scales"] = kv_[:, block * head:].view(torch.float32).clone()
        return "logits"

    q = torch.zeros(2, 4, head)
    fault = IndexerKeyScaleMisread()
    state = FaultState()
    old = O.fp8_paged_mqa_logits_cpu
    O.fp8_paged_mqa_logits_cpu = kernel
    try:
        with fault.active("vllm", FLASH.config, state):
            out = O.fp8_paged_mqa_logits_cpu(q, kv, None, None, None, block, 600)
    finally:
        O.fp8_paged_mqa_logits_cpu = old
    assert out == "logits" and state.fired == 1
    want = original[:, block * head:].view(torch.float32)
    assert torch.equal(seen["scales"][:, :-1], want[:, 1:])
    assert torch.equal(seen["scales"][:, -1], want[:, -1])
    assert torch.equal(kv, original)  # the cache is restored


def test_compressor_drops_the_previous_block():
    C = vllm_module(CPU_COMPRESSOR)
    fault = VLLM_FAULTS["vllm-compressor-prev-window-lost"]
    seen = {}

    class Fake:  # the compressor's attributes the fault reads; its forward calls the mapper
        head_dim, overlap, compress_ratio = 512, True, 4

    def forward(self_c, kv_score, positions, rotary_emb):
        local = positions.unsqueeze(-1) - 8 + 1 + torch.arange(8)
        seen["slots"] = C.map_local_to_global_slots_cpu(local, torch.zeros(len(positions), dtype=torch.long),
                                                       torch.arange(4).view(1, 4), 64)
    state = FaultState()
    old = C.DeepseekV4CPUCompressor.forward
    C.DeepseekV4CPUCompressor.forward = forward
    try:
        with fault.active("vllm", FLASH.config, state):
            C.DeepseekV4CPUCompressor.forward(Fake(), None, torch.tensor([3, 7, 11]), None)
            assert C.map_local_to_global_slots_cpu is not fault  # patched only inside forward
    finally:
        C.DeepseekV4CPUCompressor.forward = old
    assert state.fired == 1
    slots = seen["slots"]
    assert (slots[:, :4] == -1).all()
    assert slots[1:, 4:].tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]]


def test_selftest_wiring_for_vllm(monkeypatch):
    """`selftest --engine vllm` runs the vLLM faults and honest variants at the engine's own
    profile, every run with the routed-SwiGLU-clamp fix (compare stubbed: no engine here)."""
    import corruptcheck.selftest.runner as st

    calls = []

    def fake_compare(case, engine_name, precision, engine=None, teacher_forcing=None, diagnose=None, hypotheses=None,
                     **options):
        assert teacher_forcing == "on-fail"  # the self-test judges as compare does by default
        assert diagnose == "never"  # it scores detection and localization, not the diagnosis
        calls.append((type(engine).__name__, getattr(engine, "name", ""), precision, options))
        raise RuntimeError("stub")

    monkeypatch.setattr(st, "compare", fake_compare)
    monkeypatch.setattr(vllm_cpu, "missing_kernels", lambda: None)  # the engine never starts here
    res = st.run_selftest("vllm", cases=["flash-engine"])
    assert res.precisions == ["fp8-serving"]
    assert [r.fault for r in res.faults] == list(VLLM_FAULTS)
    guard = next(r for r in res.faults if r.fault == "vllm-norm-hidden-guard")
    assert guard.status == "not exercised" and "4096" in guard.note
    assert {r.variant for r in res.benign} == set(st.VLLM_BENIGN) and len(st.VLLM_BENIGN) >= 4
    assert len(calls) == len(VLLM_FAULTS) - 1 + len(st.VLLM_BENIGN)
    assert all(opts == {"fix": "routed-swiglu-clamp"} and prec == "fp8-serving" for _, _, prec, opts in calls)
    assert {c[0] for c in calls} == {"FaultyEngine", "VariantEngine"}
    assert not res.ok  # every run errored
    doc = res.to_json()
    assert [f["name"] for f in doc["fault_catalog"]] == list(VLLM_FAULTS)
    opts = {v.name: v.options for v in st.VLLM_BENIGN.values()}
    assert opts["chunked-1024"] == {"max_num_batched_tokens": 1024} and st.VLLM_BENIGN["batch2"].batch_partner


def test_selftest_rejects_hf_faults_on_vllm():
    from corruptcheck.selftest.runner import run_selftest

    with pytest.raises(BadInput, match="unknown fault"):
        run_selftest("vllm", cases=["flash-engine"], faults=["mhc-norm-sqrt2"])


def test_indexer_scale_as_ue8m0_bytes():
    from corruptcheck.faults.vllm import IndexerKeyScaleAsUe8m0

    good = torch.tensor([[2.0 ** -10, 2.0 ** -9, 1.0, 0.5]])
    scales = good.clone()
    IndexerKeyScaleAsUe8m0.misread(scales, good)
    want = torch.exp2(good.view(torch.uint8)[:, :4].float() - 127)
    assert torch.equal(scales, want) and not torch.equal(scales, good)
