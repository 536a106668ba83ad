"""The fault registry (docs/faults.md): named re-enactments of real bugs, patches that only live for
an engine run, triggers that agree with what the run did, and the same fault in both engines."""
import re

import pytest
import torch

from corruptcheck.cases import get_case
from corruptcheck.compare import compare
from corruptcheck.engines import get_engine
from corruptcheck.errors import BadInput
from corruptcheck.faults import FAULTS, FaultState, FaultyEngine, get_fault, hf_module
from corruptcheck.reference import attention, compressor, mhc, model, moe

REQUIRED = {  # the bugs the self-test must re-enact -> registry name
    "7168 hidden-size guard": "mhc-pre-hidden-guard",
    "tile-remainder drop in one GEMM": "router-split-k-tail",
    "sqrt2 RMSNorm scale": "mhc-norm-sqrt2",
    "missing SwiGLU clamp on the shared expert": "shared-expert-no-clamp",
    "routing weights from bias-corrected scores": "routing-weights-biased",
    "YaRN on a sliding-window layer": "yarn-on-sliding",
    "wrong Sinkhorn iteration count": "sinkhorn-19-iters",
    "CSA compressor loses the previous window's half": "csa-prev-window-lost",
    "indexer RoPE layout swapped": "indexer-rope-neox",
    "sliding-window off-by-one": "window-off-by-one",
}


def test_registry_covers_the_issue():
    assert len(FAULTS) >= 12
    assert len({f.klass for f in FAULTS.values()}) >= 8
    assert set(REQUIRED.values()) <= set(FAULTS)
    for name, f in FAULTS.items():
        assert f.name == name and re.fullmatch(r"[a-z0-9-]+", name)
        assert re.fullmatch(r"A([1-9]|1[0-2])", f.klass), name
        doc = type(f).__doc__
        # the docstring names the real bug (catalog id), its class, where it strikes and the trigger
        assert f.klass in doc and "Strikes" in doc and "Trigger" in doc, name
        assert any(part.strip().split(" ")[0] in doc for part in f.catalog.split(",")), name
        assert f.points and f.summary and f.trigger
        assert f.describe().split("\t")[0] == name


def test_get_fault_unknown():
    with pytest.raises(BadInput, match="unknown fault"):
        get_fault("no-such-fault")


def _snapshot():
    mods = [hf_module(), model, attention, compressor, mhc, moe]
    classes = [v for v in vars(hf_module()).values() if isinstance(v, type) and v.__module__ == hf_module().__name__]
    return {id(o): dict(vars(o)) for o in mods + classes + [torch.nn.Linear]}


@pytest.mark.usefixtures("transformers")  # the snapshot covers transformers' classes
@pytest.mark.parametrize("engine", ["hf", "reference"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_patches_are_restored_even_on_error(name, engine):
    cfg = get_case("pro-slice").config
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"):
        with FAULTS[name].active(engine, cfg, FaultState()):
            assert _snapshot() != before  # something is patched while active
            raise RuntimeError("boom")
    after = _snapshot()
    assert after.keys() == before.keys()
    for key, attrs in before.items():
        assert after[key].keys() == attrs.keys()
        assert all(after[key][a] is v for a, v in attrs.items())


def test_fault_needs_a_known_engine():
    with pytest.raises(BadInput, match="no implementation for engine"):
        with FAULTS["mhc-norm-sqrt2"].active("dump", get_case("tiny").config, FaultState()):
            pass


@pytest.fixture(scope="module")
def tiny_clean(transformers):
    case = get_case("tiny")
    return {e: get_engine(e).run(case, "float32").points for e in ("hf", "reference")}


@pytest.fixture(scope="module")
def tiny_faulty(transformers):
    """(fault name, engine) -> (points, state) on tiny, float32."""
    case = get_case("tiny")
    out = {}
    for name, fault in FAULTS.items():
        for e in ("hf", "reference"):
            eng = FaultyEngine(get_engine(e), fault)
            out[name, e] = (eng.run(case, "float32").points, eng.state)
    return out


@pytest.mark.parametrize("engine", ["hf", "reference"])
def test_static_trigger_agrees_with_the_run(tiny_faulty, engine):
    case = get_case("tiny")
    for name, fault in FAULTS.items():
        _, state = tiny_faulty[name, engine]
        static = fault.triggered(case.config, case.seq_lens, engine)
        if static is False:
            assert state.fired == 0 and state.where is None, name
        else:
            assert state.fired > 0 and state.where, name
    # width-triggered faults never fire on tiny (hidden 64), the others all do
    assert {n for n in FAULTS if tiny_faulty[n, engine][1].fired == 0} == {"mhc-pre-hidden-guard",
                                                                          "router-split-k-tail"}


def test_width_triggers():
    guard, tail = get_fault("mhc-pre-hidden-guard"), get_fault("router-split-k-tail")
    for hidden, fires_guard, fires_tail in ((64, False, False), (4096, False, False), (5120, True, True),
                                            (6144, True, False), (7168, True, True)):
        cfg = get_case("pro-slice").config.replace(hidden_size=hidden)
        assert guard.triggered(cfg, (300,), "hf") is fires_guard, hidden
        assert tail.triggered(cfg, (300,), "hf") is fires_tail, hidden
    assert tail.kept(7168) == 6144  # 112 tiles of 64, 3 per split x 32 splits: 16 tiles dropped


def test_a_fault_changes_the_engine_only_inside_the_run(tiny_clean, tiny_faulty):
    for e in ("hf", "reference"):
        faulty, _ = tiny_faulty["mhc-norm-sqrt2", e]
        assert not torch.equal(faulty["layers.0.attn_norm"], tiny_clean[e]["layers.0.attn_norm"])
        again = get_engine(e).run(get_case("tiny"), "float32").points
        assert torch.equal(again["logits"], tiny_clean[e]["logits"])


def test_teacher_forcing_and_golden_stay_honest(transformers):
    """compare runs the reference (golden, teacher forcing) outside the fault: the faulty
    engine fails and the very next honest compare passes."""
    case = get_case("tiny")
    res = compare(case, "hf", "float32", engine=FaultyEngine(get_engine("hf"), get_fault("window-off-by-one")))
    assert res.verdict == "fail" and res.culprit["name"] == "layers.0.attn.core"
    assert res.engine_meta["fault"] == "window-off-by-one" and res.engine_meta["fault_fired"] > 0
    assert compare(case, "hf", "float32").verdict == "pass"


def test_hf_and_reference_reenact_the_same_fault(tiny_clean, tiny_faulty):
    """At the layer where it strikes, the hf fault and the reference fault give the same
    numbers up to float32 noise (2% of the fault's own effect)."""
    for name in FAULTS:
        (h, hs), (r, rs) = tiny_faulty[name, "hf"], tiny_faulty[name, "reference"]
        assert hs.where == rs.where, name
        if hs.where is None:
            continue
        clean = tiny_clean["reference"]
        compared = 0
        for n, t in h.items():
            if not n.startswith(hs.where + ".") or n not in r:
                continue
            if not t.is_floating_point():
                assert torch.equal(t, r[n]), n
                continue
            effect = (r[n].double() - clean[n].double()).norm()
            if effect <= 1e-5 * r[n].double().norm():
                continue
            assert (t.double() - r[n].double()).norm() <= 0.02 * effect, (name, n)
            compared += 1
        assert compared, name
